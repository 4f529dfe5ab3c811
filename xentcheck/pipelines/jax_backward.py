"""The ``jax`` pipelines' backward passes: ``jax.grad`` of the optax user code, in D.

JAX differentiates op by op (linearise, then transpose), every cotangent of dtype D:

===========================  ===================================================================
forward op                   cotangent(s) of the operand(s)
===========================  ===================================================================
``a - b``, ``-a``            ``ct``, ``-ct``; ``-ct``
``a * b``                    ``ct * b``, ``ct * a``
``log(s)``                   ``ct / s``
``abs(s)`` (logsumexp)       ``ct`` where ``s >= 0``
``exp(z)``                   ``ct * exp(z)`` (the result, stored in D)
``sum`` (upcast to float32)  ``ct`` broadcast (the casts' transposes are exact)
``max`` (stop_gradient)      nothing
``take_along_axis``          scatter-add of ``ct`` into zeros
``logaddexp(a, 0)``          ``ct * exp(a - logaddexp(a, 0))`` (its custom JVP; +inf -> 0)
``where(keep, l, 0)``        ``where(keep, ct, 0)``
===========================  ===================================================================

So the softmax gradient with integer labels is ``exp(z) * (g / s) - g`` at the target,
``exp(z) * (g / s)`` elsewhere, each product and the final sum rounded to D; the softmax is
never formed as such. With dense labels the log-softmax's cotangent ``c = -g t`` gives
``c + exp(z) * ((-sum c) / s)``, where ``sum c`` is a sum in D in XLA's order (windows of
32) and, in float16, ``c + product`` is one fused float32 step. The float32 exp jit keeps
feeds only the forward sum: the backward multiplies by the exp stored in D.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..precision import FloatArray, Precision
from ..stages import StageRunner

if TYPE_CHECKING:
    from .base import Block, Pipeline, Saved


def _quiet(run: StageRunner, pipeline: Pipeline) -> StageRunner:
    """A runner for recomputing forward values: same precision, its events discarded."""
    quiet = StageRunner(run.precision, pipeline.all_stages).bind(run.valid_rows, run.row_offset)
    quiet.flush_subnormals = True
    return quiet


def _row_upstream(run: StageRunner, block: Block, upstream: float) -> FloatArray:
    """The cotangent of each row's loss: ``where``'s, then the class weight's."""
    grad = run.select("nll", block.valid, np.asarray(upstream, dtype=np.float64), 0.0)
    weights = block.case.spec.class_weights
    if weights is not None and block.case.label_kind == "index" \
            and not block.case.spec.label_smoothing:
        w = run.precision.round(np.asarray(weights, dtype=np.float64))
        grad = run.multiply("weight", grad, w[block.target], blame=[grad])
    return grad


def softmax_backward(pipeline: Pipeline, run: StageRunner, block: Block, upstream: float,
                     saved: Saved) -> FloatArray:
    """``jax.grad`` of :class:`~xentcheck.pipelines.jax_optax.SoftmaxJax`'s user code."""
    case = block.case
    index = case.label_kind == "index" and not case.spec.label_smoothing
    if not all(name in saved for name in ("exp", "sum")):
        fwd_run = _quiet(run, pipeline)
        pipeline.per_example(fwd_run, block)
        saved = fwd_run.saved
    # the exp as the backward multiplies by it: stored in D (the forward's float32 exp, for
    # bfloat16, rounded)
    e = run.precision.round(saved["exp"])
    s = saved["sum"]
    grad = _row_upstream(run, block, upstream)
    if index:
        # lse = log(s) + m; loss = lse - x[y]
        ct_s = run.divide("log", grad[:, None], s, blame=[grad[:, None]])
        ct_z = run.multiply("exp", ct_s, e, blame=[ct_s])
        # the gather's cotangent, -g scattered into zeros, added: only the targets change
        # (adding +0 elsewhere changes nothing: no entry of ct_z is -0, as g/s and exp are
        # not negative)
        targets = block.target[:, None]
        at_target = np.take_along_axis(ct_z, targets, axis=-1)[:, 0]
        at_target = run.add("nll", at_target, run.negate("nll", grad), blame=[at_target])
        np.put_along_axis(ct_z, targets, at_target[:, None], axis=-1)
        return ct_z
    from .jax_optax import _dense_targets

    t = saved["targets"] if "targets" in saved else _dense_targets(_quiet(run, pipeline), block)
    # loss = -sum(t * log_softmax): the log-softmax's cotangent is -g * t
    ct_ls = run.multiply("nll", run.negate("nll", grad)[:, None], t, blame=[grad[:, None]])
    # log_softmax = z - log(s): s gets -sum(ct) / s
    # the transpose of log(s)'s broadcast is a sum in D itself (no upcast): XLA adds the
    # terms one by one, rounding each partial sum to D
    # (bfloat16's HLO sums the negated terms, float16's negates the sum: zeros' signs differ)
    if run.precision.name == "float16":
        ct_log = run.negate("log_softmax", _sum_in_d(run, ct_ls))
    else:
        ct_log = _sum_in_d(run, run.negate("log_softmax", ct_ls))
    ct_s = run.divide("log", ct_log, s, blame=[ct_log])
    if run.precision.name == "float16":
        # XLA fuses the exp's product and the add_any into one float16 kernel whose LLVM
        # code keeps the product in float32: one rounding, at the end
        return run.fused("log_softmax", lambda c, p, q: c + p * q, ct_ls, ct_s, e,
                         blame=[ct_ls, ct_s])
    ct_z = run.multiply("exp", ct_s, e, blame=[ct_s])
    return run.add("log_softmax", ct_ls, ct_z, blame=[ct_ls, ct_z])


# XLA's CPU TreeReductionRewriter splits a reduction longer than this into windows of this size
REDUCE_WINDOW = 32


def _sequential_sum(precision: Precision, columns: FloatArray) -> FloatArray:
    """Row sums in D, left to right from 0, each partial sum rounded to D."""
    compute = precision.compute_dtype
    total = precision.round(np.zeros(columns.shape[0], dtype=compute))
    with np.errstate(all="ignore"):
        for j in range(columns.shape[1]):
            total = precision.round(np.asarray(total).astype(compute) + columns[:, j])
    return np.asarray(total)


def _tree_sum_in_d(precision: Precision, columns: FloatArray) -> FloatArray:
    """Row sums in D as XLA's CPU code forms them: a row longer than :data:`REDUCE_WINDOW` is
    padded with zeros on both sides (the odd one at the end) to a multiple of it, each
    window summed left to right, then the window sums are summed the same way."""
    count = columns.shape[1]
    if count <= REDUCE_WINDOW:
        return _sequential_sum(precision, columns)
    windows = -(-count // REDUCE_WINDOW)
    pad = windows * REDUCE_WINDOW - count
    padded = np.pad(columns, ((0, 0), (pad // 2, pad - pad // 2)))
    grouped = padded.reshape(columns.shape[0], windows, REDUCE_WINDOW)
    compute = precision.compute_dtype
    partial = precision.round(np.zeros(grouped.shape[:2], dtype=compute))
    with np.errstate(all="ignore"):
        for j in range(REDUCE_WINDOW):
            partial = precision.round(np.asarray(partial).astype(compute) + grouped[:, :, j])
    return _tree_sum_in_d(precision, np.asarray(partial).astype(compute))


def _sum_in_d(run: StageRunner, values: FloatArray) -> FloatArray:
    """Row sums ``(N, 1)`` accumulated in D (no upcast), in XLA's order."""
    columns = np.asarray(values).astype(run.precision.compute_dtype)
    total = _tree_sum_in_d(run.precision, columns)
    run.watch_reduction("log_softmax", total, values)
    return total[:, None]


def _logaddexp_factor(fwd: StageRunner, a: FloatArray, out: FloatArray,
                      finite: bool) -> FloatArray:
    """``exp(a - logaddexp(a, 0))``, the custom JVP's factor, +inf operands replaced by 0
    (``finite``: the logits have no infinity, so neither operand does)."""
    def no_inf(v: FloatArray) -> FloatArray:
        at_inf = np.isposinf(np.asarray(v))
        return np.where(at_inf, v.dtype.type(0), v) if at_inf.any() else v

    if not finite:
        a, out = no_inf(a), no_inf(out)
    return fwd.exp("exp", fwd.subtract("exp", a, out))


def sigmoid_backward(pipeline: Pipeline, run: StageRunner, block: Block, upstream: float,
                     saved: Saved) -> FloatArray:
    """``jax.grad`` of :class:`~xentcheck.pipelines.jax_optax.SigmoidJax`'s user code.

    Negations are exact and rounding is symmetric, so the cotangents' signs are folded into
    the products: ``-(-a * b)`` is ``a * b`` bit for bit."""
    spec = block.case.spec
    if not all(k in saved for k in ("cast", "log_p", "log_q")):
        fwd_run = _quiet(run, pipeline)
        pipeline.per_example(fwd_run, block)
        saved = fwd_run.saved
    fwd = _quiet(run, pipeline)
    x, log_p, log_q = saved["cast"], saved["log_p"], saved["log_q"]
    precision = run.precision
    z = precision.round(np.asarray(block.labels, dtype=np.float64))
    grad = run.select("nll", block.valid_elements, np.asarray(upstream, dtype=np.float64), 0.0)
    if spec.class_weights is not None:
        w = precision.round(np.asarray(spec.class_weights, dtype=np.float64))
        grad = run.multiply("weight", grad, w, blame=[grad])
    # loss = positive * log_p - (1 - z) * log_q, positive = -z or -(pw z)
    positive = z
    if spec.pos_weight is not None:
        pw = precision.round(np.asarray(spec.pos_weight, dtype=np.float64))
        positive = fwd.multiply("combine", pw, z)
    # log_p's cotangent is -(grad * positive'); log_p = -logaddexp(-x, 0) passes it negated,
    # times exp(-x - logaddexp(-x, 0)) to -x, and x takes it negated again: +g pz f1 ... with
    # the two negations cancelling: x gets (grad * positive') * f1 from log_p
    ct_p = run.multiply("combine", grad, positive, blame=[grad])
    # (negations are exact: taken directly; logaddexp(a, 0) is +inf only where a is)
    finite = run.precision.all_finite(x)
    f1 = _logaddexp_factor(fwd, -x, -log_p, finite)
    from_p = run.multiply("softplus", ct_p, f1, blame=[ct_p])
    # log_q's cotangent is -(grad * (1 - z)); log_q = -logaddexp(x, 0): x gets
    # (grad * (1 - z)) * f2
    ct_q = run.multiply("combine", grad, fwd.subtract("combine", 1.0, z), blame=[grad])
    f2 = _logaddexp_factor(fwd, x, -log_q, finite)
    from_q = run.multiply("softplus", ct_q, f2, blame=[ct_q])
    # x's cotangent: -(ct of -x) + ct of x = from_p... with signs: -from_p + from_q
    return run.subtract("softplus", from_q, from_p, blame=[from_p, from_q])
