"""The JSON report, schema 1 (docs/json-report.md). Renders findings; computes nothing."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import __version__
from .case import LossOptions
from .expectations import Outcome, Verdict
from .findings import Finding, Limit, Mismatch, ScenarioResult
from .limits import LimitRow
from .precision import Precision
from .stages import StageEvent
from .sweep import SweepResult

SCHEMA = 1


def number(value: float | None) -> float | str | None:
    """A float as JSON can hold it: non-finite values become "nan", "inf", "-inf"."""
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _array(values: Any) -> Any:
    """A per-example array as nested lists of JSON numbers."""
    if values is None:
        return None
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0:
        return number(float(array))
    return [_array(row) for row in array]


def _event(event: StageEvent) -> dict[str, Any]:
    return {"stage": event.stage, "kind": event.kind, "index": list(event.index),
            "source": event.source}


def _result(finding: Finding, reduction: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "pipeline": finding.pipeline,
        "dtype": finding.dtype,
        "accumulate": finding.accumulate,
        "loss": number(finding.loss),
    }
    if reduction == "none":
        out["per_example"] = _array(finding.per_example)
    out.update({
        "abs_error": number(finding.abs_error),
        "rel_error": number(finding.rel_error),
        "ulp_error": number(finding.ulp_error),
        "flags": list(finding.flags),
        "first_bad_stage": finding.first_bad_stage,
        "first_bad_index": finding.first_bad_index,
        "first_bad_source": finding.first_bad_source,
        "largest_safe_logit": number(finding.limit.largest_safe_logit),
        "largest_safe_spread": number(finding.limit.largest_safe_spread),
        # additive keys
        "first_bad_kind": finding.first_bad.kind if finding.first_bad else None,
        # false for float8_e4m3fn: its overflow events give NaN, not inf
        "has_infinity": Precision(finding.dtype).has_inf,
        "arithmetic_rel_error": number(finding.arithmetic_rel_error),
        "tolerance": {"rel": finding.tolerance.rel, "abs": finding.tolerance.abs},
        "events": [_event(e) for e in finding.events],
        "worst_index": None if finding.worst_index is None else list(finding.worst_index),
        "logit_headroom": number(finding.logit_headroom),
        "spread_headroom": number(finding.spread_headroom),
        "smallest_safe_logit": number(finding.limit.smallest_safe_logit),
        "lower_logit_headroom": number(finding.lower_logit_headroom),
        "no_safe_logit": finding.limit.no_safe_logit,
        "no_safe_spread": finding.limit.no_safe_spread,
        "grad_error": number(finding.grad_error),
        "grad_flags": list(finding.grad_flags),
        "grad_first_bad_stage": finding.grad_first_bad.stage if finding.grad_first_bad else None,
        "grad_first_bad_index": (
            list(finding.grad_first_bad.index) if finding.grad_first_bad else None),
        "grad_first_bad_source": (
            finding.grad_first_bad.source if finding.grad_first_bad else None),
    })
    return out


def _mismatch(mismatch: Mismatch) -> dict[str, Any]:
    return {
        "dtype": mismatch.dtype,
        "pipelines": list(mismatch.pipelines),
        "kind": mismatch.kind,
        "losses": [number(v) for v in mismatch.losses],
        "difference": number(mismatch.difference),
        # additive key: the example whose losses are quoted (reduction "none"), else null
        "index": None if mismatch.index is None else list(mismatch.index),
    }


def scenario_json(result: ScenarioResult) -> dict[str, Any]:
    """One scenario's entry of the ``scenarios`` list."""
    reference: dict[str, Any] = {"loss": number(result.reference.loss)}
    if result.reduction == "none":
        reference["per_example"] = _array(result.reference.per_example)
    reference["rounded"] = {k: number(v) for k, v in result.reference.rounded.items()}
    stats = result.stats
    return {
        "name": result.name,
        "source": result.source,
        "loss": result.family,
        "shape": list(result.shape),
        "classes": result.classes,
        "reduction": result.reduction,
        "options": _options(result.options),
        "reference": reference,
        "results": [_result(f, result.reduction) for f in result.findings],
        "mismatches": [_mismatch(m) for m in result.mismatches],
        "frameworks": [
            {
                "dtype": c.dtype,
                "reference": number(c.reference),
                "answers": [
                    {"pipeline": a.pipeline, "loss": number(a.loss),
                     "agrees_with_reference": a.agrees_with_reference,
                     "differs_from": list(a.differs_from)}
                    for a in c.answers
                ],
            }
            for c in result.frameworks
        ],
        # additive keys
        "warnings": [
            {"rule": w.rule, "name": w.name, "message": w.message} for w in result.warnings
        ],
        "left_out": [
            {"pipeline": o.pipeline, "dtype": o.dtype, "reason": o.reason}
            for o in result.left_out
        ],
        "description": result.description,
        "class_weights": None if result.class_weights is None else list(result.class_weights),
        "from_logits": result.from_logits,
        "labels": result.label_kind,
        "input": {
            "dtype": stats.input_dtype,
            "max_logit": number(stats.max_logit),
            "max_abs_logit": number(stats.max_abs_logit),
            "max_spread": number(stats.max_spread),
            "masked_logits": stats.masked.entries,
        },
    }


def _outcome(outcome: Outcome) -> dict[str, Any]:
    return {
        "line": outcome.expectation.line,
        "origin": outcome.expectation.origin,
        "subject": outcome.subject,
        "condition": outcome.condition,
        "expected": outcome.expected,
        "measured": outcome.measured,
        "passed": outcome.passed,
    }


def render_json(
    results: Sequence[ScenarioResult], verdicts: Sequence[Verdict] | None = None
) -> str:
    """The whole report as a JSON document (floats round-trip exactly).

    With ``verdicts`` each scenario gains ``passed`` and ``expectations`` (additive keys).
    """
    scenarios = [scenario_json(r) for r in results]
    if verdicts is not None:
        for entry, verdict in zip(scenarios, verdicts, strict=True):
            entry["passed"] = verdict.passed
            entry["expectations"] = [_outcome(o) for o in verdict.outcomes]
    document = {
        "tool": "xentcheck",
        "version": __version__,
        "schema": SCHEMA,
        "scenarios": scenarios,
    }
    return json.dumps(document, indent=2, allow_nan=False) + "\n"


def _limit(limit: Limit | None) -> dict[str, Any] | None:
    if limit is None:
        return None
    return {"largest_safe_logit": number(limit.largest_safe_logit),
            "largest_safe_spread": number(limit.largest_safe_spread),
            "smallest_safe_logit": number(limit.smallest_safe_logit),
            "no_safe_logit": limit.no_safe_logit,
            "no_safe_spread": limit.no_safe_spread}


def _options(options: LossOptions) -> dict[str, Any]:
    """The loss options, as given (defaults included: 0, null, 1)."""
    return {"z_loss": options.z_loss, "logit_softcap": options.logit_softcap,
            "temperature": options.temperature}


def render_limits_json(rows: Sequence[LimitRow]) -> str:
    """The ``limits`` command's document: one entry per pipeline and dtype."""
    document = {
        "tool": "xentcheck",
        "version": __version__,
        "schema": SCHEMA,
        "limits": [
            {
                "loss": row.family,
                "pipeline": row.pipeline,
                "dtype": row.dtype,
                "classes": row.classes,
                "options": _options(row.options),
                **(_limit(row.bisected) or {}),
                "closed_form": _limit(row.closed_form),
                "spread_without_subnormals": number(row.spread_without_subnormals),
                "agrees": row.agrees,
            }
            for row in rows
        ],
    }
    return json.dumps(document, indent=2, allow_nan=False) + "\n"


def render_sweep_json(result: SweepResult) -> str:
    """The ``sweep`` command's document: break points and the error curve of each pair."""
    spec = result.spec
    document = {
        "tool": "xentcheck",
        "version": __version__,
        "schema": SCHEMA,
        "sweep": {
            "loss": spec.family, "classes": spec.classes, "pattern": spec.pattern,
            "start": spec.start, "stop": spec.stop, "points": spec.points,
            "log_scale": spec.log_scale, "spread": spec.spread, "seed": spec.seed,
            "options": _options(spec.options),
            "magnitudes": [float(m) for m in result.magnitudes],
            "curves": [
                {
                    "pipeline": c.pipeline,
                    "dtype": c.dtype,
                    "first_nonfinite": number(c.first_nonfinite),
                    "first_inaccurate": number(c.first_inaccurate),
                    "grad_first_nonfinite": number(c.grad_first_nonfinite),
                    "grad_first_inaccurate": number(c.grad_first_inaccurate),
                    "tolerance": {"rel": c.tolerance.rel, "abs": c.tolerance.abs},
                    "bits": [None if b != b else float(b) for b in c.bits],
                }
                for c in result.curves
            ],
        },
    }
    return json.dumps(document, indent=2, allow_nan=False) + "\n"
