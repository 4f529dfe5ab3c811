"""JUnit XML for CI servers: one testcase per scenario and expectation. Renders only."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence

from .expectations import Checked, Expectation, Outcome


def _case_name(expectation: Expectation | None, unchecked: str | None = None) -> str:
    """``line 6: pipeline: stable, loss: nan`` or ``--fail-on nan,inf@stable``: what the user
    wrote, where they wrote it."""
    if expectation is None:
        return f"runs ({unchecked})" if unchecked else "runs"
    where = f"line {expectation.line}: " if expectation.line else ""
    return where + expectation.describe()


def render_junit(checked: Sequence[Checked]) -> str:
    """A ``<testsuites>`` document; failures carry the measured value next to the expected."""
    suites = ET.Element("testsuites", name="xentcheck")
    total = failed = 0
    for item in checked:
        result = item.result
        by_expectation: dict[int, list[Outcome]] = {}
        order: list[Expectation | None] = []
        for outcome in item.verdict.outcomes:
            key = id(outcome.expectation)
            if key not in by_expectation:
                by_expectation[key] = []
                order.append(outcome.expectation)
            by_expectation[key].append(outcome)
        suite = ET.SubElement(suites, "testsuite", name=result.name, file=result.source)
        cases = order or [None]
        suite_failures = 0
        for expectation in cases:
            case = ET.SubElement(suite, "testcase", classname=result.name,
                                 name=_case_name(expectation, item.verdict.unchecked),
                                 file=result.source)
            if expectation is not None and expectation.line:
                case.set("line", str(expectation.line))
            outcomes = by_expectation.get(id(expectation), []) if expectation else []
            failures = [o for o in outcomes if not o.passed]
            if failures:
                suite_failures += 1
                failure = ET.SubElement(case, "failure", message=failures[0].message,
                                        type="expectation")
                failure.text = "\n".join(o.message for o in failures)
        suite.set("tests", str(len(cases)))
        suite.set("failures", str(suite_failures))
        total += len(cases)
        failed += suite_failures
    suites.set("tests", str(total))
    suites.set("failures", str(failed))
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"
