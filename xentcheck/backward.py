"""Backward passes: each formulation's gradient with respect to its logits, as autodiff computes it.

The textbook formulations (softmax ``naive`` and ``shifted``, sigmoid ``naive``) are
differentiated the way PyTorch's autograd differentiates the torch code they stand for, op
for op, every op's result rounded to the storage dtype D (PyTorch's ``derivatives.yaml`` and
``FunctionsManual.cpp``):

============================  ===============================================================
forward op                    gradient(s) of the operand(s)
============================  ===============================================================
``exp(z)``                    ``grad * result``
``log(p)``                    ``grad / p``
``a / b``                     ``grad / b``; ``-grad * ((a / b) / b)``, summed over a
                              broadcast ``b``
``1 / d`` (``reciprocal``)    ``-grad * (result * result)`` (Python's ``1 / t`` is
                              ``t.reciprocal() * 1``)
``e.sum(-1, keepdim=True)``   ``grad`` expanded
``x - m`` (``m = x.max(-1)``) ``grad``; ``-grad`` summed over the row, scattered to the first
                              maximum (``max``'s backward)
``a * b``, ``-a``, ``1 - a``  ``grad * b``; ``-grad``; ``-grad``
``gather``                    ``zeros.scatter_add(grad)``
``where(valid, l, 0)``        ``where(valid, grad, 0)``
============================  ===============================================================

The torch code each textbook pipeline stands for, and the script that records what torch
computes for it, are in ``tests/fixtures/record_torch_textbook_gradients.py``; the fixture it
writes pins these passes bit for bit. So ``b * b`` never appears (it overflows in float16
once a softmax denominator passes 256), and a probability that underflowed to 0 gives
``0 / 0 = NaN`` where the log's gradient is formed, as in PyTorch.

The fused formulations (softmax ``stable``: log-softmax's ``g - softmax * sum(g)``; sigmoid
``stable``: BCE-with-logits' ``(sigmoid(x) (pw z + 1 - z) - pw z) g``) use their kernels'
closed forms. ``upstream`` is the gradient of the reduced loss with respect to each
per-example loss, already in D (:func:`reduction_gradient`). Forward values come from the
forward pass of the same block (``saved``) or are recomputed with an unwatched runner; the
backward runner watches only the gradient, and each step names the forward stage whose
backward it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .case import target_coefficients
from .precision import FloatArray, Operand, Precision
from .stages import StageEvent, StageRunner

if TYPE_CHECKING:
    from .pipelines import Block, Pipeline, Saved


def reduction_gradient(precision: Precision, reduction: str, denominator: float) -> float:
    """d(reduced loss) / d(per-example loss), in D, as autograd forms it.

    The reduction accumulates in the accumulate dtype A and rounds once
    (``(loss.to(A).sum() / denominator).to(D)``): the backward of ``mean`` is
    ``1 / denominator`` evaluated in A (the denominator stored in A first) and rounded to
    D; ``sum`` and ``none`` pass 1.
    """
    if reduction != "mean":
        return 1.0
    if denominator == 0:
        # nothing counted (every row ignored): nll_loss's backward writes no row, so every
        # entry stays 0; no example has a gradient to scale
        return 0.0
    acc = precision.accumulate_dtype
    with np.errstate(all="ignore"):
        quotient = np.asarray(1.0, dtype=acc) / np.asarray(denominator, dtype=acc)
    return float(precision.round(quotient))


def _quiet(run: StageRunner, pipeline: Pipeline) -> StageRunner:
    """A runner for recomputing forward values: same precision, rows and column chunk (its
    row reductions replayed with the backward runner's), its events discarded."""
    return run.unwatched(pipeline.all_stages)


def _upstream(run: StageRunner, valid: FloatArray, upstream: float) -> FloatArray:
    """``where(valid, loss, 0)``'s backward: the upstream gradient where a loss counts."""
    return run.select("nll", valid, np.asarray(upstream, dtype=np.float64), 0.0)


# -- softmax, textbook -----------------------------------------------------------------------


def _textbook_nll_backward(run: StageRunner, block: Block, upstream: float) -> FloatArray:
    """d loss / d log p, ``(N, C)`` in D, through the NLL steps of
    :func:`xentcheck.pipelines._softmax_nll` in reverse."""
    case = block.case
    spec = case.spec
    smoothing = float(spec.label_smoothing)
    weights = target_weights = None
    if spec.class_weights is not None:
        # the block's classes' weights (a split row's chunk holds some), and the targets'
        weights = run.precision.round(block.per_class(spec.class_weights).astype(np.float64))
        if case.label_kind == "index":
            target_weights = run.precision.round(
                np.asarray(spec.class_weights, dtype=np.float64)[block.target])
    grad = _upstream(run, block.valid, upstream)  # (N,)
    if case.label_kind != "index":
        # loss = -sum(y' * logp): d/dlogp = (-g) * y', y' formed in D as the forward forms it
        target = run.precision.round(np.asarray(block.labels, dtype=np.float64))
        if smoothing:
            target = run.multiply("smooth", target, 1.0 - smoothing)
            target = run.add("smooth", target,
                             run.precision.round(np.float64(smoothing / case.classes)))
        if weights is not None:
            target = run.multiply("weight", target, weights[None, :])
        return run.multiply("nll", run.negate("nll", grad)[:, None], target,
                            blame=[grad[:, None]])
    smooth_part = None
    if smoothing:
        # loss = nll * (1 - e) + smooth * (e / C), smooth = -sum(logp * w)
        smooth = run.negate("smooth", run.multiply("smooth", grad, smoothing / case.classes))
        smooth_part = np.broadcast_to(smooth[:, None], block.logits.shape)
        if weights is not None:
            smooth_part = run.multiply("smooth", smooth_part, weights[None, :],
                                       blame=[smooth_part])
        grad = run.multiply("smooth", grad, 1.0 - smoothing)
    if target_weights is not None:
        grad = run.multiply("weight", grad, target_weights, blame=[grad])
    # loss = -gather(logp, t): gather's backward adds into zeros (-0 becomes +0)
    at_target = run.add("gather", run.negate("gather", grad), 0.0)
    grad_logp = run.scatter("gather", block.logits.shape, block.target, at_target)
    if smooth_part is not None:
        grad_logp = run.add("smooth", grad_logp, smooth_part)
    return grad_logp


def _textbook_forward(fwd: StageRunner, z: Callable[[], FloatArray],
                      saved: Saved) -> tuple[FloatArray, FloatArray, FloatArray]:
    """``e = exp(z)``, ``s = sum(e)``, ``p = e / s``: kept by the forward pass, or recomputed."""
    if all(name in saved for name in ("exp", "sum", "divide")):
        return saved["exp"], saved["sum"], saved["divide"]
    e = fwd.exp("exp", z())
    s = fwd.sum("sum", e, keepdims=True)
    return e, s, fwd.divide("divide", e, s)


def _textbook_softmax_backward(run: StageRunner, fwd: StageRunner, block: Block,
                               forward: tuple[FloatArray, FloatArray, FloatArray],
                               upstream: float) -> FloatArray:
    """d loss / d z for ``p = exp(z) / sum(exp(z))``, ``loss`` from ``log(p)``."""
    e, s, p = forward
    grad_logp = _textbook_nll_backward(run, block, upstream)
    # log(p): grad / p, everywhere (0 / 0 = NaN where a probability underflowed to 0)
    grad_p = run.divide("log", grad_logp, p, blame=[grad_logp])
    # p = e / s: e gets grad / s; s gets sum over the row of -grad * ((e / s) / s)
    # (e / s) / s, formed by the backward pass (e / s is p, the same rounding): where it
    # sinks into subnormals or to 0 the gradient reaching s is lost, as in PyTorch
    quotient = run.divide("divide", p, s, blame=[p, s])
    grad_e = run.divide("divide", grad_p, s, blame=[grad_p])
    grad_s = run.sum("divide", run.multiply("divide", run.negate("divide", grad_p), quotient,
                                            blame=[grad_p]), keepdims=True)
    # s = sum(e): grad_s expanded, added to e's other gradient
    grad_e = run.add("sum", grad_e, grad_s, blame=[grad_e, grad_s])
    return run.multiply("exp", grad_e, e, blame=[grad_e])  # exp(z): grad * result


def softmax_naive(pipeline: Pipeline, run: StageRunner, block: Block, upstream: float,
                  saved: Saved) -> FloatArray:
    """``torch.log(torch.exp(x) / torch.exp(x).sum(-1, keepdim=True))``, differentiated."""
    fwd = _quiet(run, pipeline)
    forward = _textbook_forward(fwd, lambda: fwd.cast("cast", block.logits), saved)
    return _textbook_softmax_backward(run, fwd, block, forward, upstream)


def softmax_shifted(pipeline: Pipeline, run: StageRunner, block: Block, upstream: float,
                    saved: Saved) -> FloatArray:
    """As :func:`softmax_naive` on ``x - x.max(-1, keepdim=True).values``."""
    fwd = _quiet(run, pipeline)
    x = saved["cast"] if "cast" in saved else fwd.cast("cast", block.logits)
    forward = _textbook_forward(fwd, lambda: fwd.subtract("shift", x, fwd.max("shift", x)),
                                saved)
    grad_z = _textbook_softmax_backward(run, fwd, block, forward, upstream)
    # z = x - m: x gets grad_z; m gets -grad_z summed over the row, which max's backward
    # scatters to the first maximum (torch.max's index)
    top = run.argmax("shift", x)
    back = run.sum("shift", run.negate("shift", grad_z))
    return run.add("shift", grad_z, run.scatter("shift", grad_z.shape, top, back),
                   blame=[grad_z, back[:, None]])


# -- softmax, fused --------------------------------------------------------------------------


def _nll_backward(run: StageRunner, block: Block,
                  upstream: float) -> tuple[FloatArray, FloatArray]:
    """d loss / d log_softmax in D, ``(N, C)``, and its row sums ``(N, 1)``.

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
    coefficients = run.precision.round(block.softmax_coefficients())
    grad = run.multiply("nll", coefficients, -upstream)
    return grad, run.sum("log_softmax", grad, keepdims=True)


def softmax_stable(pipeline: Pipeline, run: StageRunner, block: Block, upstream: float,
                   saved: Saved) -> FloatArray:
    """log-softmax's fused backward: ``g - exp(log_softmax) * sum(g)``."""
    fwd = _quiet(run, pipeline)
    log_softmax = saved.get("log_softmax")
    if log_softmax is None:
        x = fwd.cast("cast", block.logits)
        z = fwd.subtract("shift", x, fwd.max("shift", x))
        log_softmax = fwd.subtract("log_softmax", z, fwd.log("log", fwd.sum(
            "sum", fwd.exp("exp", z), keepdims=True)))
    grad, total = _nll_backward(run, block, upstream)
    softmax = fwd.exp("log_softmax", log_softmax)
    return run.subtract("log_softmax", grad,
                        run.multiply("log_softmax", softmax, total, blame=[total]),
                        blame=[grad])


# -- sigmoid ---------------------------------------------------------------------------------


def _binary_constants(block: Block, precision: Precision) -> tuple[
        FloatArray, FloatArray | None, FloatArray | None]:
    """Targets, pos_weight and class weights, stored in D (None: absent)."""
    spec = block.case.spec
    target = precision.round(np.asarray(block.labels, dtype=np.float64))
    pos = (None if spec.pos_weight is None
           else precision.round(block.per_class(spec.pos_weight).astype(np.float64)))
    weights = (None if spec.class_weights is None
               else precision.round(block.per_class(spec.class_weights).astype(np.float64)))
    return target, pos, weights


def sigmoid_naive(pipeline: Pipeline, run: StageRunner, block: Block, upstream: float,
                  saved: Saved) -> FloatArray:
    """``s = 1 / (1 + torch.exp(-x))`` and the two logs, differentiated."""
    fwd = _quiet(run, pipeline)
    if all(name in saved for name in ("exp", "add", "divide", "complement")):
        e, s, q = saved["exp"], saved["divide"], saved["complement"]
    else:
        x = fwd.cast("cast", block.logits)
        e = fwd.exp("exp", fwd.negate("exp", x))
        s = fwd.divide("divide", 1.0, fwd.add("add", 1.0, e))
        q = fwd.subtract("complement", 1.0, s)
    target, pos, weights = _binary_constants(block, run.precision)
    grad = _upstream(run, block.valid_elements, upstream)
    if weights is not None:
        grad = run.multiply("weight", grad, weights, blame=[grad])
    # loss = -(pos + neg), pos = (z * log s) * pw, neg = (1 - z) * log q
    grad = run.negate("combine", grad)
    grad_pos = grad if pos is None else run.multiply("combine", grad, pos, blame=[grad])
    grad_log_s = run.multiply("combine", grad_pos, target, blame=[grad_pos])
    grad_log_q = run.multiply("combine", grad, fwd.subtract("combine", 1.0, target),
                              blame=[grad])
    grad_s = run.divide("log", grad_log_s, s, blame=[grad_log_s])
    grad_q = run.divide("log", grad_log_q, q, blame=[grad_log_q])
    # q = 1 - s: s gets -grad_q, added to its own
    grad_s = run.add("complement", grad_s, run.negate("complement", grad_q),
                     blame=[grad_s, grad_q])
    # s = reciprocal(d) * 1: d gets -grad * (s * s); d = 1 + e passes it on
    square = fwd.multiply("divide", s, s)
    grad_d = run.multiply("divide", run.negate("divide", grad_s), square, blame=[grad_s])
    # e = exp(-x): -(grad * e)
    return run.negate("exp", run.multiply("exp", grad_d, e, blame=[grad_d]))


def sigmoid_stable(pipeline: Pipeline, run: StageRunner, block: Block, upstream: float,
                   saved: Saved) -> FloatArray:
    """BCE-with-logits' fused backward: ``(sigmoid(x) (pw z + 1 - z) - pw z) w g``."""
    fwd = _quiet(run, pipeline)
    x = fwd.cast("cast", block.logits)
    target, pos, _ = _binary_constants(block, run.precision)
    scale = np.where(block.valid_elements, upstream, 0.0)
    if block.case.spec.class_weights is not None:
        scale = scale * block.per_class(block.case.spec.class_weights).astype(np.float64)
    scale = run.precision.round(scale)
    pw = run.precision.round(np.float64(1.0)) if pos is None else pos
    sig = fwd.divide("combine", 1.0, fwd.add("combine", 1.0, fwd.exp(
        "exp", fwd.negate("exp", x))))
    pz = fwd.multiply("combine", pw, target)
    factor = fwd.subtract("combine", fwd.add("combine", pz, 1.0), target)
    # the kernel's last step, watched: nothing before it is the gradient's doing
    grad = run.subtract("combine", fwd.multiply("combine", sig, factor), pz, blame=[])
    return run.multiply("weight", grad, scale, blame=[grad, scale])


# -- locating a bad entry --------------------------------------------------------------------


class EntryTracer(StageRunner):
    """A runner that follows one entry of one row's gradient through the backward pass.

    Bound to a single row, it looks at every step's result in the entry's column (or the
    row's one value, for row sums) and records the first step that made it NaN, infinite,
    or zero/subnormal while the operands it is blamed on were not. The backward runner
    watches every position for NaN and overflow, but not for flushes (an exact 0 is most
    of a gradient); re-running the one row whose entry was flushed finds where it happened.
    """

    def __init__(self, precision: Precision, stages: Sequence[str], column: int) -> None:
        super().__init__(precision, stages)
        self.column = column
        # the first step that flushed a value anywhere in the row from operands that were not
        # tiny: where the entry's own column shows no cause, the zero came in through a row
        # sum whose terms were flushed in other columns ((e_t / s) / s, say)
        self.row_flush: StageEvent | None = None

    def _watch(self, stage: str, out: FloatArray, operands: Sequence[Operand],
               **kwargs: Any) -> None:
        if stage not in self.stages:
            raise ValueError(f"stage {stage!r} is not declared by the pipeline")
        array = np.asarray(out)
        if array.ndim == 0:
            return
        position = (0,) if array.ndim == 1 else (0, min(self.column, array.shape[-1] - 1))
        value = float(array[position])
        reduced = kwargs.get("reduced_axis") is not None
        inputs = []
        for operand in operands:
            values = np.asarray(operand, dtype=np.float64)
            if reduced:
                inputs.append(values.reshape(-1))  # a row sum: every term of the row
            else:
                inputs.append(np.broadcast_to(values, array.shape)[position].reshape(-1))
        given = np.concatenate(inputs) if inputs else np.zeros(0)
        tiny = self.precision.tiny
        if self.row_flush is None and not reduced and array.ndim == 2 and operands:
            self._note_row_flush(stage, array, operands)
        if np.isnan(value):
            if not np.isnan(given).any():
                self._record_index(stage, "nan", position, array.shape)
        elif np.isinf(value):
            if np.isfinite(given).all():
                self._record_index(stage, "overflow", position, array.shape)
        elif abs(value) < tiny:
            # from forward values alone (a fused kernel's step), or from operands that were
            # not tiny (all of them; for a row sum, any)
            fresh = (not given.size or (np.abs(given) >= tiny).any() if reduced
                     else (np.abs(given) >= tiny).all())
            if fresh:
                self._record_index(stage, "underflow", position, array.shape)


    def _note_row_flush(self, stage: str, out: FloatArray,
                        operands: Sequence[Operand]) -> None:
        tiny = self.precision.tiny
        with np.errstate(invalid="ignore"):
            fresh = np.abs(out.astype(np.float64)) < tiny
            for operand in operands:
                values = np.broadcast_to(np.asarray(operand, dtype=np.float64), out.shape)
                fresh &= np.isfinite(values) & (np.abs(values) >= tiny)
        if fresh.any():
            column = int(np.argmax(fresh[0]))
            self.row_flush = StageEvent(stage, "underflow", (0, column))


def trace_entry(pipeline: Pipeline, precision: Precision, block: Block, column: int,
                upstream: float) -> StageEvent | None:
    """The first backward step that turned entry ``column`` of the block's single row bad
    (NaN, infinite, or flushed to zero), indexed by that entry; None if no step did."""
    tracer = EntryTracer(precision, tuple(reversed(pipeline.all_stages)), column)
    tracer.bind(np.ones(1, dtype=bool), block.start)
    pipeline.backward(tracer, block, upstream, {})
    event = tracer.first_event()
    if event is not None:
        return StageEvent(event.stage, event.kind, (block.start, column), event.source)
    flush = tracer.row_flush
    if flush is None:
        return None
    return StageEvent(flush.stage, flush.kind, (block.start, flush.index[1]))
