"""Expectations: what a scenario says must hold, checked against its findings.

A scenario's ``expect:`` is a list of mappings. Each selects findings by ``pipeline`` and
``dtype`` (a name or a list; all when absent) and states conditions on every selected one:

``loss``
    ``finite``, ``nan``, ``inf`` or ``not_finite``.
``flags`` / ``no_flags``
    flags that must be present / absent (the vocabulary of docs/json-report.md).
``max_ulp_error``, ``max_rel_error``, ``max_abs_error``
    upper bounds on the error against the reference.
``min_largest_safe_logit``, ``min_largest_safe_spread``
    lower bounds on the pipeline's limits.
``first_bad_stage``
    the stage where trouble must begin (``null`` for none).
``first_bad_source``
    for a user's loss function: the ``FILE:LINE`` of its source where trouble must begin.

An item may instead hold ``no_mismatch: [a, b, ...]``: no mismatch between those pipelines
(in the selected dtypes). Unknown keys are errors; so is a selector that matches nothing.
``--fail-on FLAGS[@PIPELINES]`` adds conditions from the command line.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError, UsageError
from .findings import FLAGS, Finding, ScenarioResult
from .pipelines import PIPELINES
from .precision import DTYPE_NAMES

LOSS_STATES = ("finite", "nan", "inf", "not_finite")
BOUNDS = {
    "max_ulp_error": "ulp_error",
    "max_rel_error": "rel_error",
    "max_abs_error": "abs_error",
}
LIMITS = {
    "min_largest_safe_logit": "largest_safe_logit",
    "min_largest_safe_spread": "largest_safe_spread",
}
CONDITIONS = ("loss", "flags", "no_flags", "first_bad_stage", "first_bad_source", *BOUNDS,
              *LIMITS)
KEYS = ("pipeline", "dtype", "no_mismatch", *CONDITIONS)
# Every registered pipeline name, whatever the family or input kind: a --fail-on rule applies
# to every scenario, so a name is known if any scenario could run it.
PIPELINE_NAMES: tuple[str, ...] = tuple(dict.fromkeys(p.name for p in PIPELINES))


@dataclass(frozen=True)
class Expectation:
    """One item of ``expect:`` (or one ``--fail-on`` rule), with where it was written."""

    conditions: dict[str, Any]
    pipelines: tuple[str, ...] | None = None
    dtypes: tuple[str, ...] | None = None
    no_mismatch: tuple[str, ...] | None = None
    line: int | None = None
    origin: str = "expect"  # "expect" or "--fail-on"
    # how the user wrote it: the item's keys and values as read, or the --fail-on rule
    written: tuple[tuple[str, Any], ...] | str = ()

    def describe(self) -> str:
        """The expectation as the user wrote it: ``pipeline: naive, no_flags: [nan, inf]``,
        or ``--fail-on nan,inf@stable``."""
        if isinstance(self.written, str):
            return self.written
        return ", ".join(f"{key}: {_as_written(value)}" for key, value in self.written)


def _as_written(value: Any) -> str:
    """A YAML value in YAML's own flow style (lists in brackets, null, true/false)."""
    if isinstance(value, list):
        return "[" + ", ".join(_as_written(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_as_written(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class Outcome:
    """An expectation against one finding (or one dtype, for ``no_mismatch``)."""

    expectation: Expectation
    passed: bool
    subject: str  # e.g. "naive float32"
    condition: str  # e.g. "loss"
    expected: str
    measured: str

    @property
    def message(self) -> str:
        return (f"{self.subject}: {self.condition} expected {self.expected}, "
                f"measured {self.measured}")


@dataclass(frozen=True)
class Verdict:
    """Every outcome of one scenario."""

    outcomes: tuple[Outcome, ...] = field(default_factory=tuple)
    stated: int = 0  # expectations and --fail-on rules there were to check

    @property
    def unchecked(self) -> str | None:
        """Why nothing was checked (None when something was): a run, not a pass."""
        if self.outcomes:
            return None
        if not self.stated:
            return "no expectations"
        return "no expectation applies to the dtypes and pipelines run"

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outcomes)

    @property
    def failures(self) -> tuple[Outcome, ...]:
        return tuple(o for o in self.outcomes if not o.passed)


# -- parsing -----------------------------------------------------------------------------------


def _names(value: Any, key: str, choices: Sequence[str] | None = None) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise InputError("must be a name or a non-empty list of names", field=f"expect.{key}")
    if choices is not None:
        for item in items:
            if item not in choices:
                raise InputError(f"{item!r} is not one of {', '.join(choices)}",
                                 field=f"expect.{key}")
    return tuple(items)


def _bound(value: Any, key: str) -> float:
    """A finite number; an upper bound on an error is also non-negative (no error passes a
    negative bound, and NaN or infinity would make every comparison pass or fail)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"must be a number, not {value!r}", field=f"expect.{key}")
    if not math.isfinite(value):
        raise InputError(f"must be a finite number, not {value}", field=f"expect.{key}")
    if key in BOUNDS and value < 0:
        raise InputError(f"must not be negative, not {value}", field=f"expect.{key}")
    return float(value)


def parse_expectations(
    value: Any, lines: Sequence[int | None], pipelines: Sequence[str]
) -> tuple[Expectation, ...]:
    """Validate a scenario's ``expect:`` list; ``lines`` gives each item's line and
    ``pipelines`` the names that apply to the scenario's loss."""
    if not isinstance(value, list) or not value:
        raise InputError("must be a non-empty list of expectations", field="expect")
    parsed = []
    for i, item in enumerate(value):
        line = lines[i] if i < len(lines) else None
        where = f"expect[{i}]" + (f" (line {line})" if line else "")
        if not isinstance(item, dict) or not item:
            raise InputError("each expectation is a mapping of conditions", field=where)
        for key in item:
            if key not in KEYS:
                hint = difflib.get_close_matches(str(key), KEYS, n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                raise InputError(f"unknown expectation key {key!r}{suggestion}", field=where)
        try:
            parsed.append(_expectation(item, line, pipelines))
        except InputError as exc:
            raise InputError(exc.message, field=f"{where}: {exc.field}") from None
    return tuple(parsed)


def _expectation(item: dict[str, Any], line: int | None,
                 pipelines: Sequence[str]) -> Expectation:
    conditions: dict[str, Any] = {}
    for key, raw in item.items():
        if key == "loss":
            if raw not in LOSS_STATES:
                raise InputError(f"must be one of {', '.join(LOSS_STATES)}", field=key)
            conditions[key] = raw
        elif key in ("flags", "no_flags"):
            conditions[key] = _names(raw, key, FLAGS) if raw != [] else ()
        elif key == "first_bad_stage":
            if raw is not None and not isinstance(raw, str):
                raise InputError("must be a stage name or null", field=key)
            conditions[key] = raw
        elif key == "first_bad_source":
            if raw is not None and not isinstance(raw, str):
                raise InputError("must be FILE:LINE or null", field=key)
            conditions[key] = raw
        elif key in BOUNDS or key in LIMITS:
            conditions[key] = _bound(raw, key)
    no_mismatch = (_names(item["no_mismatch"], "no_mismatch", pipelines)
                   if "no_mismatch" in item else None)
    if no_mismatch is not None and len(no_mismatch) < 2:
        raise InputError("names at least two pipelines", field="no_mismatch")
    if not conditions and no_mismatch is None:
        raise InputError("states no condition", field="expect")
    return Expectation(
        conditions=conditions,
        pipelines=_names(item["pipeline"], "pipeline", pipelines) if "pipeline" in item else None,
        dtypes=_names(item["dtype"], "dtype", DTYPE_NAMES) if "dtype" in item else None,
        no_mismatch=no_mismatch,
        line=line,
        written=tuple((str(key), raw) for key, raw in item.items()),
    )


def parse_fail_on(rules: Sequence[str]) -> tuple[Expectation, ...]:
    """``--fail-on nan,inf@stable,shifted``: those flags on those pipelines fail the run."""
    parsed = []
    for rule in rules:
        flags_part, _, pipes_part = rule.partition("@")
        flags = tuple(f.strip() for f in flags_part.split(",") if f.strip())
        unknown = [f for f in flags if f not in FLAGS]
        if not flags or unknown:
            what = f"unknown flag {unknown[0]!r}" if unknown else "no flag named"
            raise UsageError(f"--fail-on {rule!r}: {what}; flags are {', '.join(FLAGS)}")
        pipes = tuple(p.strip() for p in pipes_part.split(",") if p.strip())
        # a name with a colon is a user function's SPEC (--loss-fn, functions:)
        unknown = [p for p in pipes if p not in PIPELINE_NAMES and ":" not in p]
        if unknown or (not pipes and "@" in rule):
            what = f"unknown pipeline {unknown[0]!r}" if unknown else "no pipeline after '@'"
            raise UsageError(f"--fail-on {rule!r}: {what}; pipelines are "
                             f"{', '.join(PIPELINE_NAMES)}")
        parsed.append(Expectation({"no_flags": flags}, pipelines=pipes or None,
                                  origin="--fail-on", written=f"--fail-on {rule}"))
    return tuple(parsed)


# -- checking ----------------------------------------------------------------------------------


def _selected(expectation: Expectation, result: ScenarioResult) -> list[Finding]:
    return [
        f for f in result.findings
        if (expectation.pipelines is None or f.pipeline in expectation.pipelines)
        and (expectation.dtypes is None or f.dtype in expectation.dtypes)
    ]


def _loss_state(finding: Finding) -> str:
    values = [finding.loss] if finding.loss is not None else [
        float(v) for v in (finding.per_example if finding.per_example is not None else [])
    ]
    if any(math.isnan(v) for v in values):
        return "nan"
    if any(math.isinf(v) for v in values):
        return "inf"
    return "finite"


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.6g}"


def _check_finding(expectation: Expectation, finding: Finding) -> list[Outcome]:
    subject = f"{finding.pipeline} {finding.dtype}"
    out = []

    def outcome(condition: str, passed: bool, expected: str, measured: str) -> None:
        out.append(Outcome(expectation, passed, subject, condition, expected, measured))

    for key, wanted in expectation.conditions.items():
        if key == "loss":
            state = _loss_state(finding)
            ok = state == wanted or (wanted == "not_finite" and state != "finite")
            shown = _fmt(finding.loss) if finding.loss is not None else state
            outcome("loss", ok, wanted, shown)
        elif key == "flags":
            missing = [f for f in wanted if f not in finding.flags]
            outcome("flags", not missing, "+" + ",".join(wanted),
                    ",".join(finding.flags) or "no flags")
        elif key == "no_flags":
            present = [f for f in wanted if f in finding.flags]
            outcome("flags", not present, "none of " + ",".join(wanted),
                    ",".join(finding.flags) or "no flags")
        elif key == "first_bad_stage":
            outcome("first_bad_stage", finding.first_bad_stage == wanted, str(wanted),
                    str(finding.first_bad_stage))
        elif key == "first_bad_source":
            outcome("first_bad_source", finding.first_bad_source == wanted, str(wanted),
                    str(finding.first_bad_source))
        elif key in BOUNDS:
            measured = float(getattr(finding, BOUNDS[key]))
            outcome(BOUNDS[key], measured <= wanted, f"<= {wanted:g}", _fmt(measured))
        elif key in LIMITS:
            limit = getattr(finding.limit, LIMITS[key])
            outcome(LIMITS[key], limit is not None and limit >= wanted, f">= {wanted:g}",
                    _fmt(limit))
    return out


def _check_mismatch(expectation: Expectation, result: ScenarioResult) -> list[Outcome]:
    assert expectation.no_mismatch is not None
    names = set(expectation.no_mismatch)
    ran = tuple(dict.fromkeys(f.dtype for f in result.findings))
    dtypes = [d for d in expectation.dtypes or ran if d in ran]
    pipelines = {f.pipeline for f in result.findings}
    if not names <= pipelines:
        return []  # a pipeline the command line left out
    out = []
    for dtype in dtypes:
        found = [m for m in result.mismatches
                 if m.dtype == dtype and set(m.pipelines) <= names]
        measured = "; ".join(f"{a} vs {b} ({m.kind})" for m in found for a, b in [m.pipelines])
        out.append(Outcome(expectation, not found, dtype, "mismatch",
                           f"none between {', '.join(expectation.no_mismatch)}",
                           measured or "none"))
    return out


def check(result: ScenarioResult, expectations: Sequence[Expectation]) -> Verdict:
    """Every expectation against the scenario's findings (those that select none of them,
    because the command line left their dtypes or pipelines out, yield no outcome)."""
    outcomes: list[Outcome] = []
    for expectation in expectations:
        if expectation.no_mismatch is not None:
            outcomes.extend(_check_mismatch(expectation, result))
        if not expectation.conditions:
            continue
        # A selector that matches nothing here names dtypes or pipelines the command line
        # left out (names themselves were checked when the scenario was read).
        for finding in _selected(expectation, result):
            outcomes.extend(_check_finding(expectation, finding))
    return Verdict(tuple(outcomes), stated=len(expectations))




@dataclass(frozen=True)
class Checked:
    """A scenario's findings with the verdict on its expectations."""

    result: ScenarioResult
    verdict: Verdict
    expectations: tuple[Expectation, ...] = ()
