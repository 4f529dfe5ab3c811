"""Pipelines: each formulation of the loss, written once, generic over the precision.

A pipeline turns a block of rows into per-example losses in the storage dtype by calling
named steps on a :class:`~xentcheck.stages.StageRunner`, which rounds and watches every step.
The batch reduction (``sum``/``mean``) is the same for every pipeline and lives in
:func:`reduce_losses`. Adding a formulation means adding a class here and registering it;
the evaluator, the reference and the reports do not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np

from .arrays import release_pages
from .case import Case, softmax_coefficients, target_coefficients, valid_elements, valid_rows
from .errors import UsageError
from .precision import FloatArray
from .stages import StageRunner

# Forward values a pipeline keeps for its backward pass, by name.
Saved = Mapping[str, FloatArray]

# Keras' backend epsilon, the bound ``clipped`` clips probabilities to.
KERAS_EPSILON = 1e-7


@dataclass(frozen=True)
class Block:
    """Rows ``start : start + len(logits)`` of a case, as 2-D arrays."""

    case: Case
    logits: FloatArray
    labels: FloatArray
    start: int = 0
    # a row split across its classes: the classes ``[c0, c1)`` these arrays hold
    columns: tuple[int, int] | None = None
    # a whole row too wide for one block: the width of its column chunks
    split: int | None = None

    def column_chunks(self) -> Iterator[Block]:
        """The block (one row, :attr:`split` set) as consecutive column chunks: views of
        ``split`` classes, the last one at least two wide (so that a per-class array is
        never mistaken for a per-row one)."""
        width = self.case.classes
        step = self.split or width
        starts = list(range(0, width, step))
        if len(starts) > 1 and width - starts[-1] < 2:
            starts.pop()
        for start, stop in zip(starts, [*starts[1:], width], strict=True):
            labels = self.labels if self.case.label_kind == "index" else self.labels[:, start:stop]
            chunk = Block(self.case, self.logits[:, start:stop], labels, self.start, (start, stop))
            yield chunk
            # a memory-mapped row's pages need not stay resident once a chunk is done (a
            # block of rounded copies holds no pages of the input)
            for given, view in ((self.case.logits, chunk.logits), (self.case.labels, labels)):
                if np.may_share_memory(given, view):
                    release_pages(given, view)

    def per_class(self, values: FloatArray) -> FloatArray:
        """Per-class ``values`` (class weights, pos_weight) for this block's classes."""
        values = np.asarray(values)
        if self.columns is None or values.ndim == 0 or values.shape[-1] != self.case.classes:
            return values
        return values[..., self.columns[0]:self.columns[1]]

    def softmax_coefficients(self) -> FloatArray:
        """The block's coefficients a[i, c] (:func:`~xentcheck.case.softmax_coefficients`)."""
        return softmax_coefficients(self.case, self.labels, self.columns)

    @cached_property
    def valid(self) -> FloatArray:
        """``(N,)``: rows that count."""
        return valid_rows(self.case, self.labels)

    @cached_property
    def valid_elements(self) -> FloatArray:
        """``(N, K)`` for sigmoid: targets that count."""
        return valid_elements(self.case, self.labels)

    @cached_property
    def target_mask(self) -> FloatArray:
        """``(N, C)``: True at each row's target class (integer labels). Built once per block:
        the textbook pipelines' forward and backward passes all ask for it."""
        mask = np.zeros(self.logits.shape, dtype=bool)
        start, stop = self.columns or (0, self.logits.shape[-1])
        rows = np.flatnonzero((self.target >= start) & (self.target < stop))
        mask[rows, self.target[rows] - start] = True
        return mask

    @cached_property
    def target(self) -> FloatArray:
        """Integer labels with ignored rows pointed at class 0 (their losses are dropped)."""
        labels = np.asarray(self.labels).astype(np.int64)
        return np.where(self.valid, labels, 0)


class Pipeline(ABC):
    """One formulation of the loss."""

    name: ClassVar[str]
    family: ClassVar[str]
    from_logits: ClassVar[bool]
    formula: ClassVar[str]
    stages: ClassVar[tuple[str, ...]]

    @abstractmethod
    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        """Per-example losses in the storage dtype, zero at positions that do not count.

        Softmax: shape ``(N,)``; sigmoid: ``(N, K)``.
        """

    def backward(self, run: StageRunner, block: Block, upstream: float,
                 saved: Saved | None = None) -> FloatArray | None:
        """The gradient of the loss with respect to the inputs, ``(N, C)`` in D, computed as
        automatic differentiation of this formulation computes it; None where the
        formulation has no gradient to check (probability inputs). ``saved`` holds the
        forward values :meth:`per_example` kept for this block; missing ones are recomputed."""
        return None

    @property
    def all_stages(self) -> tuple[str, ...]:
        return (*self.stages, "reduce")


# -- softmax family --------------------------------------------------------------------------

_NLL_STAGES = ("gather", "weight", "smooth", "nll")


def _softmax_nll(run: StageRunner, block: Block, logp: FloatArray) -> FloatArray:
    """``-sum_c a_c log p_c`` from log-probabilities in D, in the order PyTorch computes it."""
    spec = block.case.spec
    classes = block.case.classes
    smoothing = float(spec.label_smoothing)
    weights = None
    if spec.class_weights is not None:
        weights = run.cast("cast", block.per_class(spec.class_weights)[None, :])
    if block.case.label_kind == "index":
        loss = run.negate("gather", run.gather("gather", logp, block.target))
        if weights is not None:
            # the targets' weights, as cast above (a split row's chunk holds some classes)
            target_weights = np.asarray(spec.class_weights)[block.target]
            loss = run.multiply("weight", loss, run.precision.round(target_weights))
        if smoothing:
            # F.cross_entropy: (1 - e) * nll + e / C * (-sum_c w_c log p_c)
            terms = logp if weights is None else run.multiply("smooth", logp, weights)
            smooth = run.negate("smooth", run.sum("smooth", terms))
            loss = run.add(
                "smooth",
                run.multiply("smooth", loss, 1.0 - smoothing),
                run.multiply("smooth", smooth, smoothing / classes),
            )
    else:
        target = run.cast("cast", block.labels)
        if smoothing:
            target = run.add("smooth", run.multiply("smooth", target, 1.0 - smoothing),
                             smoothing / classes)
        if weights is not None:
            target = run.multiply("weight", target, weights)
        loss = run.negate("nll", run.sum("nll", run.multiply("nll", target, logp)))
    return run.select("nll", block.valid, loss, 0.0)


def _textbook_critical(block: Block) -> FloatArray:
    """Where a formulation that logs every probability needs that probability positive.

    ``-sum(y * log(p))`` takes the log of every class, and ``0 * log(0)`` is NaN, so with
    one-hot or probability labels or label smoothing every probability matters; with plain
    integer labels only the target's does.
    """
    case = block.case
    if case.label_kind == "index" and not case.spec.label_smoothing:
        return block.target_mask
    return np.ones(block.logits.shape, dtype=bool)


def _textbook_softmax_nll(run: StageRunner, block: Block, z: FloatArray) -> FloatArray:
    """``p = exp(z) / sum(exp(z))``, then ``-sum(y * log(p))``: naive (z = x) and shifted
    (z = x - max x) differ only in what they exponentiate."""
    critical = _textbook_critical(block)
    e = run.save("exp", run.exp("exp", z, critical=critical))
    s = run.save("sum", run.sum("sum", e, keepdims=True))
    p = run.save("divide", run.divide("divide", e, s, critical=critical))
    return _softmax_nll(run, block, run.log("log", p, where=critical))


class SoftmaxNaive(Pipeline):
    name = "naive"
    family = "softmax"
    from_logits = True
    formula = "p = exp(x) / sum(exp(x)); loss = -sum(y * log(p))"
    stages = ("cast", "exp", "sum", "divide", "log", *_NLL_STAGES)

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        return _textbook_softmax_nll(run, block, run.cast("cast", block.logits))

    def backward(self, run: StageRunner, block: Block, upstream: float,
                 saved: Saved | None = None) -> FloatArray | None:
        return _softmax_backward_naive(self, run, block, upstream, saved or {})


class SoftmaxShifted(Pipeline):
    name = "shifted"
    family = "softmax"
    from_logits = True
    formula = "p = exp(x - max x) / sum(exp(x - max x)); loss = -sum(y * log(p))"
    stages = ("cast", "shift", "exp", "sum", "divide", "log", *_NLL_STAGES)

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        x = run.save("cast", run.cast("cast", block.logits))
        return _textbook_softmax_nll(run, block, run.subtract("shift", x, run.max("shift", x)))

    def backward(self, run: StageRunner, block: Block, upstream: float,
                 saved: Saved | None = None) -> FloatArray | None:
        return _softmax_backward_shifted(self, run, block, upstream, saved or {})


class SoftmaxStable(Pipeline):
    name = "stable"
    family = "softmax"
    from_logits = True
    formula = "z = x - max x; log_softmax = z - log(sum(exp(z))); loss = -sum(y * log_softmax)"
    stages = ("cast", "shift", "exp", "sum", "log", "log_softmax", *_NLL_STAGES)

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        x = run.cast("cast", block.logits)
        z = run.subtract("shift", x, run.max("shift", x))
        log_sum = run.log("log", run.sum("sum", run.exp("exp", z), keepdims=True))
        log_softmax = run.save("log_softmax", run.subtract("log_softmax", z, log_sum))
        return _softmax_nll(run, block, log_softmax)

    def backward(self, run: StageRunner, block: Block, upstream: float,
                 saved: Saved | None = None) -> FloatArray | None:
        return _softmax_backward_stable(self, run, block, upstream, saved or {})


def _normalised_probabilities(run: StageRunner, block: Block, critical: FloatArray) -> FloatArray:
    """Keras' first step for probability inputs: rows divided by their sum."""
    given_positive = np.asarray(block.logits) > 0  # a given zero is exact, not an underflow
    p = run.cast("cast", block.logits, critical=critical & given_positive)
    total = run.sum("sum", p, keepdims=True)
    return run.divide("normalize", p, total, critical=critical & given_positive)


class SoftmaxProbabilitiesNaive(Pipeline):
    name = "naive"
    family = "softmax"
    from_logits = False
    formula = "p = p / sum(p); loss = -sum(y * log(p))"
    stages = ("cast", "sum", "normalize", "log", *_NLL_STAGES)

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        critical = _textbook_critical(block)
        p = _normalised_probabilities(run, block, critical)
        return _softmax_nll(run, block, run.log("log", p, where=critical))


class SoftmaxProbabilitiesClipped(Pipeline):
    name = "clipped"
    family = "softmax"
    from_logits = False
    formula = "p = clip(p / sum(p), 1e-7, 1 - 1e-7); loss = -sum(y * log(p))  (Keras)"
    stages = ("cast", "sum", "normalize", "clip", "log", *_NLL_STAGES)

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        critical = _textbook_critical(block)
        p = _normalised_probabilities(run, block, critical)
        p = run.clip("clip", p, KERAS_EPSILON, 1.0 - KERAS_EPSILON, critical=critical)
        return _softmax_nll(run, block, run.log("log", p, where=critical))


# -- sigmoid family --------------------------------------------------------------------------

_BINARY_STAGES = ("combine", "weight", "nll")


def _binary_weights(run: StageRunner, block: Block) -> tuple[FloatArray | None, FloatArray | None]:
    spec = block.case.spec
    pos = None if spec.pos_weight is None else run.cast("cast", block.per_class(spec.pos_weight))
    weights = None if spec.class_weights is None else run.cast(
        "cast", block.per_class(spec.class_weights))
    return pos, weights


def _binary_from_logs(
    run: StageRunner, block: Block, target: FloatArray, log_s: FloatArray, log_q: FloatArray
) -> FloatArray:
    """``-(pw z log s + (1 - z) log(1 - s))``, then the element weight."""
    pos_weight, weights = _binary_weights(run, block)
    positive = run.multiply("combine", target, log_s)
    if pos_weight is not None:
        positive = run.multiply("combine", positive, pos_weight)
    negative = run.multiply("combine", run.subtract("combine", 1.0, target), log_q)
    loss = run.negate("combine", run.add("combine", positive, negative))
    if weights is not None:
        loss = run.multiply("weight", loss, weights)
    return run.select("nll", block.valid_elements, loss, 0.0)


class SigmoidNaive(Pipeline):
    name = "naive"
    family = "sigmoid"
    from_logits = True
    formula = "s = 1 / (1 + exp(-x)); loss = -(z log(s) + (1 - z) log(1 - s))"
    stages = ("cast", "exp", "add", "divide", "complement", "log", *_BINARY_STAGES)

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        # Both logs are taken everywhere and 0 * log(0) is NaN: every s and 1 - s matters.
        critical = block.valid_elements
        x = run.cast("cast", block.logits)
        target = run.cast("cast", block.labels)
        e = run.save("exp", run.exp("exp", run.negate("exp", x)))
        d = run.save("add", run.add("add", 1.0, e))
        s = run.save("divide", run.divide("divide", 1.0, d, critical=critical))
        q = run.save("complement", run.subtract("complement", 1.0, s, critical=critical))
        return _binary_from_logs(
            run, block, target, run.log("log", s, where=critical), run.log("log", q, where=critical)
        )

    def backward(self, run: StageRunner, block: Block, upstream: float,
                 saved: Saved | None = None) -> FloatArray | None:
        return _sigmoid_backward_naive(self, run, block, upstream, saved or {})


class SigmoidStable(Pipeline):
    name = "stable"
    family = "sigmoid"
    from_logits = True
    formula = "max(x, 0) - x z + log1p(exp(-|x|))  (with pos_weight: TF/PyTorch weighted form)"
    stages = ("cast", "relu", "product", "exp", "log1p", "combine", "weight", "nll")

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        x = run.cast("cast", block.logits)
        target = run.cast("cast", block.labels)
        pos_weight, weights = _binary_weights(run, block)
        softplus_tail = run.log1p("log1p", run.exp("exp", run.negate("exp", run.abs("exp", x))))
        if pos_weight is None:
            loss = run.add(
                "combine",
                run.subtract("combine", run.maximum("relu", x, 0.0),
                             run.multiply("product", x, target)),
                softplus_tail,
            )
        else:
            # (1 - z) x + (1 + (pw - 1) z) (log1p(exp(-|x|)) + max(-x, 0))
            log_weight = run.add(
                "product", 1.0,
                run.multiply("product", run.subtract("product", pos_weight, 1.0), target),
            )
            loss = run.add(
                "combine",
                run.multiply("product", run.subtract("product", 1.0, target), x),
                run.multiply(
                    "combine", log_weight,
                    run.add("combine", softplus_tail,
                            run.maximum("relu", run.negate("relu", x), 0.0)),
                ),
            )
        if weights is not None:
            loss = run.multiply("weight", loss, weights)
        return run.select("nll", block.valid_elements, loss, 0.0)

    def backward(self, run: StageRunner, block: Block, upstream: float,
                 saved: Saved | None = None) -> FloatArray | None:
        return _sigmoid_backward_stable(self, run, block, upstream, saved or {})


class SigmoidProbabilitiesNaive(Pipeline):
    name = "naive"
    family = "sigmoid"
    from_logits = False
    formula = "loss = -(z log(p) + (1 - z) log(1 - p))"
    stages = ("cast", "complement", "log", *_BINARY_STAGES)

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        critical = block.valid_elements
        given = np.asarray(block.logits)
        p = run.cast("cast", given, critical=critical & (given > 0))
        target = run.cast("cast", block.labels)
        q = run.subtract("complement", 1.0, p, critical=critical & (given < 1))
        return _binary_from_logs(
            run, block, target, run.log("log", p, where=critical), run.log("log", q, where=critical)
        )


class SigmoidProbabilitiesClipped(Pipeline):
    name = "clipped"
    family = "sigmoid"
    from_logits = False
    formula = "p = clip(p, 1e-7, 1 - 1e-7); loss = -(z log(p) + (1 - z) log(1 - p))  (Keras)"
    stages = ("cast", "clip", "complement", "log", *_BINARY_STAGES)

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        critical = block.valid_elements
        p = run.cast("cast", block.logits)
        target = run.cast("cast", block.labels)
        p = run.clip("clip", p, KERAS_EPSILON, 1.0 - KERAS_EPSILON, critical=critical)
        q = run.subtract("complement", 1.0, p, critical=critical)
        return _binary_from_logs(
            run, block, target, run.log("log", p, where=critical), run.log("log", q, where=critical)
        )


# -- the batch reduction and the registry ----------------------------------------------------


def reduce_losses(
    run: StageRunner, per_example: FloatArray, reduction: str, denominator: float
) -> FloatArray:
    """The batch reduction every pipeline shares: accumulate, divide for ``mean``, round to D.

    ``mean`` is one rounding of ``sum / denominator`` evaluated in the accumulate dtype, as
    ``torch.mean`` and ``nll_loss`` do for half tensors; ``sum`` rounds the sum to D (so a
    float16 sum of 100,000 ones is inf).
    """
    if reduction == "none":
        return per_example
    flat = np.asarray(per_example).reshape(-1)
    run.bind(np.ones(1, dtype=bool))
    total = run.accumulate(flat)
    if reduction == "mean":
        with np.errstate(all="ignore"):
            total = total / np.asarray(denominator, dtype=total.dtype)
    out = run.precision.round(total)
    run.watch_reduction("reduce", out, flat)
    return out


PIPELINES: tuple[Pipeline, ...] = (
    SoftmaxNaive(),
    SoftmaxShifted(),
    SoftmaxStable(),
    SoftmaxProbabilitiesNaive(),
    SoftmaxProbabilitiesClipped(),
    SigmoidNaive(),
    SigmoidStable(),
    SigmoidProbabilitiesNaive(),
    SigmoidProbabilitiesClipped(),
)


def available(family: str, from_logits: bool) -> tuple[Pipeline, ...]:
    """The pipelines that apply to a loss family and input kind, in display order."""
    return tuple(p for p in PIPELINES if p.family == family and p.from_logits == from_logits)


def select(family: str, from_logits: bool, names: list[str] | None) -> tuple[Pipeline, ...]:
    """The named pipelines (all applicable ones when ``names`` is empty or None)."""
    choices = available(family, from_logits)
    if not names:
        return choices
    by_name = {p.name: p for p in choices}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        kind = "logits" if from_logits else "probabilities"
        raise UsageError(
            f"unknown pipeline {unknown[0]!r} for {family} {kind}; "
            f"choose from {', '.join(by_name)}"
        )
    return tuple(by_name[n] for n in dict.fromkeys(names))


# -- backward passes ---------------------------------------------------------------------------
#
# Each formulation's gradient with respect to its logits, computed the way automatic
# differentiation of that formulation computes it (PyTorch's backward formulas, in D):
# the textbook softmax differentiates through log and the division, so a probability that
# underflowed to 0 becomes 0 * inf = NaN; the fused log-softmax and BCE-with-logits kernels
# use their closed forms (softmax - target, sigmoid - target). ``upstream`` is d(loss) /
# d(per-example loss): 1 / denominator for ``mean``, 1 otherwise. Forward values come from
# the forward pass of the same block (``saved``) or are recomputed with an unwatched runner;
# the backward runner watches only the gradient.


def _quiet(run: StageRunner, pipeline: Pipeline, block: Block) -> StageRunner:
    """A runner for recomputing forward values: same precision, its events discarded."""
    return run.unwatched(pipeline.all_stages)


def _softmax_coefficients_in(run: StageRunner, block: Block) -> FloatArray:
    """The loss's coefficients a[i, c] (weights, smoothing, labels) stored in D."""
    return run.precision.round(block.softmax_coefficients())


def _textbook_forward(fwd: StageRunner, z: Callable[[], FloatArray],
                      saved: Saved) -> tuple[FloatArray, FloatArray, FloatArray]:
    """``e = exp(z)``, ``s = sum(e)``, ``p = e / s``: kept by the forward pass, or recomputed."""
    if all(name in saved for name in ("exp", "sum", "divide")):
        return saved["exp"], saved["sum"], saved["divide"]
    e = fwd.exp("exp", z())
    s = fwd.sum("sum", e, keepdims=True)
    return e, s, fwd.divide("divide", e, s)


def _textbook_softmax_backward(
    run: StageRunner, fwd: StageRunner, block: Block, forward: tuple[FloatArray, ...],
    upstream: float,
) -> FloatArray:
    critical = _textbook_critical(block)
    e, s, p = forward
    grad_logp, _ = _nll_backward(run, block, upstream, need_total=False)
    # log's backward: g / p, only where the formulation took the log
    grad_p = np.where(critical, run.divide("log", grad_logp, p, blame=[grad_logp],
                                           where=critical), 0.0)
    grad_p = run.precision.round(grad_p)
    # p = e / s: d/de = g / s; d/ds = -sum(g e / s^2) (PyTorch's div backward)
    grad_e = run.divide("divide", grad_p, s, blame=[grad_p])
    ratio = run.divide("divide", run.multiply("divide", grad_p, e, blame=[grad_p]),
                       fwd.multiply("divide", s, s), blame=[grad_p])
    grad_s = run.negate("divide", run.sum("divide", ratio, keepdims=True))
    grad_e = run.add("sum", grad_e, grad_s, blame=[grad_e, grad_s])
    return run.multiply("exp", grad_e, e, blame=[grad_e])  # exp's backward: g * exp(z)


def _softmax_backward_naive(self: Pipeline, run: StageRunner, block: Block,
                            upstream: float, saved: Saved) -> FloatArray:
    fwd = _quiet(run, self, block)
    forward = _textbook_forward(fwd, lambda: fwd.cast("cast", block.logits), saved)
    return _textbook_softmax_backward(run, fwd, block, forward, upstream)


def _softmax_backward_shifted(self: Pipeline, run: StageRunner, block: Block,
                              upstream: float, saved: Saved) -> FloatArray:
    fwd = _quiet(run, self, block)
    x = saved["cast"] if "cast" in saved else fwd.cast("cast", block.logits)
    forward = _textbook_forward(fwd, lambda: fwd.subtract("shift", x, fwd.max("shift", x)),
                                saved)
    grad_z = _textbook_softmax_backward(run, fwd, block, forward, upstream)
    # z = x - max(x): x gets grad_z, and the max's position also gets -sum(grad_z)
    top = run.argmax("shift", x)
    back = run.negate("shift", run.sum("shift", grad_z))
    return run.add("shift", grad_z, run.scatter("shift", grad_z.shape, top, back),
                   blame=[grad_z, back[:, None]])


def _nll_backward(run: StageRunner, block: Block, upstream: float, *,
                  need_total: bool = True) -> tuple[FloatArray, FloatArray | None]:
    """d loss / d log p in D, ``(N, C)``, and (``need_total``) its row sums ``(N, 1)``.

    With integer labels the gradient has one non-zero entry per row, ``-a_t upstream``: it is
    formed on the targets alone and scattered, and its row sum is that entry exactly, unless
    a product is not finite (then the dense steps run, so the event is located as usual).
    """
    case = block.case
    if case.label_kind == "index" and not case.spec.label_smoothing:
        coef = run.precision.round(target_coefficients(case, block.labels))
        with np.errstate(all="ignore"):
            at_target = run.precision.round(
                coef.astype(run.precision.compute_dtype) * -upstream)
        if run.precision.all_finite(at_target):
            grad = run.scatter("nll", block.logits.shape, block.target, at_target)
            return grad, at_target[:, None]
    grad = run.multiply("nll", _softmax_coefficients_in(run, block), -upstream)
    return grad, run.sum("log_softmax", grad, keepdims=True) if need_total else None


def _softmax_backward_stable(self: Pipeline, run: StageRunner, block: Block,
                             upstream: float, saved: Saved) -> FloatArray:
    fwd = _quiet(run, self, block)
    log_softmax = saved.get("log_softmax")
    if log_softmax is None:
        x = fwd.cast("cast", block.logits)
        z = fwd.subtract("shift", x, fwd.max("shift", x))
        log_softmax = fwd.subtract("log_softmax", z, fwd.log("log", fwd.sum(
            "sum", fwd.exp("exp", z), keepdims=True)))
    # log_softmax's backward: g - exp(log_softmax) * sum(g)
    grad, total = _nll_backward(run, block, upstream)
    assert total is not None
    softmax = fwd.exp("log_softmax", log_softmax)
    return run.subtract("log_softmax", grad,
                        run.multiply("log_softmax", softmax, total, blame=[total]),
                        blame=[grad])


def _binary_parts(run: StageRunner, block: Block, upstream: float) -> tuple[
        FloatArray, FloatArray, FloatArray]:
    """Targets, pos_weight (1 when absent) and the upstream gradient times the weights."""
    spec = block.case.spec
    target = run.precision.round(np.asarray(block.labels, dtype=np.float64))
    pos = run.precision.round(np.float64(1.0) if spec.pos_weight is None
                              else block.per_class(spec.pos_weight).astype(np.float64))
    scale = np.where(block.valid_elements, upstream, 0.0)
    if spec.class_weights is not None:
        scale = scale * block.per_class(spec.class_weights).astype(np.float64)
    return target, pos, run.precision.round(scale)


def _sigmoid_backward_naive(self: Pipeline, run: StageRunner, block: Block,
                            upstream: float, saved: Saved) -> FloatArray:
    fwd = _quiet(run, self, block)
    if all(name in saved for name in ("exp", "add", "divide", "complement")):
        e, d, s, q = saved["exp"], saved["add"], saved["divide"], saved["complement"]
    else:
        x = fwd.cast("cast", block.logits)
        e = fwd.exp("exp", fwd.negate("exp", x))
        d = fwd.add("add", 1.0, e)
        s = fwd.divide("divide", 1.0, d)
        q = fwd.subtract("complement", 1.0, s)
    target, pos, scale = _binary_parts(run, block, upstream)
    grad_loss = run.negate("combine", scale, blame=[scale])
    grad_log_s = run.multiply("combine", run.multiply("combine", grad_loss, target,
                                                      blame=[grad_loss]), pos, blame=[grad_loss])
    grad_log_q = run.multiply("combine", grad_loss, run.subtract("combine", 1.0, target),
                              blame=[grad_loss])
    grad_s = run.divide("log", grad_log_s, s, blame=[grad_log_s])
    grad_q = run.divide("log", grad_log_q, q, blame=[grad_log_q])
    grad_s = run.subtract("complement", grad_s, grad_q, blame=[grad_s, grad_q])
    # s = 1 / d: d/dd = -g / d^2; d = 1 + e; e = exp(-x): d/dx = -g e
    grad_d = run.negate("divide", run.divide("divide", grad_s, fwd.multiply("divide", d, d),
                                             blame=[grad_s]))
    return run.negate("exp", run.multiply("exp", grad_d, e, blame=[grad_d]))


def _sigmoid_backward_stable(self: Pipeline, run: StageRunner, block: Block,
                             upstream: float, saved: Saved) -> FloatArray:
    fwd = _quiet(run, self, block)
    x = fwd.cast("cast", block.logits)
    target, pos, scale = _binary_parts(run, block, upstream)
    # BCE-with-logits backward: (sigmoid(x) (pw z + 1 - z) - pw z) g
    sig = fwd.divide("combine", 1.0, fwd.add("combine", 1.0, fwd.exp(
        "exp", fwd.negate("exp", x))))
    pz = fwd.multiply("combine", pos, target)
    factor = fwd.subtract("combine", fwd.add("combine", pz, 1.0), target)
    grad = fwd.subtract("combine", fwd.multiply("combine", sig, factor), pz)
    return run.multiply("weight", grad, scale, blame=[grad, scale])
