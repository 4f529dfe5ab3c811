"""Comparison: findings' values against the reference, and pipelines against each other.

Errors value by value, the flags of a finding, the mismatches between pipelines of one
dtype, the frameworks' answers side by side, and the example a ``reduction: none`` table
shows. Computed here, so that reports only render.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np

from .findings import (
    FLAGS,
    Finding,
    FrameworkAnswer,
    FrameworkComparison,
    Mismatch,
    Tolerance,
)
from .precision import FloatArray, Precision
from .stages import StageRunner


def elementwise_errors(
    computed: FloatArray, truth: FloatArray, precision: Precision
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Absolute, relative and ulp errors (ulps of D at the truth), value by value.

    Equal infinities count as exact, and so does a NaN where the truth is NaN (a row whose
    every logit is masked: softmax is 0/0 in exact arithmetic too); NaN where either side
    alone makes the error undefined.
    """
    c = np.asarray(computed, dtype=np.float64).ravel()
    t = np.asarray(truth, dtype=np.float64).ravel()
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        same = (c == t) | (np.isnan(c) & np.isnan(t))  # covers equal infinities
        abs_err = np.where(same, 0.0, np.abs(c - t))
        rel_err = np.where(same, 0.0, abs_err / np.abs(t))
        ulp_err = np.where(same, 0.0, abs_err / precision.ulp(t))
    return abs_err, rel_err, ulp_err


def errors(
    computed: FloatArray, truth: FloatArray, precision: Precision
) -> tuple[float, float, float, int | None]:
    """Largest absolute, relative and ulp errors over the values, and where the worst is.

    A NaN anywhere makes every error NaN (and marks where it is).
    """
    abs_err, rel_err, ulp_err = elementwise_errors(computed, truth, precision)
    if abs_err.size == 0:
        return 0.0, 0.0, 0.0, None
    if np.isnan(abs_err).any():
        worst = int(np.argmax(np.isnan(abs_err)))
        return float("nan"), float("nan"), float("nan"), worst
    worst = int(np.argmax(ulp_err))
    return float(abs_err.max()), float(rel_err.max()), float(ulp_err.max()), worst


def _beyond(computed: FloatArray, truth: FloatArray, tolerance: Tolerance) -> FloatArray:
    """Element-wise: farther from the truth than the tolerance allows (NaN is beyond)."""
    c = np.asarray(computed, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        ok = (c == t) | (np.abs(c - t) <= tolerance.abs + tolerance.rel * np.abs(t))
    return ~ok


def loss_flags(
    computed: FloatArray,
    target: FloatArray,
    rounded: FloatArray,
    runner: StageRunner,
    tolerance: Tolerance,
) -> tuple[str, ...]:
    """The flags of one finding (docs/json-report.md), judged value by value.

    ``precision_loss`` compares with the loss of the inputs rounded to D (the arithmetic's
    own error) wherever that is finite; ``input_rounding`` compares that loss with the
    reference of the inputs as given.
    """
    values = np.asarray(computed, dtype=np.float64)
    kinds = {e.kind for e in runner.events}
    rounded_finite = np.isfinite(rounded)
    raised = {
        "nan": bool(np.isnan(values).any()),
        "inf": bool(np.isinf(values).any()),
        "overflow": "overflow" in kinds,
        "underflow": "underflow" in kinds,
        "precision_loss": bool(
            (rounded_finite & np.isfinite(values) & _beyond(values, rounded, tolerance)).any()
        ),
        "input_rounding": bool(
            (np.isfinite(target) & (~rounded_finite | _beyond(rounded, target, tolerance))).any()
        ),
    }
    return tuple(flag for flag in FLAGS if raised[flag])


def mismatches(findings: Sequence[Finding], tolerances: Mapping[str, Tolerance]) -> list[Mismatch]:
    """Pipelines of one precision that disagree: finiteness, or values beyond tolerance."""
    out: list[Mismatch] = []
    by_dtype: dict[str, list[Finding]] = {}
    for f in findings:
        by_dtype.setdefault(f.dtype, []).append(f)
    for dtype, group in by_dtype.items():
        tol = tolerances[dtype]
        for a, b in combinations(group, 2):
            va, vb = _values(a), _values(b)
            fa, fb = np.isfinite(va), np.isfinite(vb)
            if (fa != fb).any():
                i = int(np.argmax(fa != fb))
                out.append(Mismatch(dtype, (a.pipeline, b.pipeline), "finiteness",
                                    (float(va[i]), float(vb[i])), float("inf"),
                                    _flat_example(a, i)))
                continue
            with np.errstate(invalid="ignore"):
                both = fa & fb
                diff = np.where(both, np.abs(va - vb), 0.0)
                allowed = tol.abs + tol.rel * np.maximum(np.abs(va), np.abs(vb))
            bad = both & (diff > allowed)
            if bad.any():
                i = int(np.argmax(np.where(bad, diff, -1.0)))
                out.append(Mismatch(dtype, (a.pipeline, b.pipeline), "value",
                                    (float(va[i]), float(vb[i])), float(diff[i]),
                                    _flat_example(a, i)))
    return out


def framework_comparisons(findings: Sequence[Finding], mismatches: Sequence[Mismatch],
                           reference: float | None,
                           focus: tuple[int, ...] | None) -> list[FrameworkComparison]:
    """Per dtype, each framework pipeline's answer: whether it agrees with the reference
    (finite where the reference is, no flag of a wrong loss), and which other frameworks it
    has a mismatch with (the pairwise mismatches above, restricted to frameworks)."""
    out = []
    dtypes = list(dict.fromkeys(f.dtype for f in findings if f.framework))
    for dtype in dtypes:
        group = [f for f in findings if f.framework and f.dtype == dtype]
        apart = {frozenset(m.pipelines) for m in mismatches if m.dtype == dtype}
        answers = tuple(
            FrameworkAnswer(
                pipeline=f.pipeline,
                loss=_answer(f, focus),
                agrees_with_reference=_within(f),
                differs_from=tuple(g.pipeline for g in group
                                   if frozenset((f.pipeline, g.pipeline)) in apart),
            )
            for f in group
        )
        out.append(FrameworkComparison(dtype, reference, answers))
    return out


def _within(finding: Finding) -> bool:
    """Whether a finding's loss is the reference's within its tolerance (equal infinities,
    and NaN where the reference is NaN, count as equal: their error is 0)."""
    error, tol = finding.abs_error, finding.tolerance
    return bool(np.isfinite(error)) and (error <= tol.abs or finding.rel_error <= tol.rel)


def _answer(finding: Finding, focus: tuple[int, ...] | None) -> float:
    if finding.loss is not None:
        return finding.loss
    assert finding.per_example is not None
    values = np.asarray(finding.per_example, dtype=np.float64)
    return float(values[focus] if focus is not None else values.ravel()[0])


def _flat_example(finding: Finding, flat: int) -> tuple[int, ...] | None:
    """Where a mismatch is, in the per-example losses' own shape (None: one reduced loss),
    so that a report can name the example whose values it quotes."""
    if finding.per_example is None:
        return None
    shape = np.shape(finding.per_example)
    return tuple(int(i) for i in np.unravel_index(flat, shape)) if shape else ()


def _values(finding: Finding) -> FloatArray:
    if finding.loss is not None:
        return np.array([finding.loss])
    assert finding.per_example is not None
    return np.asarray(finding.per_example, dtype=np.float64).ravel()
