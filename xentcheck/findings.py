"""Findings: what each pipeline did in each precision, and the scenario they belong to.

Plain data, computed by the evaluator and rendered by the reports (which never compute).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .case import NO_OPTIONS, LossOptions
from .precision import FloatArray
from .stages import StageEvent

# The flag vocabulary (docs/json-report.md), in display order.
FLAGS: tuple[str, ...] = ("nan", "inf", "overflow", "underflow", "precision_loss", "input_rounding")
# The gradient's flags: NaN or inf entries, entries flushed to 0 that should not be, and a
# normwise error beyond the tolerance.
GRAD_FLAGS: tuple[str, ...] = ("nan", "inf", "zeroed", "precision_loss")


@dataclass(frozen=True)
class Tolerance:
    """``|computed - reference| <= abs + rel * |reference|`` passes."""

    rel: float
    abs: float = 0.0

    def allows(self, error: float, reference: float) -> bool:
        return bool(error <= self.abs + self.rel * abs(reference))


@dataclass(frozen=True)
class Limit:
    """Edges of one pipeline in one precision for a class count.

    None: no such edge (probability inputs; a spread for sigmoid or C = 1), or, with
    ``no_safe_logit`` / ``no_safe_spread``, no safe value at all: the worst-case pattern
    breaks at every magnitude (float16 ``stable`` with 128,256 classes: the sum of C equal
    terms is inf). ``smallest_safe_logit`` is D's most negative number where the
    formulation has no lower edge.
    """

    largest_safe_logit: float | None
    largest_safe_spread: float | None
    smallest_safe_logit: float | None = None
    no_safe_logit: bool = False
    no_safe_spread: bool = False


@dataclass(frozen=True)
class Finding:
    """One pipeline in one precision on one case.

    For ``reduction: none`` ``loss`` is None, ``per_example`` holds the losses, and the errors
    are the largest over the counted examples (element-wise), at ``worst_index``.
    """

    pipeline: str
    dtype: str
    accumulate: str
    loss: float | None
    per_example: FloatArray | None
    abs_error: float
    rel_error: float
    ulp_error: float
    arithmetic_rel_error: float
    flags: tuple[str, ...]
    first_bad: StageEvent | None
    events: tuple[StageEvent, ...]
    limit: Limit
    tolerance: Tolerance
    worst_index: tuple[int, ...] | None = None
    # limit minus the input's own largest logit / spread: negative means the input is past it
    logit_headroom: float | None = None
    spread_headroom: float | None = None
    # the input's smallest logit that must not underflow (sigmoid: any x; softmax: a logit
    # whose probability is logged) minus the smallest safe logit
    lower_logit_headroom: float | None = None
    # the gradient with respect to the logits (None: not computed, probability inputs)
    grad_error: float | None = None  # normwise: max |g - g_ref| / max |g_ref|
    grad_flags: tuple[str, ...] = ()  # GRAD_FLAGS
    grad_first_bad: StageEvent | None = None
    grad_row_errors: FloatArray | None = None  # per input row; NaN: not finite
    framework: bool = False  # the pipeline emulates a library's loss (torch, jax, ...)

    @property
    def first_bad_stage(self) -> str | None:
        return self.first_bad.stage if self.first_bad else None

    @property
    def first_bad_index(self) -> list[int] | None:
        return list(self.first_bad.index) if self.first_bad else None

    @property
    def first_bad_source(self) -> str | None:
        """``FILE:LINE`` of the first bad operation in a user's loss function, else None."""
        return self.first_bad.source if self.first_bad else None


@dataclass(frozen=True)
class Mismatch:
    """Two pipelines that disagree in one precision."""

    dtype: str
    pipelines: tuple[str, str]
    kind: str  # "finiteness" (one finite, the other not) or "value" (apart beyond tolerance)
    losses: tuple[float, float]
    difference: float
    # reduction "none": the example whose losses are quoted (the first that differs in
    # finiteness, or the farthest apart); None for a reduced loss
    index: tuple[int, ...] | None = None


@dataclass(frozen=True)
class MaskedInputs:
    """Masked entries (``-inf`` logits) of the input, and the rows they decide.

    Positions are flat rows of the input (plus the element's column for sigmoid).
    """

    entries: int = 0
    # counted rows (sigmoid: elements) whose loss weighs a masked entry: their loss is inf
    weighted: int = 0
    first_weighted: tuple[int, ...] | None = None
    # counted softmax rows with every entry masked: their loss is NaN
    rows: int = 0
    first_row: int | None = None
    # ignored rows (ignore_index) with every entry masked: no loss, a NaN in autograd's gradient
    ignored_rows: int = 0


@dataclass(frozen=True)
class InputStats:
    """What the input itself looks like next to the limits (masked entries left out)."""

    input_dtype: str
    max_abs_logit: float
    max_logit: float
    # largest (row max - logged class's logit) over counted rows; softmax only
    max_spread: float | None
    min_logit: float = -np.inf
    rows_sum_to_one: bool = False  # every value in [0, 1] and every row summing to 1
    masked: MaskedInputs = field(default_factory=MaskedInputs)


@dataclass(frozen=True)
class ReferenceValue:
    """The reference loss of the inputs as given, and of the inputs rounded to each dtype."""

    loss: float | None
    per_example: FloatArray | None
    rounded: dict[str, float | None] = field(default_factory=dict)
    # reduction "none": per dtype, the counted examples' losses of the rounded inputs (flat)
    rounded_counted: dict[str, FloatArray] | None = None


@dataclass(frozen=True)
class FrameworkAnswer:
    """What one framework pipeline answered in one dtype, against the reference and the
    other frameworks."""

    pipeline: str
    loss: float  # the reduced loss; for reduction "none", the loss at the focus example
    agrees_with_reference: bool  # finite where the reference is, within the tolerance
    differs_from: tuple[str, ...]  # the other frameworks it has a mismatch with


@dataclass(frozen=True)
class FrameworkComparison:
    """One dtype: does each framework's answer differ from the truth, and from the others'?"""

    dtype: str
    reference: float | None  # the reduced reference loss (at the focus example for "none")
    answers: tuple[FrameworkAnswer, ...]


@dataclass(frozen=True)
class ScenarioResult:
    name: str
    source: str
    description: str
    family: str
    from_logits: bool
    label_kind: str
    shape: tuple[int, ...]
    classes: int
    reduction: str
    stats: InputStats
    reference: ReferenceValue
    findings: tuple[Finding, ...]
    mismatches: tuple[Mismatch, ...]
    warnings: tuple[MisuseWarning, ...] = ()
    class_weights: tuple[float, ...] | None = None  # as used (computed, for "balanced")
    # reduction "none": the example where the pipelines are farthest from the reference,
    # whose losses a table shows side by side
    focus_index: tuple[int, ...] | None = None
    # per dtype, where framework pipelines ran: their answers side by side
    frameworks: tuple[FrameworkComparison, ...] = ()
    # the loss options the case applies (temperature, soft-cap, z-loss)
    options: LossOptions = NO_OPTIONS
    # (pipeline, dtype) pairs asked for that do not run, with why (a framework in float8)
    left_out: tuple[LeftOut, ...] = ()


@dataclass(frozen=True)
class LeftOut:
    """A pipeline not run in a dtype (:meth:`xentcheck.pipelines.Pipeline.unsupported`)."""

    pipeline: str
    dtype: str
    reason: str


@dataclass(frozen=True)
class MisuseWarning:
    """A misuse rule that fired (see :mod:`xentcheck.misuse`), with what was seen."""

    rule: str
    name: str
    message: str
