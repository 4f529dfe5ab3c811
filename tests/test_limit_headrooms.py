"""Headrooms in ``run``: a loss that is not finite never sits beside only non-negative
headrooms (one is negative, or the limit it needs is absent), checked on the cases that
broke that rule and on a wide random search over pipelines, dtypes, magnitudes and labels."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from xentcheck.case import Case, LossSpec
from xentcheck.cli import cli
from xentcheck.evaluator import evaluate
from xentcheck.findings import Finding, ScenarioResult
from xentcheck.pipelines import textbook
from xentcheck.precision import precisions_for

ALL = precisions_for(["float16", "bfloat16", "float32", "float64"])
LN_HALF_SUBNORMAL_F64 = -1075 * math.log(2)  # exp(L) rounds to 0 in float64 below it


def finding(result: ScenarioResult, pipeline: str, dtype: str) -> Finding:
    return next(f for f in result.findings if f.pipeline == pipeline and f.dtype == dtype)


def softmax(logits: object, labels: object, dtypes: list[str], **spec: object) -> ScenarioResult:
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    kind = "index" if y.shape == x.shape[:-1] else "dense"
    case = Case("t", x, y, kind, LossSpec(reduction="none", **spec))  # type: ignore[arg-type]
    return evaluate(case, precisions_for(dtypes), textbook("softmax", True))


def explained(f: Finding) -> bool:
    """Whether a finding's headrooms account for a non-finite loss (always true if finite)."""
    values = np.asarray(f.per_example if f.loss is None else [f.loss], dtype=np.float64)
    if np.isfinite(values).all():
        return True
    if f.limit.no_safe_logit or f.limit.no_safe_spread:
        return True
    headrooms = (f.logit_headroom, f.spread_headroom, f.lower_logit_headroom)
    return any(h is not None and h < 0 for h in headrooms)


def test_underflow_to_zero_over_zero_has_a_negative_lower_headroom() -> None:
    # [-800, -801]: both exps are 0 in float64, 0/0 = NaN (the spread, 1, is fine)
    result = softmax([[-800.0, -801.0]], [0], ["float64"])
    naive = finding(result, "naive", "float64")
    assert naive.per_example is not None and np.isnan(naive.per_example).all()
    low = naive.limit.smallest_safe_logit
    assert low is not None and low == pytest.approx(LN_HALF_SUBNORMAL_F64, abs=1e-12)
    assert naive.lower_logit_headroom == -800.0 - low
    assert naive.spread_headroom is not None and naive.spread_headroom > 0
    assert explained(naive)
    # shifted and stable have no lower edge: D's most negative number
    assert finding(result, "stable", "float64").limit.smallest_safe_logit == -np.finfo(
        np.float64).max


def test_the_table_shows_the_lower_edge_and_how_far_past_it(write: Callable[[str, str], Path],
                                                           ) -> None:
    scenario = write("u.yaml", "name: u\nlogits: [[-800, -801]]\nlabels: [0]\n"
                     "dtypes: [float64]\n")
    table = CliRunner().invoke(cli, ["run", str(scenario)],
                               env={"NO_COLOR": "1", "COLUMNS": "250"})
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    header = next(line for line in lines if "pipeline" in line)
    assert "safe logit ≥" in header  # the column is there: naive has a lower edge
    naive = next(line for line in lines if line.lstrip("│").startswith("naive "))
    # -800 - ln(2^-1075) = -54.867
    assert "-745.133 (over by 54.87)" in naive
    stable = next(line for line in lines if line.lstrip("│").startswith("stable "))
    assert "format max" in stable and "format min" in stable and "over by" not in stable


def test_a_target_whose_exp_vanishes_is_measured_by_its_own_logit() -> None:
    # [-740, -750], label 1: exp(-740) > 0 but exp(-750) = 0, so p = 0 and the loss is inf
    # although the row maximum is above the lower edge and the spread is only 10
    result = softmax([[-740.0, -750.0]], [1], ["float64"])
    naive = finding(result, "naive", "float64")
    assert naive.per_example is not None and np.isinf(naive.per_example).all()
    assert naive.lower_logit_headroom == pytest.approx(-750.0 - LN_HALF_SUBNORMAL_F64,
                                                       abs=1e-9)
    assert naive.lower_logit_headroom < 0 and explained(naive)
    # label 0 logs only exp(-740), which is fine
    fine = finding(softmax([[-740.0, -750.0]], [0], ["float64"]), "naive", "float64")
    assert fine.per_example is not None and np.isfinite(fine.per_example).all()
    assert fine.lower_logit_headroom is not None and fine.lower_logit_headroom > 0


def test_naive_spread_edge_holds_at_every_level() -> None:
    # [1, -102.97] in float32: exp(-102.97) = 1.36 u rounds to u, divided by e = 2.72 it is
    # 0.37 u, which rounds to 0: inf at a spread of 103.97, which with the others at 0
    # would still be finite; the naive edge is taken at the worst level (103.57 here)
    result = softmax([[-102.97207642, 1.0]], [0], ["float32"])
    naive = finding(result, "naive", "float32")
    assert naive.per_example is not None and np.isinf(naive.per_example).all()
    assert naive.spread_headroom is not None and naive.spread_headroom < 0
    assert naive.lower_logit_headroom is not None and naive.lower_logit_headroom > 0
    shifted = finding(result, "shifted", "float32")  # the shift puts the others at 0
    assert shifted.per_example is not None and np.isfinite(shifted.per_example).all()


def test_one_hot_labels_log_every_class() -> None:
    # -sum(y log p) with a one-hot y takes log p of every class: p_1 = e^-200 is 0 in
    # float32, and 0 * log 0 is NaN; the spread that matters is 200, past 103.97 (C = 2)
    result = softmax([[0.0, -200.0]], [[1.0, 0.0]], ["float32"])
    naive = finding(result, "naive", "float32")
    assert naive.per_example is not None and np.isnan(naive.per_example).all()
    assert naive.spread_headroom is not None and naive.limit.largest_safe_spread is not None
    assert naive.spread_headroom == naive.limit.largest_safe_spread - 200.0 < 0
    assert result.stats.max_spread == 200.0


def test_the_spread_is_measured_as_d_holds_the_input() -> None:
    # float16 spacing is 8 in [8192, 16384): -9003.9 rounds to -9000 and -9020.1 to -9024,
    # a spread of 24 (16.2 as given), past shifted's 17.33 for two classes
    result = softmax([[-9003.9, -9020.1]], [1], ["float16"])
    shifted = finding(result, "shifted", "float16")
    assert shifted.per_example is not None and np.isinf(shifted.per_example).all()
    assert shifted.limit.largest_safe_spread is not None
    assert shifted.spread_headroom == shifted.limit.largest_safe_spread - 24.0
    assert explained(shifted)


def test_label_smoothing_sums_every_log_probability() -> None:
    # float16, 1000 classes, smoothing: 999 log-probabilities of about -100 sum past 65504
    x = np.full((1, 1000), -100.0)
    x[0, 0] = 0.0
    result = softmax(x, [0], ["float16"], label_smoothing=0.1)
    stable = finding(result, "stable", "float16")
    assert stable.per_example is not None and np.isinf(stable.per_example).all()
    spread = stable.limit.largest_safe_spread
    assert spread is not None and 999 * spread < 65520  # see test_limit_closed_forms
    assert stable.spread_headroom == spread - 100.0 < 0


def test_sigmoid_edges_from_above_and_below() -> None:
    # naive float16: x = +8 breaks (1 + e^-8 rounds to 1: log(1 - s) = -inf), x = -10 does
    # not (e^10 = 22026 is finite), x = -12 does (e^12 overflows float16)
    x = np.array([[-10.0, -12.0, 8.0]])
    case = Case("s", x, np.array([[1.0, 0.0, 0.0]]), "binary",
                LossSpec(family="sigmoid", reduction="none"))
    result = evaluate(case, precisions_for(["float16"]), textbook("sigmoid", True))
    naive = finding(result, "naive", "float16")
    assert naive.per_example is not None
    assert np.isfinite(naive.per_example).tolist() == [[True, False, False]]
    low, high = naive.limit.smallest_safe_logit, naive.limit.largest_safe_logit
    assert low is not None and high is not None
    assert naive.lower_logit_headroom == -12.0 - low < 0
    assert naive.logit_headroom == high - 8.0 < 0
    alone = Case("s", np.array([[-10.0]]), np.array([[1.0]]), "binary",
                 LossSpec(family="sigmoid", reduction="none"))
    fine = finding(evaluate(alone, precisions_for(["float16"]), textbook("sigmoid", True)),
                   "naive", "float16")
    assert fine.lower_logit_headroom is not None and fine.lower_logit_headroom >= 0
    assert fine.logit_headroom is not None and fine.logit_headroom >= 0


def test_llm_vocabulary_in_float16(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    logits = (3 * rng.standard_normal((4, 128256))).astype(np.float16)
    np.save(tmp_path / "x.npy", logits)
    np.save(tmp_path / "y.npy", np.array([1, 2, 3, 4]))
    args = ["run", "--logits", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
            "--dtype", "float16"]
    runner = CliRunner()
    doc = json.loads(runner.invoke(cli, [*args, "--format", "json"]).stdout)
    results = {r["pipeline"]: r for r in doc["scenarios"][0]["results"]}
    stable = results["stable"]
    assert stable["loss"] != "inf" and stable["largest_safe_logit"] is None
    assert stable["no_safe_logit"] is True and stable["no_safe_spread"] is True
    assert stable["logit_headroom"] is None and stable["spread_headroom"] is None
    naive = results["naive"]
    assert naive["largest_safe_logit"] == -0.671875  # below ln(65520 / 128256) = -0.6716
    top = float(logits.max())  # float16 input: D holds it as given
    assert naive["logit_headroom"] == -0.671875 - top
    assert naive["smallest_safe_logit"] == -17.328125
    targets = logits[np.arange(4), [1, 2, 3, 4]].astype(np.float64)
    assert naive["lower_logit_headroom"] == float(targets.min()) + 17.328125
    table = runner.invoke(cli, args, env={"NO_COLOR": "1", "COLUMNS": "250"})
    assert table.exit_code == 0
    row = next(line for line in table.stdout.splitlines() if line.startswith("│stable"))
    assert row.count("no safe value") == 2 and "over by" not in row


# -- the rule itself, over a wide random search ---------------------------------------------

@st.composite
def cases(draw: st.DrawFn) -> Case:
    family = draw(st.sampled_from(["softmax", "sigmoid"]))
    classes = draw(st.sampled_from([1, 2, 3, 7, 40, 300] if family == "softmax" else [1, 3]))
    level = draw(st.sampled_from([-1.0, 1.0])) * 10 ** draw(st.floats(-1, 5.2))
    scale = 10 ** draw(st.floats(-2, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = level + scale * rng.standard_normal((3, classes))
    if family == "sigmoid":
        y = rng.choice([0.0, 1.0, 0.5], (3, classes))
        return Case("r", x, y, "binary", LossSpec(family="sigmoid", reduction="none"))
    kind = draw(st.sampled_from(["index", "onehot", "soft"]))
    smoothing = draw(st.sampled_from([0.0, 0.0, 0.1]))
    spec = LossSpec(reduction="none", label_smoothing=smoothing)
    if kind == "index":
        return Case("r", x, rng.integers(0, classes, 3), "index", spec)
    y = (np.eye(classes)[rng.integers(0, classes, 3)] if kind == "onehot"
         else rng.dirichlet(np.ones(classes), 3))
    return Case("r", x, y, "dense", spec)


@settings(max_examples=150, derandomize=True, deadline=None)
@given(cases())
def test_a_loss_that_is_not_finite_has_a_negative_headroom_or_no_limit(case: Case) -> None:
    result = evaluate(case, ALL, textbook(case.spec.family, True))
    unexplained = [(f.pipeline, f.dtype) for f in result.findings if not explained(f)]
    assert not unexplained
