"""The ``torch`` pipelines: what PyTorch's eager CPU kernels compute (one thread), in D.

* softmax from logits: ``F.cross_entropy`` -- ``log_softmax`` over the last axis, then
  ``nll_loss`` (class indices; weights, ``ignore_index``, ``label_smoothing``) or the
  probability-target formula (dense labels);
* sigmoid from logits: ``F.binary_cross_entropy_with_logits`` (``weight``, ``pos_weight``);
* sigmoid probabilities: ``F.binary_cross_entropy`` (each log clamped at -100).

Op by op, from PyTorch 2.13's sources and checked bit for bit against the installed library
(``tests/fixtures/record_torch_framework.py``; ``docs/frameworks-torch.md``):

``log_softmax`` (``aten/src/ATen/native/cpu/SoftMaxKernel.cpp``, ``_vec_log_softmax_lastdim``)
    the row maximum (exact); ``exp(x - max)`` in float32, summed in float32 and the sum
    *stored in D*; its log in float32, rounded to D; the output ``x - max - log_sum``
    evaluated in float32 and rounded once. So a float16 row whose exponentials add up past
    65504 (more than 65,504 near-equal logits) has an infinite sum and ``-inf`` outputs.
``nll_loss`` (``aten/src/ATen/native/LossNLL.cpp``, ``nll_loss_out_frame``)
    per row ``-logp[t] * w[t]`` in D; ``sum``/``mean`` accumulate those *in D* with the
    kernel's eight-level cascade (:func:`nll_cascade`), and ``mean`` divides by the total
    weight: the count of counted rows cast to D (a bfloat16 mean over 257 rows divides by
    256) or the weights summed in D by the same cascade.
``cross_entropy_loss_label_smoothing``
    ``(1 - e) * nll_loss(...) + smooth * (e / C)`` where ``smooth`` is ``-sum_c logp_c w_c``
    per row, reduced separately by ``torch.sum`` (float32 accumulation, one rounding) and, for
    ``mean``, divided by the summed target weights in D (or the count of counted rows, read
    as a float32 number: not rounded to D, unlike nll_loss's divisor).
``cross_entropy_loss_prob_target``
    ``-(logp * y' * w).sum()`` over the whole batch in one float32 accumulation (``sum``,
    ``mean`` then divided by the number of rows); ``y' = y (1 - e) + e / C``.

Their backward passes are the kernels' (``nll_loss_backward``:
``w[t] * -(grad / total_weight)`` in D; ``_vec_host_softmax_backward_lastdim``:
``g - exp(out) * sum(g)`` with the row sum kept in float32 and one rounding), in
:mod:`.torch_eager_backward`. PyTorch's autograd seeds the reduced loss with 1, and each
reduction's backward divides in D as the kernel does, so :meth:`reduction_gradient` is 1.

Threads: PyTorch's ``sum`` of a 16-bit tensor splits the work between threads and adds
their partial results in D (with two threads, the float16 sum of 65,519 ones is ``inf``;
with one, 65504). These pipelines emulate one thread (``torch.set_num_threads(1)``);
:func:`thread_dependent_sum` says where two threads would give another answer.
"""

from __future__ import annotations

import numpy as np

from .. import chunking
from ..case import Case, valid_rows
from ..precision import FloatArray, Precision
from ..stages import StageRunner
from .base import Block, Pipeline, Saved

# Checked live on PyTorch 2.13 CPU (tests/test_torch_framework.py): F.cross_entropy and the
# binary losses on float8 tensors raise NotImplementedError, as do exp, sum and add.
TORCH_FP8_NOTE = ("PyTorch 2.13 has no float8 CPU kernel for cross_entropy, log_softmax, exp or "
                  "sum (NotImplementedError)")


class Primitives:
    """The elementary functions these pipelines evaluate in the compute dtype: numpy's. They
    are looked up here at each call, so that a test can put torch's own (SLEEF's ``exp`` and
    ``log``, a whole tensor's summation order) in their place and show that what differs
    from torch in float32 and float64 is these functions and nothing else. A row's sum over
    its classes is the runner's (a float32 pairwise sum, defined chunk-wise past
    :data:`~xentcheck.chunking.SUM_CHUNK` values), so that a row wider than a block replays
    it over column chunks."""

    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    log1p = staticmethod(np.log1p)

    @staticmethod
    def total(x: FloatArray) -> FloatArray:
        return np.sum(x)


PRIMITIVES = Primitives()

# nll_loss_out_frame's cascade: eight levels of partial sums in D.
CASCADE_LEVELS = 8
# at::internal::GRAIN_SIZE: parallel_for splits no range shorter than this.
GRAIN_SIZE = 32768
# binary_cross_entropy clamps each log at this value.
LOG_CLAMP = -100.0
# Values per group of rows whose products the dense-target reduction sums at once (rows of
# at most SUM_CHUNK classes): about a million, as the evaluator's blocks.
_CHUNK_VALUES = 1 << 20


# -- nll_loss's reduction --------------------------------------------------------------------


def _ceil_log2(n: int) -> int:
    """``at::native::utils::CeilLog2``: 1 up to 2, else the bit length of ``n - 1``."""
    return 1 if n <= 2 else int(n - 1).bit_length()


def _push_depths(rows: FloatArray, batch_size: int) -> FloatArray:
    """How many levels of the cascade row ``b`` pushes up after adding its term: the number
    of low ``level_power``-bit digits of ``b`` that are zero, at most seven."""
    power = max(4, _ceil_log2(batch_size) // CASCADE_LEVELS)
    mask = (1 << power) - 1
    depth = np.zeros(len(rows), dtype=np.int64)
    for level in range(CASCADE_LEVELS - 1):
        zero = ((rows >> (level * power)) & mask) == 0
        depth += (depth == level) & zero
    return depth


def _sequential_sums(values: FloatArray, closes: FloatArray,
                     precision: Precision) -> tuple[FloatArray, FloatArray]:
    """Running sums in D (each addition rounded to D) of consecutive runs of ``values``; a run
    ends at (and includes) each value marked in ``closes``. Returns the closed runs' sums, in
    order, and the sum of the run still open at the end (0 if none).

    The runs are summed side by side, one position at a time: as many numpy steps as the
    longest run has values (the cascade's runs have 16 unless rows are ignored).
    """
    compute = precision.compute_dtype
    zero = np.zeros(1, dtype=compute)
    if not len(values):
        return np.zeros(0, dtype=compute), zero
    starts = np.flatnonzero(np.concatenate(([True], closes[:-1])))
    lengths = np.diff(np.concatenate((starts, [len(values)])))
    values = np.asarray(values).astype(compute)
    sums = values[starts].copy()  # 0 + v is v exactly
    with np.errstate(all="ignore"):
        for k in range(1, int(lengths.max())):
            live = np.flatnonzero(lengths > k)
            total = sums[live] + values[starts[live] + k]
            sums[live] = precision.round(total).astype(compute)
    closed = int(np.count_nonzero(closes))
    left = sums[closed:] if closed < len(sums) else zero
    return sums[:closed], left


def nll_cascade(terms: FloatArray, rows: FloatArray, batch_size: int,
                precision: Precision) -> FloatArray:
    """The sum in D of ``terms`` (the counted rows' values, in row order; ``rows`` their row
    numbers) as ``nll_loss_out_frame`` accumulates it: each term is added to a level-0
    partial sum in D; after a row whose number ends in ``k`` zero digits of ``level_power``
    bits (4 for any batch under 2**40 rows), the partial sums of levels ``0..k-1`` are each
    added to the next level up, in D, and cleared; at the end the eight partial sums are
    added in order, in D. Ignored rows add nothing and push nothing.

    Returns a 0-d value of D (in its storage dtype).
    """
    depth = _push_depths(np.asarray(rows, dtype=np.int64), batch_size)
    items = np.asarray(terms)
    leftovers = []
    for level in range(CASCADE_LEVELS):
        closes = (depth >= level + 1) if level + 1 < CASCADE_LEVELS else np.zeros(
            len(items), dtype=bool)
        items, left = _sequential_sums(items, closes, precision)
        leftovers.append(left[0])
        depth = depth[closes]
    compute = precision.compute_dtype
    total = np.zeros((), dtype=compute)
    with np.errstate(all="ignore"):
        for left in leftovers:  # std::accumulate(begin, end, scalar_t{0})
            total = precision.round(total + np.asarray(left, dtype=compute)).astype(compute)
    return precision.round(total)


def _count_in_d(count: int, precision: Precision) -> FloatArray:
    """``static_cast<scalar_t>(int64)``: for the 16-bit types through float (exact below
    2**24), then rounded to D (257 becomes 256 in bfloat16)."""
    if precision.is_16bit:
        return precision.round(np.asarray(float(np.float32(count)), dtype=np.float64))
    return precision.round(np.asarray(float(count), dtype=np.float64))


def torch_sum(values: FloatArray, precision: Precision) -> FloatArray:
    """``Tensor.sum()`` on one thread: accumulated in float32 for 16-bit D (D itself
    otherwise) and rounded to D once."""
    with np.errstate(all="ignore"):
        total = PRIMITIVES.total(np.asarray(values).astype(precision.compute_dtype, copy=False))
    return precision.round(np.asarray(total))


def thread_dependent_sum(values: FloatArray, precision: Precision, threads: int = 2) -> bool:
    """Whether ``Tensor.sum()`` of these values, which this module emulates on one thread,
    gives another value on ``threads`` threads, which add their float32 partial sums after
    rounding each to D: the float16 sum of 65,519 ones is 65504 on one thread and ``inf``
    on two. A model of the split: a sum of more than ``at::internal::GRAIN_SIZE`` (32768)
    values is cut into ``threads`` equal contiguous parts. For 16-bit D only (float32 and
    float64 partial sums are kept in D anyway, so only the order changes there)."""
    flat = np.asarray(values).reshape(-1)
    if not precision.is_16bit or len(flat) <= GRAIN_SIZE:
        return False
    one = torch_sum(flat, precision)
    parts = [torch_sum(part, precision) for part in np.array_split(flat, threads)]
    total = parts[0].astype(np.float32)
    with np.errstate(all="ignore"):
        for part in parts[1:]:
            total = precision.round(total + part.astype(np.float32)).astype(np.float32)
    return not bool(np.array_equal(precision.round(total), one, equal_nan=True))


# -- the whole batch's totals ----------------------------------------------------------------


def _weights_in_d(case: Case, precision: Precision) -> FloatArray | None:
    weights = case.spec.class_weights
    return None if weights is None else precision.round(np.asarray(weights, dtype=np.float64))


def nll_total_weight(case: Case, precision: Precision) -> FloatArray:
    """``nll_loss``'s ``total_weight``, the divisor of its ``mean``: the number of counted rows
    cast to D, or (with class weights) the counted targets' weights summed in D by the
    kernel's cascade."""
    labels = np.asarray(case.labels_rows()).astype(np.int64)
    valid = valid_rows(case, labels)
    weights = _weights_in_d(case, precision)
    if weights is None:
        return _count_in_d(int(np.count_nonzero(valid)), precision)
    rows = np.flatnonzero(valid)
    return nll_cascade(weights[labels[rows]], rows, len(labels), precision)


def smoothing_total_weight(case: Case, precision: Precision) -> FloatArray:
    """The divisor of label smoothing's ``mean`` term: ``weight.gather(targets).sum()``, a
    value of D (float32 accumulation, one rounding), or without weights ``true_mask.sum()``,
    an int64 tensor that the division reads as a float32 number (``opmath``) without rounding
    it to D: 257 stays 257 in bfloat16 here, where nll_loss's own divisor is 256."""
    labels = np.asarray(case.labels_rows()).astype(np.int64)
    valid = valid_rows(case, labels)
    weights = _weights_in_d(case, precision)
    if weights is None:
        return np.asarray(np.count_nonzero(valid), dtype=precision.compute_dtype)
    return torch_sum(weights[labels[valid]], precision)


# -- softmax from logits: F.cross_entropy ----------------------------------------------------


def log_softmax(run: StageRunner, x: FloatArray) -> FloatArray:
    """``torch.log_softmax(x, -1)`` as the CPU kernel computes it, in D."""
    # D's values held in the compute dtype, converted once (exact): every step below reads
    # them there, and numpy's max of a float32 array is many times faster than of bfloat16's
    x = np.asarray(x).astype(run.precision.compute_dtype, copy=False)
    top = run.max("shift", x)
    exps = run.fused("exp", lambda a, m: PRIMITIVES.exp(a - m), x, top, round_result=False)
    # summed in float32 (whatever --accumulate says: the kernel's sum), stored in D
    # (tmp_sum_scalar is an array of scalar_t)
    total = run.sum("sum", exps, accumulate="default")
    log_sum = run.log("log", total[:, None])
    return run.fused("log_softmax", lambda a, m, s: (a - m) - s, x, top, log_sum)


def _dense_target(run: StageRunner, labels: FloatArray, smoothing: float,
                  classes: int) -> FloatArray:
    """``y * (1 - e) + e / C`` as torch forms it on a tensor of D: the product with the
    Python number kept in float32, the added number stored in D first."""
    target = run.cast("cast", labels)
    if smoothing:
        share = run.precision.round(np.float64(smoothing / classes))
        target = run.add("smooth", run.multiply("smooth", target, 1.0 - smoothing), share)
    return target


def dense_products(run: StageRunner, block: Block, logp: FloatArray) -> FloatArray:
    """``logp * y' * w`` (left to right, each product in D): the terms the probability-target
    loss sums, per row (``none``) or over the whole batch (``sum``, ``mean``)."""
    spec = block.case.spec
    target = _dense_target(run, block.labels, float(spec.label_smoothing), block.case.classes)
    terms = run.multiply("nll", logp, target)
    weights = _weights_in_d(block.case, run.precision)
    if weights is not None:
        terms = run.multiply("weight", terms, block.per_class(weights)[None, :])
    return terms


def index_parts(run: StageRunner, block: Block,
                logp: FloatArray) -> tuple[FloatArray, FloatArray | None]:
    """Per row: ``nll_loss``'s ``-logp[t] * w[t]`` (0 where ignored) and, with label
    smoothing, ``-sum_c logp_c w_c`` (0 where ignored; None without smoothing)."""
    spec = block.case.spec
    weights = _weights_in_d(block.case, run.precision)
    nll = run.negate("gather", run.gather("gather", logp, block.target))
    if weights is not None:
        nll = run.multiply("weight", nll, weights[block.target])
    nll = run.select("nll", block.valid, nll, 0.0)
    if not spec.label_smoothing:
        return nll, None
    terms = logp if weights is None else run.multiply(
        "smooth", logp, block.per_class(weights)[None, :])
    smooth = run.negate("smooth", run.sum("smooth", terms))
    return nll, run.select("smooth", block.valid, smooth, 0.0)


def _smoothing_mix(run: StageRunner, nll: FloatArray, smooth: FloatArray,
                   smoothing: float, classes: int) -> FloatArray:
    """``(1 - e) * nll + smooth * (e / C)``: Python numbers times tensors of D, each product
    rounded to D, then their sum."""
    return run.add("smooth", run.multiply("smooth", nll, 1.0 - smoothing),
                   run.multiply("smooth", smooth, smoothing / classes))


class TorchCrossEntropy(Pipeline):
    name = "torch"
    framework = True
    fp8_note = TORCH_FP8_NOTE
    family = "softmax"
    from_logits = True
    formula = ("F.cross_entropy (PyTorch CPU): log_softmax's sum and log stored in D, "
               "nll_loss summed in D")
    stages = ("cast", "shift", "exp", "sum", "log", "log_softmax", "gather", "weight",
              "smooth", "nll")

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        logp = run.save("log_softmax", log_softmax(run, run.cast("cast", block.logits)))
        case = block.case
        smoothing = float(case.spec.label_smoothing)
        if case.label_kind != "index":
            terms = dense_products(run, block, logp)
            return run.negate("nll", run.sum("nll", terms))
        nll, smooth = index_parts(run, block, logp)
        if smooth is None:
            return nll
        return run.select("nll", block.valid,
                          _smoothing_mix(run, nll, smooth, smoothing, case.classes), 0.0)

    def reduce(self, run: StageRunner, per_example: FloatArray, reduction: str,
               denominator: float, case: Case | None = None) -> FloatArray:
        if reduction == "none" or case is None:
            return super().reduce(run, per_example, reduction, denominator)
        precision = run.precision
        flat = np.asarray(per_example).reshape(-1)
        run.bind(np.ones(1, dtype=bool))
        if case.label_kind != "index":
            out = self._dense_reduction(run, case, reduction)
        elif not case.spec.label_smoothing:
            out = self._nll_reduction(precision, case, flat, reduction)
        else:
            out = self._smoothing_reduction(run, case, reduction)
        run.watch_reduction("reduce", out, flat)
        return out

    @staticmethod
    def _nll_reduction(precision: Precision, case: Case, nll: FloatArray,
                       reduction: str) -> FloatArray:
        labels = np.asarray(case.labels_rows()).astype(np.int64)
        rows = np.flatnonzero(valid_rows(case, labels))
        total = nll_cascade(nll[rows], rows, len(labels), precision)
        if reduction == "sum":
            return total
        divisor = nll_total_weight(case, precision)
        with np.errstate(all="ignore"):
            compute = precision.compute_dtype
            return precision.round(total.astype(compute) / divisor.astype(compute))

    def _smoothing_reduction(self, run: StageRunner, case: Case, reduction: str) -> FloatArray:
        from ..execution import row_values  # execution imports the pipelines

        precision = run.precision

        def parts(quiet: StageRunner, chunk: Block) -> tuple[FloatArray, FloatArray | None]:
            return index_parts(quiet, chunk, log_softmax(quiet, quiet.cast("cast", chunk.logits)))

        nll_parts, smooth_parts = [], []
        # per-row values in D: the same whatever the blocks (a wide row's replayed)
        for nll, smooth in row_values(case, precision, self.all_stages, parts):
            nll_parts.append(nll)
            smooth_parts.append(smooth)
        nll_all = np.concatenate(nll_parts)
        nll_loss = self._nll_reduction(precision, case, nll_all, reduction)
        smooth_total = torch_sum(np.concatenate(smooth_parts), precision)  # type: ignore[arg-type]
        if reduction == "mean":
            with np.errstate(all="ignore"):
                compute = precision.compute_dtype
                smooth_total = precision.round(
                    smooth_total.astype(compute)
                    / smoothing_total_weight(case, precision).astype(compute))
        return _smoothing_mix(run, nll_loss, smooth_total, float(case.spec.label_smoothing),
                              case.classes)

    def _dense_reduction(self, run: StageRunner, case: Case, reduction: str) -> FloatArray:
        from ..execution import row_values  # execution imports the pipelines

        precision = run.precision
        compute = precision.compute_dtype
        # Rows of at most SUM_CHUNK classes: the float32 sum of each group of rows of about
        # _CHUNK_VALUES products, the groups added in turn. Wider rows (the only ones a block
        # splits): each row's sum over its classes (chunk-defined, replayed over a split
        # row's chunks), the rows added in turn -- the same split or whole.
        by_row = case.classes > chunking.SUM_CHUNK

        def group_sum(quiet: StageRunner, chunk: Block) -> FloatArray:
            terms = dense_products(quiet, chunk, log_softmax(quiet, quiet.cast(
                "cast", chunk.logits)))
            with np.errstate(all="ignore"):
                if by_row:
                    return quiet.accumulate(terms, accumulate="default")
                return np.asarray(PRIMITIVES.total(np.asarray(terms).astype(compute,
                                                                            copy=False)))

        total = np.zeros((), dtype=compute)
        with np.errstate(all="ignore"):
            for sums in row_values(case, precision, self.all_stages, group_sum,
                                   None if by_row else _CHUNK_VALUES):
                for value in np.reshape(sums, -1).astype(compute, copy=False):
                    total = total + value
            out = precision.round(-precision.round(total).astype(compute))
            if reduction == "mean":
                out = precision.round(out.astype(compute) / compute.type(case.rows))
        return out

    def reduction_gradient(self, precision: Precision, reduction: str,
                           denominator: float) -> float:
        return 1.0  # autograd's seed: the reductions' backward passes divide in D themselves

    def backward(self, run: StageRunner, block: Block, upstream: float,
                 saved: Saved | None = None) -> FloatArray | None:
        from .torch_eager_backward import cross_entropy_backward

        return cross_entropy_backward(self, run, block, upstream, saved or {})


# -- sigmoid from logits: F.binary_cross_entropy_with_logits ---------------------------------


def log_sigmoid(run: StageRunner, x: FloatArray) -> FloatArray:
    """``F.logsigmoid(x)``: ``min(x, 0) - log1p(exp(-|x|))`` in float32, rounded once."""
    p = PRIMITIVES
    return run.fused("log1p", lambda v: np.minimum(v, 0) - p.log1p(p.exp(-np.abs(v))), x)


def _sigmoid_constants(run: StageRunner, block: Block) -> tuple[
        FloatArray, FloatArray | None, FloatArray | None]:
    spec = block.case.spec
    target = run.cast("cast", block.labels)
    pos = None if spec.pos_weight is None else run.cast("cast", block.per_class(spec.pos_weight))
    weights = (None if spec.class_weights is None
               else run.cast("cast", block.per_class(spec.class_weights)))
    return target, pos, weights


class TorchBinaryWithLogits(Pipeline):
    name = "torch"
    framework = True
    fp8_note = TORCH_FP8_NOTE
    family = "sigmoid"
    from_logits = True
    formula = ("F.binary_cross_entropy_with_logits (PyTorch CPU): "
               "(1 - z) x - log_sigmoid(x) [* (1 + (pw - 1) z)], each op in D")
    stages = ("cast", "log1p", "product", "combine", "weight", "nll")

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        x = run.cast("cast", block.logits)
        target, pos, weights = _sigmoid_constants(run, block)
        log_sig = log_sigmoid(run, x)
        if pos is not None:
            log_weight = run.add("product", run.multiply(
                "product", run.subtract("product", pos, 1.0), target), 1.0)
            log_sig = run.multiply("product", log_sig, log_weight)
        loss = run.subtract("combine", run.multiply("combine", run.subtract(
            "combine", 1.0, target), x), log_sig)
        if weights is not None:
            loss = run.multiply("weight", loss, weights)
        return run.select("nll", block.valid_elements, loss, 0.0)

    def reduction_gradient(self, precision: Precision, reduction: str,
                           denominator: float) -> float:
        return 1.0  # autograd's seed: the kernel's backward divides by the count itself

    def backward(self, run: StageRunner, block: Block, upstream: float,
                 saved: Saved | None = None) -> FloatArray | None:
        from .torch_eager_backward import binary_with_logits_backward

        return binary_with_logits_backward(run, block, upstream)


# -- sigmoid probabilities: F.binary_cross_entropy -------------------------------------------


class TorchBinary(Pipeline):
    name = "torch"
    framework = True
    fp8_note = TORCH_FP8_NOTE
    family = "sigmoid"
    from_logits = False
    formula = ("F.binary_cross_entropy (PyTorch CPU): "
               "(z - 1) max(log1p(-p), -100) - z max(log(p), -100), each op in D")
    stages = ("cast", "log", "combine", "weight", "nll")

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        critical = block.valid_elements
        given = np.asarray(block.logits)
        p = run.cast("cast", given, critical=critical & (given > 0))
        target, _, weights = _sigmoid_constants(run, block)
        clamp = run.precision.round(np.float64(LOG_CLAMP))
        # std::max(scalar_t(std::log(p)), scalar_t(-100)): the log of 0 is clamped, not a pole
        log_p = run.fused("log", lambda v: np.maximum(PRIMITIVES.log(v), clamp), p)
        log_q = run.fused("log", lambda v: np.maximum(PRIMITIVES.log1p(v), clamp),
                          run.negate("log", p))
        loss = run.subtract(
            "combine",
            run.multiply("combine", run.subtract("combine", target, 1.0), log_q),
            run.multiply("combine", target, log_p),
        )
        if weights is not None:
            loss = run.multiply("weight", loss, weights)
        return run.select("nll", block.valid_elements, loss, 0.0)
