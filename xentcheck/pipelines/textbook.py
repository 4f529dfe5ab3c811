"""The textbook formulations: softmax ``naive``, ``shifted`` and ``stable``, their sigmoid and
probability-input cousins, each written once, generic over the precision.

Their backward passes, as autodiff of each formulation computes them, are in
:mod:`xentcheck.backward`.
"""

from __future__ import annotations

import numpy as np

from .. import backward as autodiff
from ..precision import FloatArray
from ..stages import StageRunner
from .base import Block, Pipeline, Saved

# Keras' backend epsilon, the bound ``clipped`` clips probabilities to.
KERAS_EPSILON = 1e-7


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
            # torch adds a Python number to a 16-bit tensor after storing it in D (it
            # multiplies by one kept in float32): e / C is rounded to D first
            share = run.precision.round(np.float64(smoothing / classes))
            target = run.add("smooth", run.multiply("smooth", target, 1.0 - smoothing), share)
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
    return _softmax_nll(run, block, run.log("log", p, where=block.unmasked(critical)))


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
        return autodiff.softmax_naive(self, run, block, upstream, saved or {})


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
        return autodiff.softmax_shifted(self, run, block, upstream, saved or {})


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
        return autodiff.softmax_stable(self, run, block, upstream, saved or {})


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
            run, block, target, run.log("log", s, where=block.unmasked(critical)),
            run.log("log", q, where=critical),
        )

    def backward(self, run: StageRunner, block: Block, upstream: float,
                 saved: Saved | None = None) -> FloatArray | None:
        return autodiff.sigmoid_naive(self, run, block, upstream, saved or {})


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
        return autodiff.sigmoid_stable(self, run, block, upstream, saved or {})


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
