"""GitHub Actions: workflow-command annotations and a job-summary table. Renders only."""

from __future__ import annotations

from collections.abc import Sequence

from .expectations import Checked


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def render_annotations(checked: Sequence[Checked]) -> str:
    """``::error file=...,line=...::message`` for every failed expectation."""
    lines = []
    for item in checked:
        source = item.result.source
        for outcome in item.verdict.failures:
            props = [f"file={_escape_property(source)}"]
            if outcome.expectation.line:
                props.append(f"line={outcome.expectation.line}")
            props.append(f"title={_escape_property('xentcheck ' + item.result.name)}")
            lines.append(f"::error {','.join(props)}::{_escape_data(outcome.message)}")
    return "".join(line + "\n" for line in lines)


def render_step_summary(checked: Sequence[Checked]) -> str:
    """A Markdown table for ``$GITHUB_STEP_SUMMARY``."""
    rows = ["## xentcheck", "", "| scenario | result | failed expectations |", "|---|---|---|"]
    for item in checked:
        failures = item.verdict.failures
        status = "✅ pass" if not failures else "❌ fail"
        if item.verdict.unchecked:
            status = f"ran ({item.verdict.unchecked})"
        detail = "<br>".join(o.message.replace("|", "\\|") for o in failures) or "—"
        rows.append(f"| `{item.result.name}` | {status} | {detail} |")
    return "\n".join(rows) + "\n"
