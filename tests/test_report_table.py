"""The table report says each thing once and quotes values that the table or the JSON holds.

With ``reduction: none`` every row's loss is at one and the same example (the one where the
pipelines are farthest from the reference), and each mismatch names its example.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from xentcheck.case import Case, LossSpec
from xentcheck.cli import cli
from xentcheck.evaluator import evaluate
from xentcheck.pipelines import select
from xentcheck.precision import precisions_for
from xentcheck.report_json import render_json

UNNORMALISED = str(Path(__file__).parent.parent / "configs" / "probabilities_unnormalised.yaml")


def run(*args: str, width: int = 160) -> str:
    result = CliRunner().invoke(cli, ["run", *args], env={"COLUMNS": str(width),
                                                          "NO_COLOR": "1"},
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


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


def row_text(text: str, pipeline: str, dtype: str) -> str:
    return "\n".join(line for line in text.splitlines()
                     if re.match(rf"^│?{pipeline}\s+│?\s*{dtype}\s", line))


def test_every_row_shows_the_loss_at_the_same_example() -> None:
    text = run(UNNORMALISED)
    scenario = scenario_json(UNNORMALISED)
    assert "loss at [1]" in text  # the example, named in the header of the column
    reference = scenario["reference"]["per_example"][1]
    assert f"reference loss at example [1]: {reference:.17g}" in text
    for result in scenario["results"]:
        row = row_text(text, result["pipeline"], result["dtype"])
        value = result["per_example"][1]
        shown = value if isinstance(value, str) else f"{value:.9g}"
        assert re.search(rf"(?<![\w.]){re.escape(shown)}(?![\w.])", row), (row, shown)
        worst = "[" + ",".join(map(str, result["worst_index"])) + "]"
        assert worst in row
    # bfloat16 naive: its worst error is at example 0 but the row shows example 1
    naive_bf16 = next(r for r in scenario["results"]
                      if (r["pipeline"], r["dtype"]) == ("naive", "bfloat16"))
    assert naive_bf16["worst_index"] == [0]
    for mismatch in scenario["mismatches"]:
        a, b = mismatch["pipelines"]
        la, lb = (v if isinstance(v, str) else f"{v:.9g}" for v in mismatch["losses"])
        assert f"{mismatch['dtype']} at example [1]: {a} gives {la}" in text
        assert f"{b} gives {lb}" in text


def test_the_header_names_a_logits_file_once(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    np.save(tmp_path / "lm.npy", np.array([[1.0, 2.0, 3.0]]))
    np.save(tmp_path / "labels.npy", np.array([2]))
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["run", "--logits", "lm.npy", "--labels", "labels.npy"],
                           env={"NO_COLOR": "1"}, catch_exceptions=False)
    assert result.stdout.splitlines()[0] == "lm.npy"
    path = str(tmp_path / "lm.npy")
    result = runner.invoke(cli, ["run", "--logits", path, "--labels",
                                 str(tmp_path / "labels.npy")], env={"NO_COLOR": "1"},
                           catch_exceptions=False)
    assert result.stdout.splitlines()[0] == path
