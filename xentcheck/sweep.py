"""Sweeps: move the logits along a magnitude scale and watch each formulation break.

A sweep is a family of synthetic cases, one row per magnitude, run through the very same
evaluator as ``run`` (one case, ``reduction: none``, so every point is one example and the
whole sweep is a single vectorised pass). For each pipeline and precision it reports the
first magnitude where the loss stops being finite and the first where the arithmetic error
passes the tolerance, and the error in bits along the way (``log2(1 + ulps)``, as Herbie
reports accuracy) measured against the loss of the inputs rounded to the dtype, so that
input rounding is not counted as the formulation's error.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .case import NO_OPTIONS, Case, LossOptions, LossSpec
from .comparison import elementwise_errors
from .errors import UsageError
from .evaluator import evaluate
from .findings import Tolerance
from .pipelines import Pipeline
from .precision import FloatArray, Precision

PATTERNS: tuple[str, ...] = ("top", "bottom", "spread", "normal")


@dataclass(frozen=True)
class SweepSpec:
    """The synthetic inputs: C classes, magnitudes from ``start`` to ``stop``.

    Softmax patterns, at magnitude m: ``top``, logits evenly spaced from m down to -m with
    the target at the largest; ``bottom``, the same with the target at the smallest (spread
    2m); ``spread``, logits from m down to m - ``spread`` with the target at the smallest (a
    fixed probability, only the magnitude grows); ``normal``, m times standard normal
    logits and random targets (``seed``). Sigmoid: ``top`` x = m, z = 1; ``bottom`` x = m,
    z = 0; ``spread`` x = -m, z = 1; ``normal`` x = m N(0, 1), random 0/1 targets.
    """

    family: str = "softmax"
    classes: int = 10
    pattern: str = "bottom"
    start: float = 1.0
    stop: float = 1e5
    points: int = 200
    log_scale: bool = True
    spread: float = 10.0
    seed: int = 0
    # loss options applied to every point (the magnitudes are the raw logits')
    options: LossOptions = NO_OPTIONS

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise UsageError(f"unknown pattern {self.pattern!r}; choose from {', '.join(PATTERNS)}")
        if self.points < 2:
            raise UsageError("a sweep needs at least 2 points")
        for option, value in (("--from", self.start), ("--to", self.stop),
                              ("--spread", self.spread)):
            if not math.isfinite(value):
                raise UsageError(f"{option} {value}: must be a finite number")
        if self.spread < 0:
            raise UsageError(f"--spread {self.spread:g}: must not be negative")
        if not math.isfinite(self.stop - self.start):
            raise UsageError(f"--from {self.start:g} --to {self.stop:g}: the range is wider than "
                             "float64 holds")
        if self.log_scale and (self.start <= 0 or self.stop <= 0):
            raise UsageError(f"--from {self.start:g} --to {self.stop:g}: a log-spaced sweep needs "
                             "a positive range (or use --linear)")
        if not self.start < self.stop:
            raise UsageError(f"--from {self.start:g} --to {self.stop:g}: the range must go from a "
                             "smaller to a larger magnitude")
        if self.family == "softmax" and self.classes < 2:
            raise UsageError("a softmax sweep needs at least 2 classes")

    def magnitudes(self) -> FloatArray:
        if self.log_scale:
            return np.geomspace(self.start, self.stop, self.points)
        return np.linspace(self.start, self.stop, self.points)


def sweep_case(spec: SweepSpec) -> Case:
    """The sweep as one case: row i holds the pattern at magnitude i."""
    m = spec.magnitudes()[:, None]
    rng = np.random.default_rng(spec.seed)
    if spec.family == "sigmoid":
        if spec.pattern == "normal":
            with np.errstate(over="ignore"):  # checked below
                x = m * rng.standard_normal((spec.points, spec.classes))
            z = rng.integers(0, 2, x.shape).astype(np.float64)
        else:
            sign = -1.0 if spec.pattern == "spread" else 1.0
            x = np.repeat(sign * m, spec.classes, axis=1)
            z = np.full(x.shape, 0.0 if spec.pattern == "bottom" else 1.0)
        return Case("sweep", _in_range(x, spec, rows=False), z, "binary",
                    LossSpec(family="sigmoid", reduction="none",
                             **spec.options.spec_fields("sigmoid")))  # type: ignore[arg-type]
    steps = np.linspace(1.0, -1.0, spec.classes)[None, :]
    if spec.pattern == "normal":
        with np.errstate(over="ignore"):  # checked below
            x = m * rng.standard_normal((spec.points, spec.classes))
        labels = rng.integers(0, spec.classes, spec.points)
    elif spec.pattern == "spread":
        x = m + (steps - 1.0) / 2.0 * spec.spread
        labels = np.full(spec.points, spec.classes - 1)
    else:
        x = m * steps
        labels = np.full(spec.points, 0 if spec.pattern == "top" else spec.classes - 1)
    return Case("sweep", _in_range(x, spec, rows=True), labels.astype(np.int64), "index",
                LossSpec(reduction="none",
                         **spec.options.spec_fields("softmax")))  # type: ignore[arg-type]


def _in_range(x: FloatArray, spec: SweepSpec, *, rows: bool) -> FloatArray:
    """``x`` if its logits (and, for softmax ``rows``, their spreads) are finite float64
    numbers: past that no formulation, nor the reference, has anything to say but that
    float64 overflows."""
    finite = bool(np.isfinite(x).all())
    if finite and rows:
        with np.errstate(over="ignore"):
            finite = bool(np.isfinite(x.max(axis=-1) - x.min(axis=-1)).all())
    if not finite:
        raise UsageError(f"--to {spec.stop:g}: the '{spec.pattern}' pattern's logits (or "
                         "their differences) overflow float64 at that magnitude; lower --to")
    return x


@dataclass(frozen=True)
class SweepCurve:
    """One pipeline in one precision along the sweep."""

    pipeline: str
    dtype: str
    bits: FloatArray  # log2(1 + ulps) per point against the rounded inputs; nan: not finite
    finite: FloatArray
    first_nonfinite: float | None
    first_inaccurate: float | None
    tolerance: Tolerance
    # the gradient: first magnitude where it is NaN/inf, and where its normwise error
    # passes the tolerance (None: never, or no gradient for this pipeline)
    grad_first_nonfinite: float | None = None
    grad_first_inaccurate: float | None = None


@dataclass(frozen=True)
class SweepResult:
    spec: SweepSpec
    magnitudes: FloatArray
    curves: tuple[SweepCurve, ...]


def _first(magnitudes: FloatArray, mask: FloatArray) -> float | None:
    return float(magnitudes[int(np.argmax(mask))]) if mask.any() else None


def run_sweep(
    spec: SweepSpec,
    precisions: Sequence[Precision],
    pipelines: Sequence[Pipeline],
    tolerances: Mapping[str, Tolerance] | None = None,
) -> SweepResult:
    """Evaluate every pipeline and precision along the sweep."""
    magnitudes = spec.magnitudes()
    result = evaluate(sweep_case(spec), precisions, pipelines, tolerances)
    assert result.reference.rounded_counted is not None
    curves = []
    for finding in result.findings:
        assert finding.per_example is not None
        values = np.asarray(finding.per_example, dtype=np.float64).reshape(spec.points, -1)
        rounded = result.reference.rounded_counted[finding.dtype].reshape(spec.points, -1)
        abs_err, _, ulps = elementwise_errors(values, rounded, Precision(finding.dtype))
        ulps = ulps.reshape(values.shape).max(axis=1)
        abs_err = abs_err.reshape(values.shape)
        finite = np.asarray(np.isfinite(values).all(axis=1))
        tol = finding.tolerance
        with np.errstate(invalid="ignore"):
            allowed = tol.abs + tol.rel * np.abs(rounded)
            beyond = (np.isfinite(rounded) & ~(abs_err <= allowed)).any(axis=1)
            bits = np.where(finite, np.log2(1.0 + ulps), np.nan)
        grad_bad = grad_off = None
        if finding.grad_row_errors is not None:
            rows = finding.grad_row_errors.reshape(spec.points, -1)
            nonfinite = np.asarray(~np.isfinite(rows).all(axis=1))  # NaN: not finite
            grad_bad = _first(magnitudes, nonfinite)
            # A gradient that is not finite is also inaccurate: the first inaccurate magnitude
            # never lies after the first non-finite one.
            with np.errstate(invalid="ignore"):
                grad_off = _first(magnitudes, np.asarray(nonfinite | (rows > tol.rel).any(axis=1)))
        curves.append(SweepCurve(
            pipeline=finding.pipeline,
            dtype=finding.dtype,
            bits=bits,
            finite=finite,
            first_nonfinite=_first(magnitudes, np.asarray(~finite)),
            first_inaccurate=_first(magnitudes, np.asarray(beyond)),
            tolerance=tol,
            grad_first_nonfinite=grad_bad,
            grad_first_inaccurate=grad_off,
        ))
    return SweepResult(spec, magnitudes, tuple(curves))


def downsample(curve: SweepCurve, width: int) -> tuple[FloatArray, FloatArray]:
    """The curve in ``width`` buckets: worst bits lost per bucket, and whether any point in
    the bucket was not finite (for a terminal sparkline)."""
    edges = np.linspace(0, len(curve.bits), min(width, len(curve.bits)) + 1).astype(int)
    worst = np.empty(len(edges) - 1)
    broken = np.zeros(len(edges) - 1, dtype=bool)
    for i, (lo, hi) in enumerate(itertools.pairwise(edges)):
        part = curve.bits[lo:hi]
        broken[i] = bool(np.isnan(part).any())
        finite = part[~np.isnan(part)]
        worst[i] = float(finite.max()) if finite.size else np.nan
    return worst, broken
