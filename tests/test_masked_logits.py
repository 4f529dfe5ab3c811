"""``-inf`` logits are masked entries, as the frameworks treat them: exp gives an exact 0.

The reference is checked against mpmath (which takes exp(-inf) = 0 from the definitions),
the pipelines' losses and gradients against PyTorch values recorded by
``tests/record_torch_masked.py`` (float32, ``tests/fixtures/torch_masked.json``), and the
command line end to end on a ``.npy`` file holding ``-inf``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mpmath
import numpy as np
import pytest
from click.testing import CliRunner

from xentcheck import reference as ref
from xentcheck.case import Case, LossSpec
from xentcheck.case_validation import make_case
from xentcheck.cli import cli
from xentcheck.errors import InputError
from xentcheck.evaluator import evaluate
from xentcheck.execution import Denominators, PipelineRun, blocks
from xentcheck.findings import ScenarioResult
from xentcheck.misuse import RULES, explain
from xentcheck.pipelines import select, textbook
from xentcheck.precision import Precision, precisions_for
from xentcheck.stages import StageRunner

MPMATH_DPS = 50  # this module's tests run at it (conftest.py)
INF = math.inf
FIXTURE = Path(__file__).parent / "fixtures" / "torch_masked.json"


# -- mpmath, straight from the definition ----------------------------------------------------


def mp_loss(row: list[float], a: list[float]) -> mpmath.mpf:
    """``sum_c a_c (log sum_j exp(x_j) - x_c)`` over the classes the label weighs; a masked
    class (exp(-inf) = 0) with weight is inf, without weight is left out (0, not 0 * inf);
    with every entry masked, log 0 - (-inf) is NaN."""
    xs = [mpmath.mpf(v) for v in row]
    lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in xs))
    if lse == -mpmath.inf:
        return mpmath.nan
    return mpmath.fsum(mpmath.mpf(ac) * (lse - xc) for ac, xc in zip(a, xs, strict=True) if ac)


def mp_probabilities(row: list[float]) -> list[mpmath.mpf]:
    xs = [mpmath.mpf(v) for v in row]
    total = mpmath.fsum(mpmath.exp(v) for v in xs)
    return [mpmath.exp(v) / total for v in xs]


def ulps(got: float, true: mpmath.mpf) -> float:
    """|got - true| in float64 ulps at the truth; 0 for equal infinities or both NaN."""
    if mpmath.isnan(true) or math.isnan(got):
        return 0.0 if mpmath.isnan(true) and math.isnan(got) else math.inf
    if mpmath.isinf(true) or math.isinf(got):
        return 0.0 if float(true) == got else math.inf
    spacing = float(np.spacing(abs(float(true)))) if true else 5e-324
    return float(abs(mpmath.mpf(got) - true) / spacing)


def masked_rows(dtype: str, seed: int, far_apart: bool) -> np.ndarray:
    """Rows of 7 logits, some entries -inf: random masks, a row with one unmasked entry, a
    row with every entry masked, and with ``far_apart`` (row 3) magnitudes whose differences
    float64 cannot hold (the reference's TwoSum path; without it, float32 blocks take the
    exact-difference path)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 4.0, (12, 7))
    x[rng.random(x.shape) < 0.3] = -INF
    x[0] = [-INF, 2.5, -INF, -INF, -INF, -INF, -INF]
    x[1] = -INF
    x[3] = [1e9, -INF, 1e9 - 0.75, 3e-9, -INF, 1e9 + 0.5, -2.0] if far_apart else x[3]
    return x.astype(dtype)


PATHS = [("float32", False), ("float32", True), ("float64", False)]


@pytest.mark.parametrize(("dtype", "far_apart"), PATHS)
def test_reference_with_integer_labels_against_mpmath(dtype: str, far_apart: bool) -> None:
    x = masked_rows(dtype, seed=1, far_apart=far_apart)
    rng = np.random.default_rng(2)
    target = rng.integers(0, 7, len(x))
    target[2] = int(np.argmax(x[2] == -INF)) if (x[2] == -INF).any() else 0  # a masked target
    weight = np.ones(len(x))
    parts = ref.shifted_log_sum(x)
    losses = ref.softmax_index_losses(x, target, weight, parts)
    grads = ref.softmax_index_gradients(x, target, weight, parts)
    for i, row in enumerate(x.astype(np.float64).tolist()):
        a = [1.0 if c == target[i] else 0.0 for c in range(7)]
        assert ulps(float(losses[i]), mp_loss(row, a)) <= 2, (i, row, losses[i])
        check_gradient_row(grads[i], row, a)
    assert math.isinf(losses[2]) == (x[2, target[2]] == -INF)
    assert math.isnan(losses[1])  # every entry masked


@pytest.mark.parametrize(("dtype", "far_apart"), PATHS)
def test_reference_with_soft_labels_against_mpmath(dtype: str, far_apart: bool) -> None:
    """Soft labels: a masked class without label weight adds nothing (not 0 * inf = NaN); a
    masked class with weight makes the loss inf."""
    x = masked_rows(dtype, seed=3, far_apart=far_apart)
    rng = np.random.default_rng(4)
    a = rng.random(x.shape) * (x != -INF)  # no weight on masked classes...
    a[[1, 5]] = rng.random((2, 7))  # ...except in rows 1 (all masked) and 5: every class
    a /= np.maximum(a.sum(axis=-1, keepdims=True), 1e-300)
    losses = ref.softmax_losses(x, a)
    grads = ref.softmax_gradients(x, a)
    for i, row in enumerate(x.astype(np.float64).tolist()):
        assert ulps(float(losses[i]), mp_loss(row, a[i].tolist())) <= 4, (i, row)
        check_gradient_row(grads[i], row, a[i].tolist())
    assert math.isinf(losses[5]) == bool((x[5] == -INF).any())
    assert np.isfinite(losses[[0, 2, 3, 4]]).all() and math.isnan(losses[1])
    assert (grads[5][x[5] == -INF] == -a[5][x[5] == -INF]).all()


def check_gradient_row(got: np.ndarray, row: list[float], a: list[float]) -> None:
    """``A p_j - a_j`` from mpmath's probabilities; a masked entry's is 0 exactly (-a_j with
    weight on it); every entry NaN where every entry is masked."""
    if all(v == -INF for v in row):
        assert np.isnan(got).all()
        return
    p = mp_probabilities(row)
    total = mpmath.fsum(mpmath.mpf(v) for v in a)
    for j, value in enumerate(got.tolist()):
        true = total * p[j] - mpmath.mpf(a[j])
        if row[j] == -INF:
            assert value == -a[j]
        else:
            # A p_j - a_j cancels where p_j is near a_j / A: the bound is in ulps of the terms
            scale = max(float(total * p[j]), a[j], 1e-300)
            assert abs(mpmath.mpf(value) - true) <= 4 * np.spacing(scale), (j, value, true)


def test_reference_gradient_of_an_ignored_masked_row_is_zero() -> None:
    x = np.array([[-INF, -INF, -INF], [0.0, -INF, 1.0]])
    grads = ref.softmax_index_gradients(x, np.array([0, 2]), np.array([0.0, 1.0]))
    assert grads[0].tolist() == [0.0, 0.0, 0.0]
    assert grads[1, 1] == 0.0


def test_sigmoid_reference_at_minus_inf() -> None:
    """s(-inf) = 0: target 0 costs nothing, target 1 is inf; the gradient is s - z."""
    x = np.array([-INF, -INF, -INF])
    z = np.array([0.0, 1.0, 0.25])
    assert ref.sigmoid_losses(x, z).tolist() == [0.0, INF, INF]
    assert ref.sigmoid_gradients(x, z).tolist() == [0.0, -1.0, -0.25]


# -- validation ------------------------------------------------------------------------------


def test_minus_inf_logits_are_accepted_plus_inf_and_nan_are_not() -> None:
    labels = np.array([0])
    make_case(name="t", logits=np.array([[0.0, -INF]]), labels=labels)
    for bad, shown in ((INF, "inf"), (math.nan, "nan")):
        with pytest.raises(InputError, match=rf"holds {shown} at index \[0, 1\]; inputs must "
                                             r"be finite \(or -inf, a masked entry\)"):
            make_case(name="t", logits=np.array([[0.0, bad]]), labels=labels)


def test_bfloat16_logits_holding_nan_are_one_clean_error() -> None:
    """The screen's reduction over bfloat16 values warns on NaN in ml_dtypes: kept quiet
    (the suite turns warnings into errors), so the input error is all that is said."""
    import ml_dtypes

    x = np.array([[0.0, -INF, np.nan]], dtype=ml_dtypes.bfloat16)
    with pytest.raises(InputError, match=r"holds nan at index \[0, 2\]"):
        make_case(name="t", logits=x, labels=np.array([0]))
    make_case(name="t", logits=x[:, :2], labels=np.array([0]))


def test_probability_inputs_still_reject_minus_inf() -> None:
    with pytest.raises(InputError, match=r"holds -inf at index \[0, 1\]; inputs must be "
                                         r"finite$"):
        make_case(name="t", logits=np.array([[0.5, -INF]]), labels=np.array([0]),
                  from_logits=False)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_streamed_validation_looks_past_masks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              dtype: str) -> None:
    """Blocks holding -inf are screened in, and a NaN after them is still found first."""
    from xentcheck import case_validation as scenario
    from xentcheck.arrays import load_array

    x = np.zeros((50, 7), dtype=dtype)
    x[::3, 2] = -INF
    np.save(tmp_path / "ok.npy", x)
    monkeypatch.setattr(scenario, "_CHECK_VALUES", 7 * 3)
    labels = np.zeros(50, dtype=np.int64)
    ok = load_array(tmp_path / "ok.npy", key=None, source="s", field="logits")
    make_case(name="s", logits=ok, labels=labels)
    x[40, 5] = np.nan
    x[44, 1] = INF
    np.save(tmp_path / "bad.npy", x)
    bad = load_array(tmp_path / "bad.npy", key=None, source="s", field="logits")
    with pytest.raises(InputError, match=r"holds nan at index \[40, 5\]"):
        make_case(name="s", logits=bad, labels=labels)


# -- the stage watch -------------------------------------------------------------------------


def test_exp_of_minus_inf_is_not_an_underflow_but_a_flushed_finite_value_is() -> None:
    run = StageRunner(Precision("float32"), ("exp",)).bind(np.ones(1, dtype=bool))
    run.exp("exp", np.array([[-INF, 0.0]]), critical=np.array([[True, True]]))
    assert run.events == []
    run.exp("exp", np.array([[0.0, -200.0]]), critical=np.array([[True, True]]))
    assert [(e.kind, e.index) for e in run.events] == [("underflow", (0, 1))]


def test_one_over_inf_is_not_an_underflow() -> None:
    run = StageRunner(Precision("float32"), ("divide",)).bind(np.ones(1, dtype=bool))
    run.divide("divide", 1.0, np.array([[INF, 2.0]]), critical=np.array([[True, True]]))
    assert run.events == []


# -- pipelines through the evaluator ---------------------------------------------------------


def evaluate_softmax(x: list[list[float]], y: Any, dtypes: list[str] | None = None,
                     **spec: Any) -> ScenarioResult:
    logits = np.asarray(x, dtype=np.float64)
    labels = np.asarray(y)
    kind = "index" if labels.shape == logits.shape[:-1] else "dense"
    case = Case("t", logits, labels, kind, LossSpec(**spec))
    precisions = precisions_for(dtypes or ["float16", "bfloat16", "float32", "float64"])
    return evaluate(case, precisions, textbook("softmax", True))


def test_masked_entries_change_nothing_else() -> None:
    """Masking a class is removing it from the loss: every pipeline, every dtype, agrees with
    the reference of the unmasked classes (mpmath), unflagged, with no event. The gradient
    of ``stable`` (F.cross_entropy) is clean too; the textbook forms take the log of every
    probability, and autograd of log at a masked p = 0 is 0 / 0: NaN from the log's
    backward, as PyTorch gives for ``F.nll_loss(torch.log(p), t)`` (the fixture)."""
    x = [[2.0, -INF, 0.5, -1.0, -INF], [-INF, 3.0, -INF, -INF, 1.0]]
    result = evaluate_softmax(x, [0, 4])
    true = (mp_loss(x[0], [1, 0, 0, 0, 0]) + mp_loss(x[1], [0, 0, 0, 0, 1])) / 2
    assert ulps(result.reference.loss or 0.0, true) <= 2
    for f in result.findings:
        assert f.flags == () and f.events == (), (f.pipeline, f.dtype)
        if f.pipeline == "stable":
            assert f.grad_flags == (), f.dtype
        else:
            assert f.grad_flags == ("nan",), (f.pipeline, f.dtype)
            assert f.grad_first_bad is not None and f.grad_first_bad.stage == "log"
    stats = result.stats
    assert (stats.max_logit, stats.min_logit, stats.max_abs_logit) == (3.0, -1.0, 3.0)
    assert stats.max_spread == 2.0 and stats.masked.entries == 5
    assert result.warnings == ()


def test_a_masked_target_is_inf_everywhere_and_warned() -> None:
    result = evaluate_softmax([[0.0, -INF, 1.0], [1.0, 2.0, 0.0]], [1, 0])
    assert result.reference.loss == INF
    for f in result.findings:
        assert f.loss == INF and f.abs_error == 0.0, (f.pipeline, f.dtype)
        assert f.flags == ("inf",) and f.first_bad is None, (f.pipeline, f.dtype, f.first_bad)
    assert result.stats.max_spread == 1.0  # the masked target is left out of the spread
    [warning] = result.warnings
    assert warning.rule == "XC203" and "row [0], class 1" in warning.message


def test_an_all_masked_row_is_nan_and_agrees_with_the_nan_reference() -> None:
    """The reference is NaN there (0/0 in exact arithmetic too); a NaN result agrees with
    it (no error), and is still flagged nan, its first bad stage where the NaN appeared."""
    result = evaluate_softmax([[-INF, -INF, -INF], [1.0, 2.0, 0.0]], [1, 0])
    assert math.isnan(result.reference.loss or 0.0)
    stages = {"naive": "divide", "shifted": "shift", "stable": "shift"}
    for f in result.findings:
        assert math.isnan(f.loss or 0.0) and f.abs_error == 0.0 and f.ulp_error == 0.0
        assert f.flags == ("nan",) and f.first_bad is not None
        assert (f.first_bad.stage, f.first_bad.kind) == (stages[f.pipeline], "nan")
    assert [w.rule for w in result.warnings] == ["XC204"]
    assert (result.stats.max_logit, result.stats.max_abs_logit) == (2.0, 2.0)


def test_an_ignored_all_masked_row_counts_nowhere_but_is_warned() -> None:
    result = evaluate_softmax([[-INF, -INF, -INF], [1.0, 2.0, 0.0]], [-100, 0],
                              dtypes=["float32"], ignore_index=-100)
    true = mp_loss([1.0, 2.0, 0.0], [1, 0, 0])
    assert ulps(result.reference.loss or 0.0, true) <= 1
    assert all(f.flags == () for f in result.findings)
    [warning] = result.warnings
    assert warning.rule == "XC204" and "gradient there is NaN" in warning.message


def test_soft_labels_without_weight_on_a_masked_class() -> None:
    """The true loss leaves the masked class out; -sum(y * log p) takes 0 * -inf = NaN in
    every formulation, as F.cross_entropy does with probability targets: a finding (nan at
    the nll stage), not an input error."""
    x = [[0.0, -INF, 1.0]]
    result = evaluate_softmax(x, [[0.5, 0.0, 0.5]], dtypes=["float32", "float64"])
    assert ulps(result.reference.loss or 0.0, mp_loss(x[0], [0.5, 0.0, 0.5])) <= 1
    for f in result.findings:
        assert f.flags == ("nan",) and f.first_bad is not None, f.pipeline
        assert (f.first_bad.stage, f.first_bad.kind, f.first_bad.index) == ("nll", "nan", (0, 1))
    assert result.warnings == ()


def test_label_smoothing_weighs_masked_classes() -> None:
    result = evaluate_softmax([[0.0, -INF, 1.0]], [0], dtypes=["float32"], label_smoothing=0.1)
    assert result.reference.loss == INF
    assert all(f.loss == INF and "inf" in f.flags for f in result.findings)
    [warning] = result.warnings
    assert warning.rule == "XC203" and "label smoothing" in warning.message


def test_sigmoid_at_minus_inf() -> None:
    x = np.array([-INF, -INF, 0.5])
    z = np.array([0.0, 1.0, 1.0])
    case = Case("t", x, z, "binary", LossSpec(family="sigmoid", reduction="none"))
    result = evaluate(case, precisions_for(["float32"]), textbook("sigmoid", True))
    assert result.reference.per_example is not None
    assert result.reference.per_example[:2].tolist() == [0.0, INF]
    naive = next(f for f in result.findings if f.pipeline == "naive")
    # 0 * log(s(-inf)) = 0 * -inf: the NaN is made by the combine stage, not by a log of 0
    assert naive.first_bad is not None
    assert (naive.first_bad.stage, naive.first_bad.kind) == ("combine", "nan")
    assert result.stats.max_abs_logit == 0.5
    [warning] = result.warnings
    assert warning.rule == "XC203" and "index [1]" in warning.message


# -- against PyTorch (recorded) --------------------------------------------------------------


def fixture_cases() -> list[tuple[str, str]]:
    data = json.loads(FIXTURE.read_text(encoding="utf-8"))
    return [(name, pipeline) for name, case in data["cases"].items()
            for pipeline in case["pipelines"]]


def run_float32(name: str, pipeline: str) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """A recorded case through one pipeline in float32: (record, losses, gradient)."""
    data = json.loads(FIXTURE.read_text(encoding="utf-8"))["cases"][name]
    x = np.array(data["logits"], dtype=np.float32)
    y = np.array(data["labels"])
    family = data["family"]
    kind = "binary" if family == "sigmoid" else ("index" if y.shape == x.shape[:-1]
                                                 else "dense")
    case = Case("t", x, y, kind, LossSpec(family=family, **data["options"]))
    run = PipelineRun(select(family, True, [pipeline])[0], Precision("float32"))
    denominators = Denominators(np.zeros(case.classes))
    for block in blocks(case):
        denominators.add(case, block)
    outcomes = [run.run_block(case, block, denominators) for block in blocks(case)]
    losses = np.concatenate([o.per_example for o in outcomes]).astype(np.float64)
    gradient = np.concatenate([np.asarray(o.gradient) for o in outcomes]).astype(np.float64)
    return data, losses.ravel(), gradient.reshape(x.shape)


def recorded(values: list[str], shape: tuple[int, ...]) -> np.ndarray:
    return np.array([float(v) for v in values]).reshape(shape)


def within_float32_ulps(got: np.ndarray, want: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Equal (NaN with NaN, equal infinities), or within 4 float32 ulps of ``scale``."""
    spacing = np.spacing(np.abs(scale).astype(np.float32)).astype(np.float64)
    with np.errstate(invalid="ignore"):
        return (np.isnan(got) & np.isnan(want)) | (got == want) | (
            np.abs(got - want) <= 4 * spacing)


@pytest.mark.parametrize(("name", "pipeline"), fixture_cases())
def test_gradients_agree_with_pytorch(name: str, pipeline: str) -> None:
    """Masked entries get exactly the 0 PyTorch's autograd gives them; NaN where PyTorch's
    is NaN (an all-masked row even when ignored, the textbook forms' 0/0); other entries
    within 4 float32 ulps of the row's largest."""
    data, _, gradient = run_float32(name, pipeline)
    want = recorded(data["pipelines"][pipeline]["gradient"], gradient.shape)
    masked = np.array(data["logits"], dtype=np.float64) == -INF
    assert (gradient[masked & (want == 0)] == 0).all()
    assert (np.isnan(gradient) == np.isnan(want)).all()
    rows = want.reshape(-1, want.shape[-1]) if want.ndim > 1 else want[:, None]
    scale = np.nanmax(np.abs(np.where(np.isnan(rows), 0, rows)), axis=-1, keepdims=True)
    scale = np.broadcast_to(scale, rows.shape).reshape(want.shape)
    assert within_float32_ulps(gradient, want, scale).all(), (gradient, want)


@pytest.mark.parametrize(("name", "pipeline"), [c for c in fixture_cases()
                                                if c != ("sigmoid_masked", "stable")])
def test_losses_agree_with_pytorch(name: str, pipeline: str) -> None:
    """Per-example losses: inf at a masked target, NaN at an all-masked row and at 0 * log 0,
    as PyTorch computes the same formulation. (The stable sigmoid is the textbook
    max(x, 0) - x z + log1p(exp(-|x|)), not PyTorch's kernel, which gives NaN at x = -inf
    for either target: its gradient is compared, not its loss.)"""
    data, losses, _ = run_float32(name, pipeline)
    want = recorded(data["pipelines"][pipeline]["losses"], losses.shape)
    assert within_float32_ulps(losses, want, want).all(), (losses, want)


def test_the_fixture_records_what_the_issue_describes() -> None:
    """Guards against a fixture regenerated wrongly: PyTorch's F.cross_entropy gives inf for
    a masked target, NaN for an all-masked row, 0 for masked entries' gradient."""
    data = json.loads(FIXTURE.read_text(encoding="utf-8"))["cases"]
    stable = data["masked_target"]["pipelines"]["stable"]
    assert stable["losses"][0] == "inf" and stable["gradient"][1] == "-0.5"
    assert data["all_masked_row"]["pipelines"]["stable"]["losses"][0] == "nan"
    assert data["masked_other"]["pipelines"]["stable"]["gradient"][1] == "0.0"


# -- the command line ------------------------------------------------------------------------


def test_run_on_a_npy_with_masks(tmp_path: Path) -> None:
    x = np.array([[2.0, -INF, 0.5, -INF], [-INF, 1.0, 3.0, -INF], [0.0, -INF, -INF, -INF]],
                 dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.array([0, 2, 0]))
    result = CliRunner().invoke(cli, ["run", "--logits", str(tmp_path / "x.npy"), "--labels",
                                      str(tmp_path / "y.npy"), "--format", "json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    scenario = json.loads(result.output)["scenarios"][0]
    rows = x.astype(np.float64).tolist()
    true = (mp_loss(rows[0], [1, 0, 0, 0]) + mp_loss(rows[1], [0, 0, 1, 0])
            + mp_loss(rows[2], [1, 0, 0, 0])) / 3
    assert ulps(scenario["reference"]["loss"], true) <= 2
    for finding in scenario["results"]:
        assert finding["flags"] == [] and finding["first_bad_stage"] is None, finding
    assert scenario["input"]["max_abs_logit"] == 3.0 and scenario["input"]["max_logit"] == 3.0
    assert scenario["input"]["masked_logits"] == 7
    assert scenario["warnings"] == []


def test_run_rejects_plus_inf_in_a_npy_with_one_line(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.array([[0.0, INF]], dtype=np.float32))
    np.save(tmp_path / "y.npy", np.array([0]))
    result = CliRunner().invoke(cli, ["run", "--logits", str(tmp_path / "x.npy"), "--labels",
                                      str(tmp_path / "y.npy")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "holds inf at index [0, 1]" in lines[0]


def test_run_warns_of_masked_targets_in_the_table(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.array([[0.0, -INF, 1.0]], dtype=np.float32))
    np.save(tmp_path / "y.npy", np.array([1]))
    result = CliRunner().invoke(cli, ["run", "--logits", str(tmp_path / "x.npy"), "--labels",
                                      str(tmp_path / "y.npy"), "--dtype", "float32"],
                                env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert result.exit_code == 0
    assert "XC203" in result.output


def test_the_rules_are_explained() -> None:
    assert {"XC203", "XC204"} <= set(RULES)
    listing = explain()
    assert "masked-target" in listing and "all-masked-row" in listing
    assert "label smoothing" in explain("XC203").lower()


def test_masked_statistics_are_the_same_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts and first positions merged block by block equal the whole input's."""
    from xentcheck import execution

    rng = np.random.default_rng(9)
    x = rng.normal(0.0, 3.0, (40, 6))
    x[rng.random(x.shape) < 0.25] = -INF
    x[[7, 30]] = -INF  # all masked: row 7 counted, row 30 ignored
    labels = rng.integers(0, 6, 40)
    labels[30] = -100
    case = Case("t", x, labels, "index", LossSpec(ignore_index=-100))

    def run() -> ScenarioResult:
        return evaluate(case, precisions_for(["float32"]), textbook("softmax", True))

    whole = run()
    monkeypatch.setattr(execution, "BLOCK_ELEMENTS", 6 * 3)  # 14 blocks of 3 rows
    split = run()
    assert split.stats == whole.stats and split.warnings == whole.warnings
    masked = whole.stats.masked
    weighted = (x[np.arange(40), np.where(labels < 0, 0, labels)] == -INF) & (labels >= 0)
    weighted[7] = False
    assert masked.entries == int((x == -INF).sum()) and masked.weighted == int(weighted.sum())
    assert (masked.rows, masked.first_row, masked.ignored_rows) == (1, 7, 1)
    assert masked.first_weighted == (int(np.argmax(weighted)), int(labels[np.argmax(weighted)]))
