"""``keras``: Keras 3 losses, whose dtype is ``floatx()`` (float32) whatever the inputs'.

``keras.losses.Loss.__call__`` converts ``y_pred`` and ``y_true`` to the loss's dtype before
anything else (``ops.convert_to_tensor(x, dtype=self.dtype)``, ``keras/src/losses/loss.py``):
16-bit inputs are cast up exactly, float64 inputs are rounded down to float32, and every op
after that, the reduction included, is a float32 op. With the torch backend
(``keras/src/backend/torch/nn.py``) the ops are PyTorch's on float32 tensors:

===============================================  ==========================================
Keras loss                                       what the torch backend computes (float32)
===============================================  ==========================================
``SparseCategoricalCrossentropy(from_logits)``   ``F.cross_entropy(x, t, reduction='none')``;
                                                 ``ignore_class``: rows masked, and ``mean``
                                                 weights the others by ``N / valid``
``CategoricalCrossentropy(from_logits)``         ``y' = y (1 - e) + e / C``;
                                                 ``-sum(y' * log_softmax(x))``
``CategoricalCrossentropy()`` (probabilities)    ``p / sum p`` clipped to [1e-7, 1 - 1e-7],
                                                 ``-sum(y * log p)``: xentcheck's ``clipped``
``BinaryCrossentropy(from_logits)``              ``F.binary_cross_entropy_with_logits``
                                                 (``(1 - z) x - log_sigmoid(x)``), then the
                                                 mean over the last axis
===============================================  ==========================================

The batch reduction (``reduce_values``): ``sum``, and ``sum / N`` for
``sum_over_batch_size`` (the default). The gradient is autograd's on the float32 copy of
the input, in float32. So the pipeline is a textbook formulation evaluated in float32 on the
inputs rounded to D: ``stable`` (log-softmax, whose float32 arithmetic PyTorch's CPU kernel
follows), ``clipped``, and BCE-with-logits as PyTorch forms it. Its losses and gradients are
float32 numbers for every D. Options that are not Keras loss arguments (class weights:
``sample_weight = w[t]``; ``pos_weight``) are applied in float32 as a user would apply them.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np

from ..case import Case
from ..precision import FloatArray, Precision
from ..stages import StageRunner
from .base import Block, Pipeline, Saved
from .textbook import SoftmaxProbabilitiesClipped, SoftmaxStable

FLOATX = Precision("float32")


def _in_floatx(run: StageRunner) -> StageRunner:
    """``run`` computing in Keras' dtype: the same rows, stages, events and saved values
    (a shallow copy whose events are ``run``'s own list), every step rounded to float32.
    A runner that follows one gradient entry (the evaluator's tracer) stays one."""
    inner = copy.copy(run)
    inner.precision = FLOATX
    inner._critical = {}
    return inner


def _keras_block(run: StageRunner, block: Block, saved: Saved | None = None) -> Block:
    """The block as Keras sees it: the inputs stored in D (a D tensor, kept for the backward
    pass, which gets it back in ``saved``), then converted to float32; dense labels with
    Keras' label smoothing applied in float32 (``y * (1 - e) + e / C``, ``e / C`` a float32
    division)."""
    stored = saved.get("keras_input") if saved else None
    if stored is None:
        stored = run.save("keras_input", run.cast("cast", block.logits))
    case = block.case
    spec = case.spec
    labels = block.labels
    if case.label_kind != "index":  # a D tensor of targets, converted to float32
        labels = FLOATX.round(run.precision.round(np.asarray(labels, dtype=np.float64)))
        smoothing = float(spec.label_smoothing)
        if smoothing and case.label_kind == "dense":
            f32 = np.float32
            share = f32(smoothing) / f32(case.classes)
            labels = labels.astype(f32) * f32(1.0 - smoothing) + share
        case = replace(case, spec=replace(spec, label_smoothing=0.0))
    return Block(case, np.asarray(stored), labels, block.start)


def _keras_reduce(run: StageRunner, per_example: FloatArray, reduction: str,
                  denominator: float) -> FloatArray:
    """``reduce_values`` in float32: the sum, and for ``mean`` the sum over N. Softmax rows
    are weighted by ``N / counted`` first where some are not counted (``apply_mask``'s
    weight for ``ignore_class``); sigmoid rows are averaged over their K elements first
    (``BinaryCrossentropy``'s ``ops.mean(..., axis=-1)``)."""
    with np.errstate(over="ignore"):  # a float64 loss past float32's range is inf there
        values = np.asarray(per_example, dtype=np.float32)
    if reduction == "none":
        return values
    run.bind(np.ones(1, dtype=bool))
    f32 = np.float32
    sums = _in_floatx(run)
    with np.errstate(all="ignore"):
        if values.ndim == 2:  # sigmoid elements
            if reduction == "mean":
                values = sums.accumulate(values, axis=-1) / f32(values.shape[-1])
            else:
                values = values.reshape(-1)
        elif reduction == "mean" and denominator and denominator != values.size:
            values = values * (f32(values.size) / f32(denominator))
        total = f32(sums.accumulate(values, axis=-1))
        if reduction == "mean":
            total = f32(total / f32(values.size)) if values.size else f32(0.0)
    out = np.asarray(total, dtype=f32)
    run.watch_reduction("reduce", out, values.reshape(-1))
    return out


def _keras_upstream(reduction: str, denominator: float) -> float:
    """d(loss) / d(per-example loss) as autograd forms it in float32: ``1 / N``."""
    if reduction != "mean":
        return 1.0
    if denominator == 0:
        return 0.0
    return float(np.float32(1.0) / np.float32(denominator))


def _row_upstream(block: Block, upstream: float) -> np.float32:
    """d(loss) / d(a row's loss) as autograd forms it in float32 through ``reduce_values``:
    ``(1 / N) * (N / counted)`` for ``mean`` (the second factor ``apply_mask``'s weight,
    present with ``ignore_class``), N the batch's rows. Class weights (not a Keras loss
    option) keep the shared ``1 / denominator``."""
    case = block.case
    f32 = np.float32
    if case.spec.reduction != "mean" or upstream == 0:
        return f32(upstream)
    rows = f32(case.rows)
    if case.spec.family == "softmax" and case.spec.class_weights is None:
        from ..case import valid_rows

        counted = int(np.count_nonzero(valid_rows(case, case.labels_rows())))
        per_row = f32(1.0) / rows
        return per_row if counted == case.rows else per_row * (rows / f32(counted))
    if case.spec.family == "sigmoid":
        return f32(1.0) / rows
    return f32(upstream)


class _KerasPipeline(Pipeline):
    """What every Keras loss shares: the name, its float32 batch reduction and upstream
    gradient; run when named, on a float32 copy of the inputs."""

    name = "keras"
    default = False
    framework = True
    fp8_note = "Keras' float8 arithmetic is not emulated (nor checked against Keras)"
    splittable = False  # not yet written to the replay contract

    def reduce(self, run: StageRunner, per_example: FloatArray, reduction: str,
               denominator: float, case: Case | None = None) -> FloatArray:
        return _keras_reduce(run, per_example, reduction, denominator)

    def reduction_gradient(self, precision: Precision, reduction: str,
                           denominator: float) -> float:
        return _keras_upstream(reduction, denominator)


class _KerasWrapping(_KerasPipeline):
    """A textbook formulation (``_inner``) evaluated in Keras' float32."""

    _inner: Pipeline

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        keras_block = _keras_block(run, block)
        return self._inner.per_example(_in_floatx(run), keras_block)


class KerasSoftmax(_KerasWrapping):
    family = "softmax"
    from_logits = True
    formula = ("float32: x = float32(x); loss = -sum(y * log_softmax(x))  "
               "(Keras (Sparse)CategoricalCrossentropy(from_logits=True))")
    stages = SoftmaxStable.stages
    _inner = SoftmaxStable()

    def backward(self, run: StageRunner, block: Block, upstream: float,
                 saved: Saved | None = None) -> FloatArray | None:
        quiet = StageRunner(run.precision, self.all_stages).bind(run.valid_rows, run.row_offset)
        keras_block = _keras_block(quiet, block, saved)
        return self._inner.backward(_in_floatx(run), keras_block,
                                    float(_row_upstream(block, upstream)), saved)


class KerasSoftmaxProbabilities(_KerasWrapping):
    family = "softmax"
    from_logits = False
    formula = ("float32: p = clip(p / sum(p), 1e-7, 1 - 1e-7); loss = -sum(y * log(p))  "
               "(Keras CategoricalCrossentropy())")
    stages = SoftmaxProbabilitiesClipped.stages
    _inner = SoftmaxProbabilitiesClipped()


class KerasSigmoid(_KerasPipeline):
    family = "sigmoid"
    from_logits = True
    formula = ("float32: loss = (1 - z) x - log_sigmoid(x), log_sigmoid(x) = min(x, 0) - "
               "log1p(exp(-|x|)); mean over the last axis  (Keras BinaryCrossentropy)")
    stages = ("cast", "exp", "log1p", "log_sigmoid", "combine", "weight", "nll")

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        keras_block = _keras_block(run, block)
        inner = _in_floatx(run)
        x = inner.cast("cast", keras_block.logits)
        target = inner.cast("cast", keras_block.labels)
        spec = block.case.spec
        # log_sigmoid(x) = min(x, 0) - log1p(exp(-|x|)), min(x, 0) written -max(-x, 0)
        low = inner.negate("log_sigmoid", inner.maximum(
            "log_sigmoid", inner.negate("log_sigmoid", x), 0.0))
        tail = inner.log1p("log1p", inner.exp("exp", inner.negate("exp", inner.abs("exp", x))))
        log_sigmoid = inner.subtract("log_sigmoid", low, tail)
        if spec.pos_weight is not None:
            pos = inner.cast("cast", np.asarray(spec.pos_weight))
            log_weight = inner.add("combine", inner.multiply(
                "combine", inner.subtract("combine", pos, 1.0), target), 1.0)
            log_sigmoid = inner.multiply("combine", log_sigmoid, log_weight)
        loss = inner.subtract("combine", inner.multiply(
            "combine", inner.subtract("combine", 1.0, target), x), log_sigmoid)
        if spec.class_weights is not None:
            loss = inner.multiply("weight", loss,
                                  inner.cast("cast", np.asarray(spec.class_weights)))
        return inner.select("nll", keras_block.valid_elements, loss, 0.0)

    def backward(self, run: StageRunner, block: Block, upstream: float,
                 saved: Saved | None = None) -> FloatArray | None:
        """BCE-with-logits' backward in float32: ``(sigmoid(x) - z) * g`` (with pos_weight
        ``(sigmoid(x) (pw z + 1 - z) - pw z) g``), times the class weight."""
        quiet = StageRunner(run.precision, self.all_stages).bind(run.valid_rows, run.row_offset)
        keras_block = _keras_block(quiet, block, saved)
        inner = _in_floatx(run)
        f32 = np.float32
        x = np.asarray(keras_block.logits, dtype=f32)
        z = FLOATX.round(np.asarray(keras_block.labels, dtype=np.float64)).astype(f32)
        spec = block.case.spec
        scale = np.where(keras_block.valid_elements, _row_upstream(block, upstream)
                         / (f32(block.case.classes) if spec.reduction == "mean" else f32(1.0)),
                         f32(0.0)).astype(f32)
        sig = inner.divide("combine", 1.0, inner.add("combine", 1.0, inner.exp(
            "exp", inner.negate("exp", x))), blame=[])
        if spec.pos_weight is None:
            grad = inner.multiply("combine", inner.subtract("combine", sig, z), scale,
                                  blame=[scale])
        else:
            pz = FLOATX.round(np.asarray(spec.pos_weight, dtype=np.float64)).astype(f32) * z
            factor = inner.multiply("combine", inner.subtract(
                "combine", inner.add("combine", pz, 1.0), z), sig)
            grad = inner.multiply("combine", inner.subtract("combine", factor, pz), scale,
                                  blame=[scale])
        if spec.class_weights is not None:
            grad = inner.multiply("weight", grad, FLOATX.round(
                np.asarray(spec.class_weights, dtype=np.float64)), blame=[grad])
        return grad
