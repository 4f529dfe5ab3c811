"""The JSON report follows schema 1 (docs/json-report.md) exactly, plus additive keys."""

from __future__ import annotations

import json
import math

import numpy as np

from xentcheck.case import Case, LossSpec
from xentcheck.evaluator import evaluate
from xentcheck.pipelines import textbook
from xentcheck.precision import precisions_for
from xentcheck.report_json import number, render_json

SCENARIO_KEYS = {"name", "source", "loss", "shape", "classes", "reduction", "reference",
                 "results", "mismatches"}
RESULT_KEYS = {"pipeline", "dtype", "accumulate", "loss", "abs_error", "rel_error",
               "ulp_error", "flags", "first_bad_stage", "first_bad_index",
               "largest_safe_logit", "largest_safe_spread"}
FLAGS = {"overflow", "underflow", "nan", "inf", "precision_loss", "input_rounding"}
Number = (int, float)


def report(reduction: str) -> dict:  # type: ignore[type-arg]
    case = Case("r", np.array([[1000.0, 2000.0, 2500.0], [0.0, -40.0, 1.0]]),
                np.array([1, 0]), "index", LossSpec(reduction=reduction))  # type: ignore[arg-type]
    result = evaluate(case, precisions_for(["bfloat16", "float64"]), textbook("softmax", True))
    return json.loads(render_json([result]))  # type: ignore[no-any-return]


def is_number(value: object) -> bool:
    return isinstance(value, Number) or value in ("nan", "inf", "-inf")


def test_schema_1_keys_and_types() -> None:
    doc = report("mean")
    assert doc["tool"] == "xentcheck" and doc["schema"] == 1 and isinstance(doc["version"], str)
    (scenario,) = doc["scenarios"]
    assert set(scenario) >= SCENARIO_KEYS
    assert scenario["loss"] == "softmax" and scenario["shape"] == [2, 3]
    assert scenario["classes"] == 3 and scenario["reduction"] == "mean"
    assert is_number(scenario["reference"]["loss"])
    assert "per_example" not in scenario["reference"]
    for result in scenario["results"]:
        assert set(result) >= RESULT_KEYS
        assert "per_example" not in result
        for key in ("loss", "abs_error", "rel_error", "ulp_error"):
            assert is_number(result[key]), key
        assert set(result["flags"]) <= FLAGS
        assert result["first_bad_stage"] is None or isinstance(result["first_bad_stage"], str)
        index = result["first_bad_index"]
        assert index is None or all(isinstance(i, int) for i in index)
        for key in ("largest_safe_logit", "largest_safe_spread"):
            assert result[key] is None or is_number(result[key])
    for mismatch in scenario["mismatches"]:
        assert mismatch["kind"] in ("finiteness", "value")


def test_non_finite_numbers_are_strings() -> None:
    doc = report("mean")
    naive = next(r for r in doc["scenarios"][0]["results"] if r["pipeline"] == "naive")
    assert naive["loss"] == "nan" and naive["first_bad_stage"] == "exp"
    assert naive["first_bad_index"] == [0, 0]  # row 0, class 0: exp(1000) overflows
    assert number(math.inf) == "inf" and number(-math.inf) == "-inf" and number(None) is None


def test_reduction_none_has_per_example_and_null_loss() -> None:
    doc = report("none")
    scenario = doc["scenarios"][0]
    assert scenario["reference"]["loss"] is None
    assert len(scenario["reference"]["per_example"]) == 2
    assert scenario["reference"]["per_example"][0] == 500.0
    for result in scenario["results"]:
        assert result["loss"] is None and len(result["per_example"]) == 2


def test_floats_round_trip_exactly() -> None:
    case = Case("r", np.array([[0.0, -40.0], [0.1, 0.7]]), np.array([0, 1]), "index",
                LossSpec(reduction="none"))
    result = evaluate(case, precisions_for(["float32"]), textbook("softmax", True))
    doc = json.loads(render_json([result]))
    assert result.reference.per_example is not None
    assert doc["scenarios"][0]["reference"]["per_example"] == result.reference.per_example.tolist()
    assert doc["scenarios"][0]["reference"]["per_example"][0] == 4.2483542552915889e-18
    stable = result.findings[2]
    assert stable.per_example is not None
    assert doc["scenarios"][0]["results"][2]["per_example"] == [
        float(v) for v in stable.per_example
    ]
