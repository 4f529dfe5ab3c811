"""The table report says each thing once and quotes values that the table or the JSON holds.

With ``reduction: none`` every row's loss is at one and the same example (the one where the
pipelines are farthest from the reference), and each mismatch names its example.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from click.testing import CliRunner

from xentcheck.case import Case, LossSpec
from xentcheck.cli import cli
from xentcheck.evaluator import evaluate
from xentcheck.pipelines import select
from xentcheck.precision import precisions_for
from xentcheck.report_json import render_json

UNNORMALISED = str(Path(__file__).parent.parent / "configs" / "probabilities_unnormalised.yaml")


def per_example_case() -> Case:
    # row 1 is the naive overflow: exp(1000) is inf in float16, inf/inf = NaN; its true
    # loss is 2500 - 2000 + log(1 + e^-500 + e^-1500) = 500 to double precision
    logits = np.array([[0.0, -40.0, 1.0], [1000.0, 2000.0, 2500.0], [0.0, 0.0, 0.0]])
    return Case("p", logits, np.array([0, 1, 2]), "index",
                LossSpec(reduction="none"))  # type: ignore[arg-type]


def test_a_mismatch_names_the_example_whose_losses_it_quotes() -> None:
    result = evaluate(per_example_case(), precisions_for(["float16"]),
                      select("softmax", True, ["naive", "stable"]))
    (mismatch,) = result.mismatches
    assert mismatch.kind == "finiteness" and mismatch.index == (1,)
    document = json.loads(render_json([result]))["scenarios"][0]
    (entry,) = document["mismatches"]
    assert entry["index"] == [1]
    by_pipeline = {r["pipeline"]: r["per_example"] for r in document["results"]}
    assert entry["losses"] == [by_pipeline["naive"][1], by_pipeline["stable"][1]]
    assert entry["losses"] == ["nan", 500.0]
    # the same example heads the table: every pipeline's loss is shown there
    assert result.focus_index == (1,)


def test_a_reduced_loss_has_no_mismatch_index() -> None:
    case = Case("m", np.array([1000.0, 2000.0, 2500.0]), np.array(1), "index", LossSpec())
    result = evaluate(case, precisions_for(["float32"]), select("softmax", True, None))
    assert result.mismatches and all(m.index is None for m in result.mismatches)
    document = json.loads(render_json([result]))["scenarios"][0]
    assert all(m["index"] is None for m in document["mismatches"])
    assert result.focus_index is None


def scenario_json(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["run", *args, "--format", "json"],
                                catch_exceptions=False)
    return json.loads(result.stdout)["scenarios"][0]  # type: ignore[no-any-return]


def test_value_mismatch_quotes_the_closed_form_loss_at_its_example() -> None:
    scenario = scenario_json(UNNORMALISED, "--dtype", "float64")
    (mismatch,) = scenario["mismatches"]
    assert mismatch["kind"] == "value" and mismatch["index"] == [1]
    # example 1: probabilities [1e-9, 0.9, 0.3], label 0, renormalised by the naive pipeline
    naive = -math.log(1e-9 / (1e-9 + 0.9 + 0.3))
    assert math.isclose(mismatch["losses"][0], naive, rel_tol=1e-14)
    results = {r["pipeline"]: r["per_example"] for r in scenario["results"]}
    assert mismatch["losses"] == [results["naive"][1], results["clipped"][1]]
