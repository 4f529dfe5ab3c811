"""Framework pipelines' answers are set side by side: against the reference, and against each
other (the evaluator computes it; the reports only render it)."""

from __future__ import annotations

import io
import json
import math

import numpy as np
from rich.console import Console

from xentcheck.case import Case, LossSpec
from xentcheck.evaluator import evaluate
from xentcheck.pipelines import SoftmaxNaive, SoftmaxStable
from xentcheck.precision import precisions_for
from xentcheck.report_json import render_json
from xentcheck.report_table import render_table


class GoodFramework(SoftmaxStable):
    # stands in for a library whose loss is right here: stable's arithmetic
    name = "good"
    framework = True


class BrokenFramework(SoftmaxNaive):
    # stands in for a library whose loss breaks here: naive's arithmetic
    name = "broken"
    framework = True


def overflow_case(reduction: str = "mean") -> Case:
    return Case("c", np.array([[1000.0, 2000.0, 2500.0], [0.0, 1.0, 2.0]]), np.array([1, 2]),
                "index", LossSpec(reduction=reduction))  # type: ignore[arg-type]


def test_each_framework_is_set_against_the_reference_and_the_others() -> None:
    result = evaluate(overflow_case(), precisions_for(["float32", "float64"]),
                      [SoftmaxNaive(), SoftmaxStable(), GoodFramework(), BrokenFramework()])
    assert [c.dtype for c in result.frameworks] == ["float32", "float64"]
    # the true loss: (500 + (2 + log(1 + e^-1 + e^-2)) - 2) / 2
    true = (500.0 + math.log1p(math.exp(-1) + math.exp(-2))) / 2
    for comparison in result.frameworks:
        assert comparison.reference is not None
        assert abs(comparison.reference - true) <= 1e-13 * true
        good, broken = comparison.answers
        assert (good.pipeline, broken.pipeline) == ("good", "broken")
        assert good.agrees_with_reference and not broken.agrees_with_reference
        assert math.isnan(broken.loss) and abs(good.loss - true) <= 1e-6 * true
        assert good.differs_from == ("broken",) and broken.differs_from == ("good",)
    # textbook pipelines take no part in it
    assert all(a.pipeline in ("good", "broken") for c in result.frameworks for a in c.answers)


def test_no_frameworks_no_comparison() -> None:
    result = evaluate(overflow_case(), precisions_for(["float32"]),
                      [SoftmaxNaive(), SoftmaxStable()])
    assert result.frameworks == ()


def test_reports_render_the_comparison() -> None:
    result = evaluate(overflow_case(), precisions_for(["float32"]),
                      [SoftmaxNaive(), SoftmaxStable(), GoodFramework(), BrokenFramework()])
    document = json.loads(render_json([result]))
    [entry] = document["scenarios"][0]["frameworks"]
    assert entry["dtype"] == "float32"
    assert entry["answers"][1] == {"pipeline": "broken", "loss": "nan",
                                   "agrees_with_reference": False, "differs_from": ["good"]}
    out = io.StringIO()
    render_table([result], Console(file=out, width=120, no_color=True))
    text = out.getvalue()
    assert "frameworks against the reference (250.203803):" in text
    assert "float32: good 250.203796 ✓ (differs from broken)" in text
    assert "broken nan ✗ (differs from good)" in text
    # pairs that involve a framework are told there, not as mismatch lines
    assert "naive gives nan but stable" in text
    assert "but good gives" not in text and "broken gives" not in text


def test_reduction_none_compares_at_the_focus_example() -> None:
    result = evaluate(overflow_case("none"), precisions_for(["float32"]),
                      [SoftmaxStable(), GoodFramework(), BrokenFramework()])
    assert result.focus_index == (0,)
    [comparison] = result.frameworks
    assert comparison.reference == 500.0
    good, broken = comparison.answers
    assert good.loss == 500.0 and math.isnan(broken.loss)
