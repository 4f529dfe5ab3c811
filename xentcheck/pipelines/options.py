"""The loss options ``temperature``, ``logit_softcap`` and ``z_loss``, written once for every
pipeline: :class:`WithOptions` wraps a formulation, so that every pipeline (textbook,
framework, and any formulation registered later) gets them without code of its own.

Forward, in D, op by op as a model computes them (each step rounded to D)::

    x'  = x / T                                  stage ``temperature``
    x'' = CAP * tanh(x' / CAP)                   stage ``softcap`` (divide, tanh, multiply)
    loss = the wrapped formulation's loss of x''
    lse = logsumexp(x'')                         stage ``z_logsumexp`` (as torch.logsumexp:
                                                 max, x - max, exp, sum, log, + max)
    z   = COEF * lse ** 2                        stage ``z_square``
    per-example = loss + z  (0 on ignored rows)  stage ``z_add``

This is what ``F.cross_entropy(cap * torch.tanh((x / T) / cap), y, reduction="none") +
coef * torch.logsumexp(x'', -1) ** 2`` computes in PyTorch (Gemma 2 soft-caps the final
logits with these three ops; PaLM, OLMo and Liger add ``COEF * lse^2`` per token). With a
z-loss and ``sum``/``mean``, the loss is the wrapped formulation's own reduction of its
losses plus the z-terms reduced apart by the shared reduction over the same denominator
(the number of counted examples; with class weights, their target weights' sum), added in
D: ``F.cross_entropy(x'', y) + (coef * lse[counted] ** 2).mean()`` without class weights.

Backward, as autograd differentiates those ops in D (PyTorch's derivative formulas):
``+``: the gradient to both; ``COEF *``: ``g * COEF``; ``** 2``: ``g * (2 * lse)``;
``logsumexp``: ``g * exp(x'' - lse)``; the two gradients of ``x''`` added; ``* CAP``:
``g * CAP``; ``tanh``: ``g * (1 - t * t)`` (one rounding, as the CPU kernel computes it in
float32); ``/ CAP`` and ``/ T``: ``g / CAP``, ``g / T``.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import numpy as np

from ..case import Case, valid_rows
from ..precision import FloatArray, Precision
from ..stages import StageRunner
from .base import Block, Pipeline, Saved, reduce_losses

# Stage names, in pipeline order: the pre-steps run right after the cast, the z-terms last.
PRE_STAGES = ("temperature", "softcap")
Z_STAGES = ("z_logsumexp", "z_square", "z_add")
OPTION_STAGES = ("cast", *PRE_STAGES, *Z_STAGES)


def transform(run: StageRunner, block: Block) -> Block:
    """The block with its logits divided by the temperature and soft-capped, in D (the
    block itself without those options). Elementwise: a split row's chunk is transformed
    as the whole row would be."""
    spec = block.case.spec
    if not spec.transforms_logits:
        return block
    x = run.cast("cast", block.logits)
    if spec.temperature != 1.0:
        x = run.save("options_scaled", run.divide("temperature", x, spec.temperature))
    cap = spec.logit_softcap
    if cap is not None:
        u = run.divide("softcap", x, cap)
        t = run.save("options_tanh", run.tanh("softcap", u))
        x = run.multiply("softcap", t, cap)
    return replace(block, logits=x)


def quiet_transform(run: StageRunner, block: Block) -> Block:
    """:func:`transform` on a runner that does not watch (for recomputed values: a batch
    reduction's row values); its stage names need not be the caller's."""
    if not block.case.spec.transforms_logits:
        return block
    return transform(run.unwatched(OPTION_STAGES), block)


def z_terms(run: StageRunner, block: Block) -> FloatArray:
    """``COEF * logsumexp(x'')^2`` per row in D, 0 on ignored rows, as PyTorch computes it:
    ``torch.logsumexp`` is ``log(sum(exp(x - m))) + m`` with each op in D (a row whose
    maximum is infinite takes m = 0), then ``lse ** 2`` and the product with COEF."""
    x = run.cast("cast", block.logits)
    top = run.max("z_logsumexp", x)
    top = np.where(np.isinf(top), 0.0, top).astype(top.dtype)
    shifted = run.subtract("z_logsumexp", x, top)
    total = run.sum("z_logsumexp", run.exp("z_logsumexp", shifted))
    lse = run.save("z_lse", run.add("z_logsumexp", run.log("z_logsumexp", total), top[:, 0]))
    square = run.multiply("z_square", lse, lse)
    z = run.multiply("z_square", square, block.case.spec.z_loss)
    return run.select("z_add", block.valid, z, 0.0)


def mean_denominator(case: Case, precision: Precision) -> float:
    """What ``mean`` divides by (as the evaluator counts it): the counted rows, or with
    class weights (rounded to D) their targets' weights summed; dense labels: the rows."""
    if case.label_kind != "index":
        return float(case.rows)
    labels = np.asarray(case.labels_rows()).astype(np.int64)
    keep = valid_rows(case, labels)
    weights = case.spec.class_weights
    if weights is None:
        return float(np.count_nonzero(keep))
    counts = np.bincount(labels[keep], minlength=case.classes).astype(np.float64)
    return float(np.dot(counts, precision.round(weights).astype(np.float64)))


def _inner_stages(pipeline: Pipeline) -> tuple[str, ...]:
    return tuple(s for s in pipeline.stages if s != "cast")


class WithOptions(Pipeline):
    """``inner`` with the loss options of each case applied (see the module docstring);
    a case without options runs ``inner`` itself, unchanged."""

    def __init__(self, inner: Pipeline) -> None:
        self.inner = inner

    # the wrapped formulation's identity: reports, selection and limits see it
    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @property
    def family(self) -> str:  # type: ignore[override]
        return self.inner.family

    @property
    def from_logits(self) -> bool:  # type: ignore[override]
        return self.inner.from_logits

    @property
    def formula(self) -> str:  # type: ignore[override]
        return self.inner.formula

    @property
    def framework(self) -> bool:  # type: ignore[override]
        return self.inner.framework

    @property
    def default(self) -> bool:  # type: ignore[override]
        return self.inner.default

    @property
    def splittable(self) -> bool:  # type: ignore[override]
        return self.inner.splittable

    @property
    def stages(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("cast", *PRE_STAGES, *_inner_stages(self.inner), *Z_STAGES)

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        spec = block.case.spec
        if not spec.has_options:
            return self.inner.per_example(run, block)
        capped = transform(run, block)
        loss = self.inner.per_example(run, capped)
        if not spec.z_loss:
            return loss
        return run.add("z_add", loss, z_terms(run, capped))

    def reduce(self, run: StageRunner, per_example: FloatArray, reduction: str,
               denominator: float, case: Case | None = None) -> FloatArray:
        if case is None or not case.spec.z_loss or reduction == "none":
            return self.inner.reduce(run, per_example, reduction, denominator, case)
        from ..execution import BLOCK_ELEMENTS, row_values  # execution imports the pipelines

        def parts(quiet: StageRunner, chunk: Block) -> tuple[FloatArray, FloatArray]:
            # row_values hands over the chunk transformed already
            return self.inner.per_example(quiet, chunk), z_terms(quiet, chunk)

        losses, zs = [], []
        # a pipeline that cannot replay over column chunks runs a wide row whole
        whole = None if self.inner.splittable else max(BLOCK_ELEMENTS, case.classes)
        for loss, z in row_values(case, run.precision, self.all_stages, parts, whole):
            losses.append(loss)
            zs.append(z)
        loss = self.inner.reduce(run, np.concatenate(losses), reduction, denominator, case)
        z = reduce_losses(run, np.concatenate(zs), reduction, denominator)
        run.bind(np.ones(1, dtype=bool))
        return run.add("z_add", loss, z)

    def reduction_gradient(self, precision: Precision, reduction: str,
                           denominator: float) -> float:
        return self.inner.reduction_gradient(precision, reduction, denominator)

    def backward(self, run: StageRunner, block: Block, upstream: float,
                 saved: Saved | None = None) -> FloatArray | None:
        spec = block.case.spec
        if not spec.has_options:
            return self.inner.backward(run, block, upstream, saved)
        saved = dict(saved or {})
        # the pre-steps recomputed on an unwatched runner (elementwise: no reduction of a
        # split row is replayed), with the tanh their backward needs
        quiet = run.unwatched(self.all_stages)
        capped = transform(quiet, block)
        saved.update(quiet.saved)
        grad = self.inner.backward(run, capped, upstream, saved)
        if grad is None:
            return None
        if spec.z_loss:
            grad = run.add("z_add", grad, self._z_backward(run, capped, saved), blame=[grad])
        return self._pre_backward(run, block, grad, saved)

    def _z_backward(self, run: StageRunner, capped: Block, saved: Saved) -> FloatArray:
        """d(reduced z-terms) / d x'', ``(N, C)`` in D, as autograd forms it."""
        case = capped.case
        spec = case.spec
        lse = saved.get("z_lse")
        if lse is None:
            quiet = run.unwatched(self.all_stages)
            z_terms(quiet, capped)
            lse = quiet.saved["z_lse"]
        from ..backward import reduction_gradient  # backward imports the pipelines' types

        seed = reduction_gradient(run.precision, spec.reduction,
                                  mean_denominator(case, run.precision))
        g = run.select("z_add", capped.valid, np.asarray(seed, dtype=np.float64), 0.0)
        g = run.multiply("z_square", g, spec.z_loss)
        twice = run.multiply("z_square", lse, 2.0, blame=[])
        g = run.multiply("z_square", g, twice, blame=[g])
        x = run.cast("cast", capped.logits)
        gap = run.subtract("z_logsumexp", x, lse[:, None], blame=[])
        weight = run.exp("z_logsumexp", gap, blame=[])
        column = g[:, None]  # blamed in the product's own shape (a watch broadcasts it)
        return run.multiply("z_logsumexp", column, weight, blame=[column])

    def _pre_backward(self, run: StageRunner, block: Block, grad: FloatArray,
                      saved: Saved) -> FloatArray:
        """The gradient with respect to x'' carried back through the soft-cap and the
        temperature to the raw logits, in D."""
        spec = block.case.spec
        cap = spec.logit_softcap
        if cap is not None:
            t = saved["options_tanh"]
            grad = run.multiply("softcap", grad, cap, blame=[grad])
            grad = run.fused("softcap", lambda g, y: g * (1 - y * y), grad, t, blame=[grad])
            grad = run.divide("softcap", grad, cap, blame=[grad])
        if spec.temperature != 1.0:
            grad = run.divide("temperature", grad, spec.temperature, blame=[grad])
        return grad


@cache
def with_options(pipeline: Pipeline) -> Pipeline:
    """The pipeline wrapped so that the cases' loss options apply to it (one wrapper per
    pipeline: limits are cached by pipeline)."""
    if isinstance(pipeline, WithOptions) or not pipeline.takes_options:
        return pipeline
    return WithOptions(pipeline)
