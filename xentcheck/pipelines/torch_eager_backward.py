"""The ``torch`` pipelines' backward passes: PyTorch's CPU backward kernels and autograd
formulas, in D, seeded with 1 as ``loss.backward()`` seeds a reduced loss.

``nll_loss_backward`` (``aten/src/ATen/native/LossNLL.cpp``)
    ``grad = -(grad_output / total_weight)`` for ``mean`` (``-grad_output`` otherwise), in D;
    the target entry of each counted row is ``w[t] * grad`` in D, every other entry 0.
label smoothing (``cross_entropy_loss_label_smoothing``, differentiated by autograd)
    the two terms' seeds ``1 * (1 - e)`` and ``1 * (e / C)`` in D (the Python numbers kept in
    float32); the smoothing term's ``mean`` divides by its own total weight in D; its
    gradient ``-g * w`` reaches every class of each counted row and is added, in D, to the
    ``nll_loss`` gradient.
probability targets (``cross_entropy_loss_prob_target``)
    ``-((logp * y') * w).sum() / N``: the seed divided by N, negated, then times ``w`` and
    times ``y'``, each product in D.
``log_softmax_backward`` (``cpu/SoftMaxKernel.cpp``, ``_vec_host_softmax_backward_lastdim``)
    ``g - exp(out) * sum(g)`` with the row sum and the whole expression in float32 (the
    ``opmath`` type), rounded to D once.
``binary_cross_entropy_with_logits_backward`` (``FunctionsManual.cpp``)
    ``(sigmoid(x) - z) * grad`` (with ``pos_weight``: ``((pw z + 1 - z) * sigmoid(x) - pw z)
    * grad``), times ``w``, divided by the number of elements for ``mean``; each op in D.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..case import valid_elements
from ..precision import FloatArray
from ..stages import StageRunner
from .torch_eager import (
    PRIMITIVES,
    _dense_target,
    _weights_in_d,
    log_softmax,
    nll_total_weight,
    smoothing_total_weight,
)

if TYPE_CHECKING:
    from .base import Block, Pipeline, Saved


def _quiet(run: StageRunner, pipeline: Pipeline) -> StageRunner:
    """A runner for recomputing forward values: same precision, rows and chunk (a split
    row's reductions are replayed), no events."""
    return run.unwatched(pipeline.all_stages)


def _divide(run: StageRunner, stage: str, a: FloatArray | float,
            b: FloatArray | float) -> FloatArray:
    return run.divide(stage, np.asarray(a), np.asarray(b))


def _logp_gradient(run: StageRunner, fwd: StageRunner, block: Block,
                   seed: float) -> tuple[FloatArray, FloatArray | None]:
    """d loss / d log_softmax in D, ``(N, C)``, and (with plain class indices, where each row
    has one non-zero entry) that entry per row ``(N, 1)``, which is its row sum exactly."""
    case = block.case
    spec = case.spec
    precision = run.precision
    reduction = spec.reduction
    smoothing = float(spec.label_smoothing)
    weights = _weights_in_d(case, precision)
    shape = block.logits.shape
    g = precision.round(np.asarray(seed, dtype=np.float64))
    if case.label_kind != "index":
        if reduction == "mean":
            g = _divide(run, "nll", g, float(case.rows))
        grad = run.negate("nll", np.broadcast_to(g, (shape[0], 1)))
        if weights is not None:
            grad = run.multiply("weight", grad, block.per_class(weights)[None, :])
        target = _dense_target(fwd, block.labels, smoothing, case.classes)
        return run.multiply("nll", grad, target, blame=[grad]), None
    g_nll = g if not smoothing else run.multiply("smooth", g, 1.0 - smoothing)
    if reduction == "mean":
        g_nll = _divide(run, "nll", g_nll, nll_total_weight(case, precision))
    at_target = run.negate("gather", np.broadcast_to(g_nll, (shape[0],)))
    if weights is not None:
        at_target = run.multiply("weight", weights[block.target], at_target,
                                 blame=[at_target])
    at_target = run.select("gather", block.valid, at_target, 0.0)
    grad = run.scatter("gather", shape, block.target, at_target)
    if not smoothing:
        return grad, np.asarray(at_target)[:, None]
    g_smooth = run.multiply("smooth", g, smoothing / case.classes)
    if reduction == "mean":
        g_smooth = _divide(run, "smooth", g_smooth, smoothing_total_weight(case, precision))
    spread = run.negate("smooth", np.broadcast_to(g_smooth, (shape[0], 1)))
    spread = run.select("smooth", block.valid[:, None], spread, 0.0)
    if weights is not None:
        spread = run.multiply("smooth", spread, block.per_class(weights)[None, :],
                              blame=[spread])
    return run.add("smooth", grad, np.broadcast_to(spread, shape), blame=[grad, spread]), None


def cross_entropy_backward(pipeline: Pipeline, run: StageRunner, block: Block, seed: float,
                           saved: Saved) -> FloatArray:
    """``F.cross_entropy``'s gradient with respect to the logits, in D."""
    fwd = _quiet(run, pipeline)
    logp = saved.get("log_softmax")
    if logp is None:
        logp = log_softmax(fwd, fwd.cast("cast", block.logits))
    grad, row_sum = _logp_gradient(run, fwd, block, seed)
    compute = run.precision.compute_dtype
    if row_sum is None:
        # the row sum of g kept in float32 (opmath), not rounded to D
        with np.errstate(all="ignore"):
            row_sum = run.accumulate(grad, keepdims=True, accumulate="default")
    total = np.asarray(row_sum).astype(compute, copy=False)
    return run.fused("log_softmax", lambda g, out, s: g - PRIMITIVES.exp(out) * s,
                     grad, logp, total, blame=[grad, total])


def binary_with_logits_backward(run: StageRunner, block: Block, seed: float) -> FloatArray:
    """``F.binary_cross_entropy_with_logits``' gradient with respect to the logits, in D."""
    case = block.case
    spec = case.spec
    precision = run.precision
    quiet = run.unwatched(run.stages)
    x = quiet.cast("cast", block.logits)
    target = quiet.cast("cast", block.labels)
    sig = quiet.fused("log1p", lambda v: 1.0 / (1.0 + PRIMITIVES.exp(-v)), x)
    if spec.pos_weight is None:
        grad = run.subtract("combine", sig, target, blame=[])
    else:
        pos = quiet.cast("cast", block.per_class(spec.pos_weight))
        t = quiet.multiply("product", pos, target)
        factor = quiet.subtract("product", quiet.add("product", t, 1.0), target)
        grad = run.subtract("combine", run.multiply("combine", factor, sig, blame=[]), t,
                            blame=[])
    g = precision.round(np.asarray(seed, dtype=np.float64))
    grad = run.multiply("combine", grad, g, blame=[grad])
    if spec.class_weights is not None:
        weights = quiet.cast("cast", block.per_class(spec.class_weights))
        grad = run.multiply("weight", grad, weights, blame=[grad])
    valid = block.valid_elements
    if spec.reduction == "mean":
        count = (case.rows * case.classes if spec.ignore_index is None
                 else int(np.count_nonzero(valid_elements(case, case.labels_rows()))))
        grad = _divide(run, "nll", grad, float(count))
    return run.select("nll", valid, grad, 0.0)
