"""The ``jax`` pipelines: what optax's losses compute on arrays of dtype D under ``jax.jit``.

The user code each pipeline stands for (``x``: logits of dtype D, ``y``: labels)::

    # softmax, integer labels (no smoothing)
    loss = optax.softmax_cross_entropy_with_integer_labels(x, y)
    loss = loss * w[y]                                  # class weights
    loss = jnp.where(y == ignore_index, 0, loss)        # ignore_index
    # softmax, dense labels, or integer labels with label smoothing
    t = y.astype(D)  or  jax.nn.one_hot(y, C, dtype=D)
    t = optax.smooth_labels(t, e)                       # label smoothing
    t = t * w                                           # class weights
    loss = optax.softmax_cross_entropy(x, t)
    # sigmoid
    loss = optax.sigmoid_binary_cross_entropy(x, z)     # z.astype(D)
    #   with pos_weight:  -(pw * z) * log_sigmoid(x) - (1 - z) * log_sigmoid(-x)
    loss = loss * w;  loss = jnp.where(z == ignore_index, 0, loss)
    # the batch reduction
    jnp.mean(loss)                       # mean over every row (element)
    jnp.sum(loss) / jnp.sum(w[y] * counted).astype(D)   # mean with weights or ignored rows
    jnp.sum(loss)

optax 0.2.8 (``losses/_classification.py``) computes the integer-label loss as
``jax.nn.logsumexp(x) - x[y]`` and the dense one as ``-(t * jax.nn.log_softmax(x)).sum()``;
``jax.nn.logsumexp`` (jax 0.10.2 ``_src/ops/special.py``) is ``log(sum(exp(x - max))) + max``
with the max replaced by 0 where it is not finite; ``jax.nn.log_sigmoid(x)`` is
``-logaddexp(-x, 0)`` = ``-(max(-x, 0) + log1p(exp(-|x|)))``.

Every op's result is rounded to D, as jax's per-op dtype rules say, except where ``jax.jit``
on CPU (XLA) does otherwise, measured against jax 0.10.2 (``docs/frameworks-jax.md``):

* bfloat16: a step whose result feeds a float32-upcast sum stays float32 (the ``exp`` of
  logsumexp and log-softmax; the dense loss's ``t * log_softmax``, and from
  :data:`YNN_MIN_ELEMENTS` logits on the log-softmax itself);
* float16: native float16 ops, each rounded, the exp before the sum included; products
  fused into one kernel with an add are kept in float32 (the sigmoid's combination);
* results below the compute dtype's smallest normal number are flushed to zero;
* ``jnp.mean`` multiplies the float32 sum by float32 ``1 / N``.

Eagerly (op by op) the issue's per-op model holds; jit and eager agree on 99.7% of rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..case import Case, valid_elements, valid_rows
from ..precision import FloatArray, Precision
from ..stages import StageRunner
from ..subnormals import flush_subnormals
from .base import Block, Pipeline, Saved
from .jax_backward import sigmoid_backward, softmax_backward

# From this many logits on, XLA (jax 0.10.2, CPU) evaluates optax.softmax_cross_entropy's
# product-and-sum in a YNNPACK fusion that keeps the log-softmax in float32 (measured: 4096
# elements do, 4000 do not; see docs/frameworks-jax.md)
YNN_MIN_ELEMENTS = 4096


def _exp_summed(run: StageRunner, z: FloatArray, **kw: object) -> tuple[FloatArray, FloatArray]:
    """``sum(exp(z))`` as jit computes it: the exp in float32, unrounded, summed in float32,
    the sum rounded to D. Returns ``(exp in the compute dtype, sum in D with a trailing axis)``."""
    e = _kept_for_sum(run, "exp", np.exp, z, **kw)
    return e, run.sum("sum", e, keepdims=True)


def _kept_for_sum(run: StageRunner, stage: str, fn: Any, *operands: Any,
                  **kw: Any) -> FloatArray:
    """An elementwise step whose result feeds a float32-upcast sum. XLA's CPU code computes
    bfloat16 ops in float32 and drops the round trip to bfloat16 before the upcast, so the
    result stays float32; float16 ops are native HLO ops, each result rounded to float16."""
    if run.precision.name == "bfloat16":
        return run.fused(stage, fn, *operands, round_result=False, **kw)
    return run.fused(stage, fn, *operands, **kw)


def _finite_max(run: StageRunner, x: FloatArray) -> FloatArray:
    """logsumexp's shift: the row max, 0 where it is not finite (a row of -inf)."""
    m = run.max("shift", x)
    return np.where(np.isfinite(np.asarray(m, dtype=np.float64)), m, run.precision.round(
        np.zeros(1)))


def _dense_targets(run: StageRunner, block: Block) -> FloatArray:
    """The label array the user hands to ``optax.softmax_cross_entropy``, in D: one-hot rows
    for integer labels, smoothed (``optax.smooth_labels``), times the class weights."""
    case = block.case
    spec = case.spec
    if case.label_kind == "index":
        t = block.target_mask.astype(run.precision.storage_dtype)
        t = np.where(block.valid[:, None], t, t.dtype.type(0))  # one_hot(-100) is all zeros
    else:
        t = run.cast("cast", block.labels)
    smoothing = float(spec.label_smoothing)
    if smoothing:
        # (1.0 - alpha) * labels + alpha / num_categories: both Python floats become
        # constants of D before the ops (weak types)
        keep = run.precision.round(np.float64(1.0 - smoothing))
        share = run.precision.round(np.float64(smoothing / case.classes))
        t = run.add("smooth", run.multiply("smooth", keep, t), share)
    if spec.class_weights is not None:
        t = run.multiply("weight", t, run.cast("cast", np.asarray(spec.class_weights))[None, :])
    return t


def mean_denominator(case: Case, precision: Precision) -> tuple[float, bool]:
    """The ``mean`` divisor of the user code and whether it is ``jnp.mean``'s (the count of
    per-example losses) rather than a sum of weights or counted rows divided by."""
    spec = case.spec
    if spec.family == "sigmoid":
        total = int(np.prod(case.logits.shape))
        counted = float(np.count_nonzero(valid_elements(case, case.labels)))
        return counted, counted == total
    if case.label_kind != "index":
        return float(case.rows), True
    labels = np.asarray(case.labels_rows()).astype(np.int64)
    keep = valid_rows(case, labels)
    if spec.class_weights is None:
        counted = float(np.count_nonzero(keep))
    else:
        weights = precision.round(np.asarray(spec.class_weights, dtype=np.float64))
        counts = np.bincount(labels[keep], minlength=case.classes)
        counted = float(np.dot(counts, np.asarray(weights, dtype=np.float64)))
    return counted, counted == case.rows


def divided_mean_gradient(precision: Precision, denominator: float) -> float:
    """``jnp.sum(loss) / d``'s gradient: ``1 / d`` with ``d`` stored in D first."""
    if denominator == 0:
        return 0.0
    d = precision.round(np.asarray(denominator, dtype=np.float64))
    with np.errstate(all="ignore"):
        quotient = (np.asarray(1.0, dtype=precision.compute_dtype)
                    / np.asarray(d, dtype=precision.compute_dtype))
    return float(precision.round(quotient))


class _JaxPipeline(Pipeline):
    """The batch reduction and its gradient as ``jnp.mean`` / ``jnp.sum`` compute them."""

    name = "jax"
    framework = True
    fp8_note = "optax's float8 arithmetic is not emulated (nor checked against JAX)"
    default = False  # run when named: `--pipeline jax`
    splittable = False  # not yet written to the replay contract

    def reduce(self, run: StageRunner, per_example: FloatArray, reduction: str,
               denominator: float, case: Case | None = None) -> FloatArray:
        if reduction == "none":
            return per_example
        flat = np.asarray(per_example).reshape(-1)
        run.bind(np.ones(1, dtype=bool))
        run.flush_subnormals = True
        total = run.accumulate(flat)  # float32 for 16-bit D (upcast_f16_for_computation)
        acc = total.dtype
        with np.errstate(all="ignore"):
            if reduction == "mean" and denominator == flat.size:
                # jnp.mean: the sum times 1 / N, both in the accumulate dtype
                total = total * (np.asarray(1.0, dtype=acc) / np.asarray(denominator, dtype=acc))
            elif reduction == "mean":
                # jnp.sum(loss) / d: the sum stored in D, divided by d stored in D
                d = run.precision.round(np.asarray(denominator, dtype=np.float64))
                total = (run.precision.round(total).astype(run.precision.compute_dtype)
                         / np.asarray(d, dtype=run.precision.compute_dtype))
        out = flush_subnormals(run.precision.round(total))
        run.watch_reduction("reduce", out, flat)
        return out

    def upstream(self, run: StageRunner, block: Block, upstream: float) -> float:
        """The upstream gradient of the user's ``mean``: the default one for ``jnp.mean``,
        ``1 / d`` with ``d`` in D for a divided sum (the evaluator's denominator)."""
        run.flush_subnormals = True
        if block.case.spec.reduction != "mean":
            return upstream
        denominator, is_count = mean_denominator(block.case, run.precision)
        return upstream if is_count else divided_mean_gradient(run.precision, denominator)


class SoftmaxJax(_JaxPipeline):
    family = "softmax"
    from_logits = True
    formula = ("optax under jax.jit (CPU): integer labels logsumexp(x) - x[y], logsumexp = "
               "log(sum(exp(x - max))) + max; dense labels -sum(t * log_softmax(x)); each op "
               "rounded to D (bfloat16: the exp and product feeding a sum kept in float32); "
               "subnormals flushed")
    stages = ("cast", "shift", "exp", "sum", "log", "logsumexp", "log_softmax", "smooth",
              "weight", "nll")

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        run.flush_subnormals = True
        x = run.save("cast", run.cast("cast", block.logits))
        case = block.case
        if case.label_kind == "index" and not case.spec.label_smoothing:
            m = _finite_max(run, x)
            z = run.subtract("shift", x, m)
            e, s = _exp_summed(run, z)
            run.save("exp", e)
            s = run.save("sum", s)
            lse = run.add("logsumexp", run.log("log", s), m)
            loss = run.subtract("nll", lse[:, 0], run.gather("nll", x, block.target))
            if case.spec.class_weights is not None:
                w = run.cast("cast", np.asarray(case.spec.class_weights))
                loss = run.multiply("weight", loss, w[block.target])
            return run.select("nll", block.valid, loss, 0.0)
        t = run.save("targets", _dense_targets(run, block))
        z = run.subtract("shift", x, run.max("shift", x))
        e, s = _exp_summed(run, z)
        run.save("exp", e)
        log_s = run.log("log", run.save("sum", s))
        if run.precision.name == "bfloat16" and block.case.logits.size >= YNN_MIN_ELEMENTS:
            # XLA hands the product and its sum to one YNNPACK fusion, which keeps the
            # log-softmax in float32
            log_softmax = run.fused("log_softmax", np.subtract, z, log_s, round_result=False)
        else:
            log_softmax = run.subtract("log_softmax", z, log_s)
        run.save("log_softmax", log_softmax)
        # the product feeds the sum's float32 upcast: jit keeps it in float32, as the exp
        product = _kept_for_sum(run, "nll", np.multiply, t, log_softmax)
        loss = run.negate("nll", run.sum("nll", product))
        return run.select("nll", block.valid, loss, 0.0)

    def backward(self, run: StageRunner, block: Block, upstream: float,
                 saved: Saved | None = None) -> FloatArray | None:
        return softmax_backward(self, run, block, self.upstream(run, block, upstream),
                                saved or {})


class SigmoidJax(_JaxPipeline):
    family = "sigmoid"
    from_logits = True
    formula = ("optax under jax.jit (CPU): -z log_sigmoid(x) - (1 - z) log_sigmoid(-x), "
               "log_sigmoid(x) = -(max(-x, 0) + log1p(exp(-|x|))); each op rounded to D "
               "(float16: the combination in float32); subnormals flushed")
    stages = ("cast", "exp", "log1p", "softplus", "combine", "weight", "nll")

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        run.flush_subnormals = True
        spec = block.case.spec
        x = run.save("cast", run.cast("cast", block.logits))
        z = run.cast("cast", block.labels)
        # negation, abs and max are exact in D and cannot create inf, NaN or a subnormal:
        # they are taken directly, without a rounding or a watch (half this pipeline's steps)
        tail = run.log1p("log1p", run.exp("exp", -np.abs(x)))
        # log_sigmoid(x) = -(max(-x, 0) + tail); log_sigmoid(-x) = -(max(x, 0) + tail)
        zero = x.dtype.type(0)
        log_p = -run.add("softplus", np.maximum(-x, zero), tail)
        log_q = -run.add("softplus", np.maximum(x, zero), tail)
        run.save("log_p", log_p)
        run.save("log_q", log_q)
        positive = -z
        if spec.pos_weight is not None:
            pos_weight = run.cast("cast", np.asarray(spec.pos_weight))
            positive = -run.multiply("combine", pos_weight, z)
        if run.precision.name == "float16":
            # one float16 XLA fusion whose LLVM code keeps the products in float32
            loss = run.fused("combine", lambda p, lp, c, lq: p * lp - c * lq, positive, log_p,
                             run.subtract("combine", 1.0, z), log_q)
        else:
            loss = run.subtract(
                "combine", run.multiply("combine", positive, log_p),
                run.multiply("combine", run.subtract("combine", 1.0, z), log_q))
        if spec.class_weights is not None:
            loss = run.multiply("weight", loss, run.cast("cast", np.asarray(spec.class_weights)))
        return run.select("nll", block.valid_elements, loss, 0.0)

    def backward(self, run: StageRunner, block: Block, upstream: float,
                 saved: Saved | None = None) -> FloatArray | None:
        return sigmoid_backward(self, run, block, self.upstream(run, block, upstream),
                                saved or {})
