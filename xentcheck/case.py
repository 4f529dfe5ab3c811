"""Case: one loss problem (inputs plus loss spec), and the loss semantics every part shares.

Semantics follow PyTorch where frameworks differ, so that a number here can be compared with
``torch.nn.functional.cross_entropy`` / ``binary_cross_entropy_with_logits``:

* softmax, integer labels: per-example ``w[t] * -log p_t``; ``mean`` divides by the sum of
  ``w[t]`` over the counted examples; ``ignore_index`` rows count nowhere. Label smoothing
  ``e`` mixes in ``e/C`` of ``-sum_c w_c log p_c`` (``F.cross_entropy(label_smoothing=e)``).
* softmax, one-hot or probability labels: ``-sum_c w_c y'_c log p_c`` with
  ``y' = (1-e) y + e/C``; ``mean`` divides by the number of examples.
* sigmoid: per element ``-w (pw z log s + (1-z) log(1-s))``; ``mean`` divides by the number
  of counted elements; targets equal to ``ignore_index`` count nowhere.
* ``from_logits: false``: the inputs are probabilities; softmax rows are renormalised to sum
  to 1 (Keras); the ``clipped`` pipeline also clips them to [1e-7, 1 - 1e-7].
* loss options: the logits are divided by ``temperature``, then soft-capped
  (``cap * tanh(x / cap)``), then the loss above is taken; ``z_loss`` adds
  ``z_loss * logsumexp(x)^2`` to each counted example (unweighted); ``mean`` divides the
  z-terms by the same denominator as the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from .precision import FloatArray

Family = Literal["softmax", "sigmoid"]
Reduction = Literal["none", "sum", "mean"]
LabelKind = Literal["index", "dense", "binary"]

FAMILIES: tuple[str, ...] = ("softmax", "sigmoid")
REDUCTIONS: tuple[str, ...] = ("none", "sum", "mean")
# Classes per chunk of the ``chunked`` formulation (Cut Cross-Entropy's vocabulary blocks).
DEFAULT_CHUNK_SIZE = 4096


@dataclass(frozen=True)
class LossSpec:
    """What loss is asked for, independent of the data."""

    family: Family = "softmax"
    from_logits: bool = True
    class_weights: FloatArray | None = None
    pos_weight: FloatArray | None = None
    label_smoothing: float = 0.0
    ignore_index: int | None = None
    reduction: Reduction = "mean"
    # loss options (docs/scenarios.md): x -> x / temperature -> cap tanh(x / cap) -> the
    # loss, plus z_loss * logsumexp(x'')^2 per counted example (softmax from logits only)
    z_loss: float = 0.0
    logit_softcap: float | None = None
    temperature: float = 1.0
    # how the ``chunked`` formulation splits a row (the loss itself does not depend on it)
    chunk_size: int = DEFAULT_CHUNK_SIZE

    @property
    def transforms_logits(self) -> bool:
        """Whether the logits are divided by a temperature or soft-capped first."""
        return self.temperature != 1.0 or self.logit_softcap is not None

    @property
    def has_options(self) -> bool:
        """Whether any loss option (temperature, soft-cap, z-loss) is in effect."""
        return self.transforms_logits or self.z_loss != 0.0

    def options(self) -> dict[str, float | None]:
        """The options as given (reports echo them)."""
        return {"z_loss": self.z_loss, "logit_softcap": self.logit_softcap,
                "temperature": self.temperature}


@dataclass(frozen=True)
class LossOptions:
    """The loss options alone, for cases that commands build (sweeps, limits): hashable,
    so that limits are cached by them."""

    temperature: float = 1.0
    logit_softcap: float | None = None
    z_loss: float = 0.0

    @classmethod
    def of(cls, spec: LossSpec) -> LossOptions:
        return cls(spec.temperature, spec.logit_softcap, spec.z_loss)

    def spec_fields(self, family: str) -> dict[str, float | None]:
        """LossSpec fields (the z-loss applies to softmax only)."""
        return {"temperature": self.temperature, "logit_softcap": self.logit_softcap,
                "z_loss": self.z_loss if family == "softmax" else 0.0}


NO_OPTIONS = LossOptions()


@dataclass(frozen=True)
class Case:
    """One loss problem.

    ``logits`` keeps the dtype it was given in (a float16 file stays float16). For softmax its
    last axis holds the C classes and ``labels`` has the leading shape (``label_kind`` =
    ``"index"``) or the full shape (``"dense"``: one-hot or probability rows). For sigmoid
    ``labels`` has the full shape (``"binary"``: targets in [0, 1]).
    """

    name: str
    logits: FloatArray
    labels: FloatArray
    label_kind: LabelKind
    spec: LossSpec
    source: str = "<inline>"
    description: str = ""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.logits.shape)

    @property
    def classes(self) -> int:
        return self.shape[-1] if len(self.shape) >= 1 and self.logits.ndim > 1 else (
            1 if self.spec.family == "sigmoid" else self.shape[-1]
        )

    @property
    def example_shape(self) -> tuple[int, ...]:
        """Shape of the per-example losses (``reduction: none``)."""
        if self.spec.family == "softmax":
            return self.shape[:-1]
        return self.shape

    @property
    def rows(self) -> int:
        """Number of rows the input flattens to: examples (softmax) or element rows (sigmoid)."""
        return int(np.prod(self.shape[:-1])) if self.logits.ndim > 1 else (
            1 if self.spec.family == "softmax" else self.shape[0]
        )

    def logits_rows(self, start: int = 0, stop: int | None = None) -> FloatArray:
        """Rows ``start:stop`` of the logits as a 2-D ``(rows, C)`` view."""
        return self.logits.reshape(self.rows, self.classes)[start:stop]

    def labels_rows(self, start: int = 0, stop: int | None = None) -> FloatArray:
        if self.label_kind == "index":
            return self.labels.reshape(self.rows)[start:stop]
        return self.labels.reshape(self.rows, self.classes)[start:stop]

    def unravel_row(self, row: int) -> tuple[int, ...]:
        """A flat row number in the input's own leading coordinates."""
        leading = self.shape[:-1] if self.logits.ndim > 1 else ()
        if not leading:
            return (row,) if self.spec.family == "sigmoid" else ()
        return tuple(int(i) for i in np.unravel_index(row, leading))


def valid_rows(case: Case, labels: FloatArray) -> FloatArray:
    """Rows that count: every row, less integer-label rows equal to ``ignore_index``."""
    if case.label_kind == "index" and case.spec.ignore_index is not None:
        return np.asarray(labels) != case.spec.ignore_index
    return np.ones(len(labels), dtype=bool)


def valid_elements(case: Case, labels: FloatArray) -> FloatArray:
    """Sigmoid targets that count (those not equal to ``ignore_index``)."""
    if case.spec.ignore_index is not None:
        return np.asarray(labels) != case.spec.ignore_index
    return np.ones(np.shape(labels), dtype=bool)


def target_coefficients(case: Case, labels: FloatArray) -> FloatArray:
    """Integer labels: ``(N,)`` the weight of each row's target class (1 without class
    weights; 0 for ignored rows), before label smoothing."""
    index = np.asarray(labels).astype(np.int64)
    keep = valid_rows(case, index)
    weights = case.spec.class_weights
    if weights is None:
        return keep.astype(np.float64)
    return np.asarray(weights, dtype=np.float64)[np.where(keep, index, 0)] * keep


def softmax_coefficients(case: Case, labels: FloatArray,
                         columns: tuple[int, int] | None = None) -> FloatArray:
    """The float64 weights a[i, c] with ``loss_i = -sum_c a[i, c] log p[i, c]``.

    Integer labels, one-hot and probability labels, class weights and label smoothing all
    reduce to these non-negative coefficients; ignored rows get zeros. With ``columns``
    ``(c0, c1)``, only those classes' coefficients (dense ``labels`` hold just those columns).
    """
    spec = case.spec
    classes = case.classes
    start, stop = (0, classes) if columns is None else columns
    weights = (
        np.ones(stop - start) if spec.class_weights is None
        else np.asarray(spec.class_weights, dtype=np.float64)[start:stop]
    )
    smoothing = float(spec.label_smoothing)
    if case.label_kind == "index":
        index = np.asarray(labels).astype(np.int64)
        keep = valid_rows(case, index)
        coef = np.zeros((len(index), stop - start))
        target_weight = target_coefficients(case, index)
        target = np.where(keep, index, 0)
        inside = np.flatnonzero((target >= start) & (target < stop))
        coef[inside, target[inside] - start] = (1.0 - smoothing) * target_weight[inside]
        if smoothing:
            coef += keep[:, None] * (smoothing / classes) * weights[None, :]
        return coef
    dense = np.asarray(labels, dtype=np.float64)
    if smoothing:
        dense = dense * (1.0 - smoothing) + smoothing / classes
    return dense * weights[None, :]
