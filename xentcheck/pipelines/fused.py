"""``fused``: a one-pass cross-entropy kernel that loads D and computes in float32.

What torch.compile's Inductor generates on CPU for ``F.cross_entropy`` (the decompositions
``_log_softmax``, ``nll_loss_forward`` and ``_log_softmax_backward_data`` of
``torch/_decomp/decompositions.py``, fused into C++ loops), and what Liger-Kernel's and Cut
Cross-Entropy's Triton kernels and CUDA's eager log-softmax compute per row: 16-bit inputs
are converted to float32 as they are loaded, and nothing is stored in D until the output.

Per row, in float32 (the compute dtype; D itself for float32 and float64)::

    m = max x;  s = sum exp(x - m);  lse = log s;  log_softmax = (x - m) - lse
    loss = -log_softmax[t] * w[t]                                   (integer labels)
         = (1 - e) loss + e / C * (-sum_c log_softmax_c w_c)          (label smoothing e)
         = -sum_c log_softmax_c ((1 - e) y_c + e / C) w_c             (dense labels)

``reduction='none'`` stores each loss in D: one rounding. A reduced loss is formed from the
float32 losses, never stored: their float32 sum is stored in D (a kernel's reduction
buffer has the output's dtype), and ``mean`` divides it by the denominator, itself stored
in D (the count, or the sum of the targets' weights: a bfloat16 mean over 257 rows divides
by 256; Inductor divides a dense-label mean by the batch size as a float32 constant
instead, not modelled); the quotient is rounded to D. The gradient is
``g - exp(log_softmax) * sum(g)`` in float32, ``g = -a * upstream`` (``a`` the
coefficients of the loss above, ``upstream`` = 1 / the denominator in float32), rounded to
D once. The measured differences from Inductor (the
float32 ``exp``/``log`` are SLEEF's there, its sums run lane by lane; label smoothing's
two reductions are stored separately) are in ``docs/frameworks-fused.md``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..case import Case
from ..precision import FloatArray, Precision
from ..stages import StageRunner
from .base import Block, Pipeline, Saved


def _constant(run: StageRunner, value: float) -> FloatArray:
    """A Python number as a kernel holds it: a constant of the compute dtype."""
    return np.asarray(value, dtype=run.precision.compute_dtype)


def _stored(run: StageRunner, values: FloatArray) -> FloatArray:
    """An input tensor of D (weights, dense labels) as the kernel loads it: D's values."""
    return run.precision.round(np.asarray(values, dtype=np.float64))


class SoftmaxFused(Pipeline):
    name = "fused"
    default = False
    framework = True
    fp8_note = "the fused kernels' float8 paths are not emulated"
    splittable = False  # not yet written to the replay contract
    family = "softmax"
    from_logits = True
    formula = ("float32: z = x - max x; log_softmax = z - log(sum(exp(z))); "
               "loss = -sum(y * log_softmax); stored in D once")
    stages: ClassVar[tuple[str, ...]] = ("cast", "sum", "log", "log_softmax", "nll")

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        x = run.cast("cast", block.logits)
        log_softmax = run.save("log_softmax", self._log_softmax(run, block, x))
        return self._output(run, block, self._loss(run, block, log_softmax))

    @staticmethod
    def _output(run: StageRunner, block: Block, loss: FloatArray) -> FloatArray:
        """The float32 losses as the kernel leaves them: ignored rows 0, stored in D for
        ``reduction='none'``."""
        keep = block.valid
        if block.case.spec.reduction == "none":
            # the kernel's output: each loss stored in D, one rounding
            return run.fused("nll", lambda v: np.where(keep, v, 0), loss)
        # a reduced loss never stores the per-example losses: they stay float32
        return run.fused("nll", lambda v: np.where(keep, v, 0), loss, round_result=False)

    def _log_softmax(self, run: StageRunner, block: Block, x: FloatArray) -> FloatArray:
        """The float32 log-softmax of the cast logits ``x``, kept in registers (a subclass
        forms the log-sum-exp its own way: :mod:`.large_vocab`)."""
        top = run.max("sum", x)
        # watched as a row sum (one value per row), then kept as a trailing axis
        total = run.fused("sum", lambda a, m: np.sum(np.exp(a - m), axis=-1),
                          x, top, round_result=False, reduced_axis=-1)[:, None]
        lse = run.fused("log", np.log, total, round_result=False, pole="log_of_zero",
                        pole_operand=total)
        return run.fused("log_softmax", lambda a, m, s: (a - m) - s, x, top, lse,
                         round_result=False)

    @staticmethod
    def _loss(run: StageRunner, block: Block, log_softmax: FloatArray) -> FloatArray:
        """The float32 loss of each row, in the decompositions' order of operations."""
        case = block.case
        spec = case.spec
        smoothing = float(spec.label_smoothing)
        weights = None if spec.class_weights is None else _stored(run, spec.class_weights)
        if case.label_kind == "index":
            target = block.target

            def nll(lsm: FloatArray) -> FloatArray:
                picked = np.take_along_axis(lsm, target[:, None], axis=-1)[:, 0]
                if weights is not None:
                    picked = picked * weights.astype(lsm.dtype)[target]
                loss = -picked
                if smoothing:
                    terms = lsm if weights is None else lsm * weights.astype(lsm.dtype)
                    smooth = -np.sum(terms, axis=-1)
                    loss = (loss * _constant(run, 1.0 - smoothing)
                            + smooth * _constant(run, smoothing / case.classes))
                return loss

            return run.fused("nll", nll, log_softmax, round_result=False, reduced_axis=-1)
        labels = _stored(run, block.labels)

        def dense(lsm: FloatArray, y: FloatArray) -> FloatArray:
            if smoothing:
                y = (y * _constant(run, 1.0 - smoothing)
                     + _constant(run, smoothing / case.classes))
            terms = lsm * y
            if weights is not None:
                terms = terms * weights.astype(lsm.dtype)
            return -np.sum(terms, axis=-1)

        return run.fused("nll", dense, log_softmax, labels, round_result=False,
                         reduced_axis=-1)

    def reduce(self, run: StageRunner, per_example: FloatArray, reduction: str,
               denominator: float, case: Case | None = None) -> FloatArray:
        """The float32 sum of the float32 losses, stored in D; ``mean`` divides by the
        denominator (stored in D for integer labels) and rounds again."""
        if reduction == "none":
            return per_example
        flat = np.asarray(per_example).reshape(-1)
        run.bind(np.ones(1, dtype=bool))
        compute = run.precision.compute_dtype
        with np.errstate(all="ignore"):
            total = run.precision.round(np.sum(flat.astype(compute, copy=False)))
            if reduction == "mean":
                divisor = _divisor(run.precision, denominator)
                total = run.precision.round(total.astype(compute) / divisor)
        out = run.precision.round(total)
        run.watch_reduction("reduce", out, flat)
        return out

    def reduction_gradient(self, precision: Precision, reduction: str,
                           denominator: float) -> float:
        """``1 / denominator`` in float32 (the compute dtype), the denominator stored as
        :meth:`reduce` stores it; not rounded to D (Inductor's backward kernel divides the
        upstream gradient by the stored total weight in registers)."""
        if reduction != "mean":
            return 1.0
        if denominator == 0:
            return 0.0
        divisor = _divisor(precision, denominator)
        with np.errstate(all="ignore"):
            return float(np.asarray(1.0, dtype=precision.compute_dtype) / divisor)

    def backward(self, run: StageRunner, block: Block, upstream: float,
                 saved: Saved | None = None) -> FloatArray | None:
        """``g - exp(log_softmax) * sum(g)`` in float32, rounded to D once."""
        saved = saved or {}
        log_softmax = saved.get("log_softmax")
        if log_softmax is None:
            quiet = StageRunner(run.precision, self.all_stages).bind(
                run.valid_rows, run.row_offset)
            log_softmax = self._log_softmax(quiet, block, quiet.cast("cast", block.logits))
        compute = run.precision.compute_dtype
        scale = np.asarray(upstream, dtype=compute)
        case = block.case
        ignored = ~block.valid if case.label_kind == "index" else None
        if case.label_kind == "index" and not case.spec.label_smoothing:
            # one non-zero g per row, at the target: sum(g) is that entry exactly, and every
            # other entry is 0 - p * sum(g) = -(p * sum(g)); formed on the targets alone
            rows = np.arange(len(block.target))
            weights = (np.ones(case.classes, dtype=compute) if case.spec.class_weights is None
                       else _stored(run, case.spec.class_weights).astype(compute))
            at_target = np.where(block.valid, weights[block.target], np.zeros((), compute))

            def sparse_gradient(lsm: FloatArray) -> FloatArray:
                p = np.exp(lsm)
                g = -(at_target * scale)
                out = p * -g[:, None]  # -(p * g), the sign exact
                out[rows, block.target] = g - p[rows, block.target] * g
                return _signed_zeros_of_ignored(out, ignored)

            return run.fused("log_softmax", sparse_gradient, log_softmax, blame=[])

        coefficients = _coefficients(run.precision, block)

        def gradient(lsm: FloatArray, a: FloatArray) -> FloatArray:
            g = -(a * scale)
            out = g - np.exp(lsm) * np.sum(g, axis=-1, keepdims=True)
            return _signed_zeros_of_ignored(out, ignored)

        return run.fused("log_softmax", gradient, log_softmax, coefficients, blame=[])


def _signed_zeros_of_ignored(out: FloatArray, ignored: FloatArray | None) -> FloatArray:
    """An ignored row's gradient as Inductor stores it: its upstream gradient is
    ``where(valid, ., 0.0)``, +0, times the one-hot's -1 at its stand-in target, class 0:
    -0 there, +0 elsewhere."""
    if ignored is not None and ignored.any():
        out[ignored] = 0.0
        out[ignored, 0] = -0.0
    return out


def _divisor(precision: Precision, denominator: float) -> FloatArray:
    """The mean's divisor as the kernel holds it: the count (or total weight) stored in D,
    in the compute dtype. (Inductor divides a dense-label mean by the batch size as a
    float32 constant instead; the interface gives a reduction no label kind: documented.)"""
    compute = precision.compute_dtype
    with np.errstate(all="ignore"):
        return np.asarray(precision.round(np.float64(denominator)), dtype=compute)


def _coefficients(precision: Precision, block: Block) -> FloatArray:
    """``a[i, c]`` of ``loss_i = -sum_c a[i, c] log_softmax[i, c]`` in the compute dtype,
    from the weights and labels stored in D, formed as the backward kernel forms them."""
    case = block.case
    compute = precision.compute_dtype
    spec = case.spec
    smoothing = float(spec.label_smoothing)
    weights = (np.ones(case.classes, dtype=compute) if spec.class_weights is None
               else _stored_in(precision, spec.class_weights).astype(compute))
    if case.label_kind == "index":
        keep = block.valid
        coef = np.zeros(block.logits.shape, dtype=compute)
        np.put_along_axis(coef, block.target[:, None],
                          (weights[block.target] * np.asarray(1.0 - smoothing, dtype=compute)
                           if smoothing else weights[block.target])[:, None], -1)
        if smoothing:
            coef = coef + np.asarray(smoothing / case.classes, dtype=compute) * weights
        return np.where(keep[:, None], coef, np.zeros((), dtype=compute))
    y = _stored_in(precision, block.labels).astype(compute)
    if smoothing:
        y = (y * np.asarray(1.0 - smoothing, dtype=compute)
             + np.asarray(smoothing / case.classes, dtype=compute))
    return y * weights


def _stored_in(precision: Precision, values: FloatArray) -> FloatArray:
    return precision.round(np.asarray(values, dtype=np.float64))
