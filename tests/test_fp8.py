"""The 8-bit storage formats float8_e4m3fn and float8_e5m2, through the pipelines and the CLI.

Pipeline values are checked against an emulation written here op by op: each step's exact
value (mpmath at 50 digits for exp and log, ``fractions.Fraction`` for sums and quotients)
rounded to the format by the exact rounding of tests/test_input_rounding.py. The edges
(448 and NaN, 57344 and inf) are the formats' own (OCP 8-bit floating point specification
1.0, 2023), checked there and in tests/test_limit_closed_forms.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import ml_dtypes
import mpmath
import numpy as np
import pytest
from click.testing import CliRunner
from frameworks import require
from test_input_rounding import exact_round

from xentcheck.case import Case, LossSpec
from xentcheck.cli import cli
from xentcheck.evaluator import evaluate
from xentcheck.execution import Denominators, PipelineRun, blocks, run_pipeline
from xentcheck.pipelines import select, textbook
from xentcheck.precision import Precision
from xentcheck.stages import StageRunner

Write = Callable[[str, str], Path]
FP8 = ["float8_e4m3fn", "float8_e5m2"]
MPMATH_DPS = 50  # this module's tests run at it (conftest.py)


def pipeline(name: str):  # type: ignore[no-untyped-def]
    return next(p for p in textbook("softmax", True) if p.name == name)


def rounded(value: object, dtype: str) -> Fraction:
    """An exact value (mpmath number or Fraction) rounded to the format, as a Fraction."""
    exact = value if isinstance(value, Fraction) else Fraction(float(value))  # type: ignore[arg-type]
    return Fraction(exact_round(exact, dtype))  # type: ignore[arg-type]


def naive_by_hand(x: list[float], label: int, dtype: str) -> float:
    """``-log(exp(x_t) / sum(exp(x)))``, every step rounded to the format."""
    e = [rounded(mpmath.exp(v), dtype) for v in x]
    s = rounded(sum(e, Fraction(0)), dtype)  # float32 holds these few 8-bit sums exactly
    p = rounded(e[label] / s, dtype)
    return -float(rounded(mpmath.log(mpmath.mpf(p.numerator) / p.denominator), dtype))


def stable_by_hand(x: list[float], label: int, dtype: str) -> float:
    """``-(z_t - log(sum(exp(z))))`` with ``z = x - max x``, every step rounded."""
    top = max(x)
    z = [rounded(Fraction(v) - Fraction(top), dtype) for v in x]
    e = [rounded(mpmath.exp(mpmath.mpf(v.numerator) / v.denominator), dtype) for v in z]
    s = rounded(sum(e, Fraction(0)), dtype)
    log_s = rounded(mpmath.log(mpmath.mpf(s.numerator) / s.denominator), dtype)
    return -float(rounded(z[label] - log_s, dtype))


def stable_gradient_by_hand(x: list[float], label: int, dtype: str) -> list[float]:
    """log-softmax's backward as autodiff computes it for ``reduction: sum`` (upstream 1):
    ``g - exp(log_softmax) * sum(g)`` with ``g = -onehot``, every step rounded: the entry
    j is ``round(round(exp(lsm_j)) - [j == t])``."""
    top = max(x)
    z = [rounded(Fraction(v) - Fraction(top), dtype) for v in x]
    e = [rounded(mpmath.exp(mpmath.mpf(v.numerator) / v.denominator), dtype) for v in z]
    s = rounded(sum(e, Fraction(0)), dtype)
    log_s = rounded(mpmath.log(mpmath.mpf(s.numerator) / s.denominator), dtype)
    lsm = [rounded(v - log_s, dtype) for v in z]
    soft = [rounded(mpmath.exp(mpmath.mpf(v.numerator) / v.denominator), dtype) for v in lsm]
    return [float(rounded(p - (1 if j == label else 0), dtype)) for j, p in enumerate(soft)]


def per_example(name: str, dtype: str, x: list[list[float]], labels: list[int]) -> np.ndarray:
    case = Case("t", np.array(x, dtype=np.float64), np.array(labels), "index",
                LossSpec(reduction="none"))
    _, values, _ = run_pipeline(pipeline(name), Precision(dtype), case)
    return np.asarray(values, dtype=np.float64)


@pytest.mark.parametrize("dtype", FP8)
def test_naive_and_stable_on_1_2_3_step_by_step(dtype: str) -> None:
    """[1, 2, 3] is exact in both formats, so every difference from the true losses
    (2.4076, 1.4076, 0.4076) is the arithmetic's. In float8_e4m3fn the naive loss of
    label 0 is 2.25: e = [2.75, 7.5, 20], their sum 30.25 rounds to 30 (spacing 2), 2.75 /
    30 = 0.0917 to 0.09375 (spacing 2**-7), whose log -2.367 to -2.25 (spacing 0.25)."""
    x = [1.0, 2.0, 3.0]
    for name, by_hand in (("naive", naive_by_hand), ("stable", stable_by_hand)):
        got = per_example(name, dtype, [x] * 3, [0, 1, 2])
        assert got.tolist() == [by_hand(x, label, dtype) for label in range(3)], name
    if dtype == "float8_e4m3fn":
        assert naive_by_hand(x, 0, dtype) == 2.25
        assert [float(rounded(mpmath.exp(v), dtype)) for v in x] == [2.75, 7.5, 20.0]


@pytest.mark.parametrize("dtype", FP8)
def test_a_wider_row_step_by_step(dtype: str) -> None:
    x = [0.5, -1.25, 3.0, 2.0, 1.0]
    for name, by_hand in (("naive", naive_by_hand), ("stable", stable_by_hand)):
        got = per_example(name, dtype, [x] * 5, list(range(5)))
        assert got.tolist() == [by_hand(x, label, dtype) for label in range(5)], name


@pytest.mark.parametrize("dtype", FP8)
def test_stable_gradient_step_by_step(dtype: str) -> None:
    rows = [[1.0, 2.0, 3.0], [0.5, -1.25, 3.0], [2.0, 2.0, -4.0]]
    labels = [0, 2, 1]
    case = Case("g", np.array(rows), np.array(labels), "index", LossSpec(reduction="sum"))
    den = Denominators(np.zeros(case.classes))
    for block in blocks(case):
        den.add(case, block)
    run = PipelineRun(pipeline("stable"), Precision(dtype))
    got = np.concatenate([np.asarray(run.gradient(case, block, den), dtype=np.float64)
                          for block in blocks(case)])
    assert got.tolist() == [stable_gradient_by_hand(x, t, dtype)
                            for x, t in zip(rows, labels, strict=True)]


def test_e4m3fn_cast_past_448_is_nan_reported_as_an_overflow_at_cast() -> None:
    """500 is past 464 (448 plus half an ulp): NaN in float8_e4m3fn, which has no inf. The
    cast created it from a number: an overflow (with the nan flag: the loss is NaN)."""
    case = Case("t", np.array([[1.0, 500.0, 2.0], [1.0, 464.0, 2.0]]), np.array([0, 0]),
                "index", LossSpec(reduction="none"))
    result = evaluate(case, [Precision("float8_e4m3fn")], select("softmax", True, ["stable"]))
    finding = result.findings[0]
    assert finding.first_bad is not None
    assert (finding.first_bad.stage, finding.first_bad.kind) == ("cast", "overflow")
    assert finding.first_bad.index == (0, 1)
    assert {"nan", "overflow"} <= set(finding.flags)
    # the input as e4m3fn holds it is past every edge: NaN there, as far over as an inf
    assert finding.logit_headroom == -np.inf
    assert result.reference.rounded_counted is not None
    assert np.isnan(result.reference.rounded_counted["float8_e4m3fn"][0])
    values = np.asarray(finding.per_example, dtype=np.float64)
    # 464 is a tie that rounds to the even 448: that row is finite (1 - 448 rounds to -448)
    assert np.isnan(values[0]) and values[1] == stable_by_hand([1.0, 448.0, 2.0], 0,
                                                               "float8_e4m3fn") == 448.0


def test_a_masked_logit_is_nan_in_e4m3fn_and_masked_in_e5m2() -> None:
    """-inf has no float8_e4m3fn value: the cast makes it NaN (an invalid input for the
    format, kind nan: it was not a number to begin with). float8_e5m2 keeps -inf, a masked
    entry: its loss is that of the other two classes, [1, 2] with label 0 (1.3133)."""
    case = Case("m", np.array([[1.0, 2.0, -np.inf]]), np.array([0]), "index",
                LossSpec(reduction="none"))
    _, e4m3, run = run_pipeline(pipeline("stable"), Precision("float8_e4m3fn"), case)
    assert np.isnan(np.asarray(e4m3, dtype=np.float64)).all()
    assert (run.events[0].stage, run.events[0].kind, run.events[0].index) == ("cast", "nan", (0, 2))
    _, e5m2, run = run_pipeline(pipeline("stable"), Precision("float8_e5m2"), case)
    assert np.asarray(e5m2, dtype=np.float64).tolist() == [
        stable_by_hand([1.0, 2.0], 0, "float8_e5m2")]
    assert not run.events


def test_e4m3fn_exp_past_ln_464_overflows_to_nan_and_0_over_0_is_a_nan() -> None:
    """exp(6.5) = 665 is past 464: an overflow at exp (NaN, not inf), then NaN / NaN. A row
    whose exps all flush to 0 is 0/0: that NaN is an invalid operation, kind nan."""
    case = Case("t", np.array([[6.5, 0.0], [-20.0, -20.0]]), np.array([0, 0]), "index",
                LossSpec(reduction="none"))
    _, values, run = run_pipeline(pipeline("naive"), Precision("float8_e4m3fn"), case)
    assert np.isnan(np.asarray(values, dtype=np.float64)).all()
    kinds = {(e.stage, e.kind, e.index) for e in run.events}
    assert ("exp", "overflow", (0, 0)) in kinds
    assert ("divide", "nan", (1, 0)) in kinds
    assert float(mpmath.exp(6.5)) > 464 > float(mpmath.exp(6.125))


def test_e5m2_overflows_to_inf() -> None:
    """e5m2's values near ln 57344 = 10.96 are 2 apart: exp(10) = 22026 rounds to 20480
    (spacing 4096), exp(12) = 162755 is past 61440 (57344 + half an ulp): inf, as in
    float16, an overflow."""
    assert float(rounded(mpmath.exp(10), "float8_e5m2")) == 20480.0
    assert float(mpmath.exp(12)) > 61440
    x = np.array([[10.0], [12.0]], dtype=np.float32).astype(ml_dtypes.float8_e5m2)
    runner = StageRunner(Precision("float8_e5m2"), ("exp",)).bind(np.ones(2, dtype=bool))
    out = runner.exp("exp", x)
    assert out.astype(np.float64)[:, 0].tolist() == [20480.0, np.inf]
    assert [(e.stage, e.kind, e.index) for e in runner.events] == [("exp", "overflow", (1, 0))]


@pytest.mark.parametrize(("dtype", "stall"), [("float8_e4m3fn", 16.0), ("float8_e5m2", 8.0)])
def test_accumulate_same_is_a_running_sum_in_the_8_bit_format(dtype: str, stall: float) -> None:
    """``accumulate: same`` runs the sum in D, rounding each partial sum: a sum of ones
    stalls where the spacing reaches 2 (16 + 1 is a tie, to the even 16, in e4m3fn; 8 + 1
    in e5m2), as bfloat16's does at 256. The default sums in float32 and rounds once."""
    ones = np.ones((1, 40), dtype=np.float32).astype(Precision(dtype).dtype)
    running = Fraction(0)
    for _ in range(40):
        running = Fraction(exact_round(running + 1, dtype))
    assert float(running) == stall
    same = StageRunner(Precision(dtype, "same"), ("sum",)).bind(np.ones(1, dtype=bool))
    default = StageRunner(Precision(dtype), ("sum",)).bind(np.ones(1, dtype=bool))
    assert float(same.sum("sum", ones)[0]) == stall
    assert float(default.sum("sum", ones)[0]) == exact_round(40, dtype) == 40.0


def test_e4m3fn_sum_overflow_with_accumulate_same_is_an_overflow() -> None:
    """A running sum in float8_e4m3fn past 448 turns NaN: an overflow of the sum."""
    values = np.full((1, 10), 64.0, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn)
    runner = StageRunner(Precision("float8_e4m3fn", "same"), ("sum",)).bind(np.ones(1, bool))
    assert np.isnan(float(runner.sum("sum", values)[0]))
    assert [(e.stage, e.kind) for e in runner.events] == [("sum", "overflow")]


def test_default_tolerance_is_two_eps_for_fp8() -> None:
    """8 eps would be 1 and 2 (anything passes); 2 eps is 0.25 and 0.5."""
    assert Precision("float8_e4m3fn").default_rel_tolerance() == 0.25
    assert Precision("float8_e5m2").default_rel_tolerance() == 0.5
    assert Precision("bfloat16").default_rel_tolerance() == 8 * 2.0**-7


def test_ulp_of_the_8_bit_formats() -> None:
    """Spacing 2**(e - 3) in e4m3fn's binade [2**e, 2**(e+1)), 2**(e - 2) in e5m2's;
    the subnormal spacing below the smallest normal (2**-6 and 2**-14)."""
    e4, e5 = Precision("float8_e4m3fn"), Precision("float8_e5m2")
    values = np.array([1.0, 2.5, 300.0, 0.001, 0.0])
    assert e4.ulp(values).tolist() == [0.125, 0.25, 32.0, 2.0**-9, 2.0**-9]
    assert e5.ulp(values).tolist() == [0.25, 0.5, 64.0, 2.0**-16 * 16, 2.0**-16]
    for precision in (e4, e5):  # against the format's own neighbours
        top = int(np.array(precision.max).astype(precision.dtype).view(np.uint8))
        grid = np.arange(1, top + 1, dtype=np.uint8).view(precision.dtype).astype(np.float64)
        assert (precision.ulp(grid[:-1]) == np.diff(grid)).all()


# -- the command line -------------------------------------------------------------------------


def invoke(*args: str) -> object:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


ROW = "logits: [[1, 2, 3], [500, 0, 1]]\nlabels: [0, 1]\nreduction: none\n"


def test_run_in_fp8_leaves_torch_out_with_a_note(write: Write) -> None:
    path = write("s.yaml", ROW)
    result = CliRunner().invoke(cli, ["run", str(path), "--dtype", "float8_e4m3fn",
                                      "--format", "json"], catch_exceptions=False)
    assert result.exit_code == 0
    assert "torch left out in float8_e4m3fn: PyTorch 2.13 has no float8" in result.stderr
    doc = json.loads(result.stdout)["scenarios"][0]
    assert [r["pipeline"] for r in doc["results"]] == ["naive", "shifted", "stable"]
    assert doc["left_out"] == [{"pipeline": "torch", "dtype": "float8_e4m3fn",
                                "reason": doc["left_out"][0]["reason"]}]
    stable = doc["results"][2]
    assert stable["has_infinity"] is False
    assert stable["first_bad_stage"] == "cast" and stable["first_bad_kind"] == "overflow"
    assert stable["first_bad_index"] == [1, 0]
    assert stable["per_example"][0] == stable_by_hand([1.0, 2.0, 3.0], 0, "float8_e4m3fn")
    assert stable["per_example"][1] == "nan"


def test_the_table_says_overflow_to_nan(write: Write) -> None:
    path = write("s.yaml", ROW)
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        cli, ["run", str(path), "--dtype", "float8_e4m3fn,float8_e5m2", "--pipeline", "stable"])
    assert result.exit_code == 0
    e4m3 = next(line for line in result.stdout.splitlines() if "float8_e4m3fn" in line
                and "stable" in line)
    assert "cast: overflow to NaN at [1,0]" in e4m3
    assert "float8_e4m3fn has no infinity" in result.stdout
    e5m2 = next(line for line in result.stdout.splitlines() if "float8_e5m2" in line)
    assert "overflow to NaN" not in e5m2


@pytest.mark.parametrize("args", [
    ["--pipeline", "torch", "--dtype", "float8_e4m3fn"],
    ["--pipeline", "stable,jax", "--dtype", "float16,float8_e5m2"],
])
def test_a_framework_named_in_fp8_is_refused(write: Write, args: list[str]) -> None:
    result = CliRunner().invoke(cli, ["run", str(write("s.yaml", ROW)), *args])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "does not run in float8_e" in result.stderr


def test_a_scenario_naming_torch_and_fp8_is_refused(write: Write) -> None:
    path = write("s.yaml", ROW + "dtypes: [float8_e5m2]\npipelines: [torch]\n")
    result = CliRunner().invoke(cli, ["run", str(path)])
    assert result.exit_code == 2 and "torch does not run in float8_e5m2" in result.stderr


def test_the_default_dtypes_leave_fp8_out(write: Write) -> None:
    result = CliRunner().invoke(cli, ["run", str(write("s.yaml", ROW)), "--format", "json"])
    doc = json.loads(result.stdout)["scenarios"][0]
    assert sorted({r["dtype"] for r in doc["results"]}) == [
        "bfloat16", "float16", "float32", "float64"]
    assert doc["left_out"] == []


def test_limits_and_sweep_in_fp8(write: Write) -> None:
    """limits: e4m3fn naive's largest safe logit for 3 classes is 5 (ln(464 / 3) = 5.04,
    the grid of e4m3fn is 0.5 apart there), agreeing with the closed form; torch is left
    out, named it is refused. sweep: the naive loss stops being finite where the spread 2m
    passes the limit, stable stays finite."""
    result = CliRunner().invoke(cli, ["limits", "--dtype", "float8_e4m3fn", "--loss", "softmax",
                                      "--format", "json"])
    assert result.exit_code == 0 and "torch left out" in result.stderr
    rows = json.loads(result.stdout)["limits"]
    naive = next(r for r in rows if r["pipeline"] == "naive")
    assert naive["largest_safe_logit"] == 5.0 and naive["agrees"] is True
    assert all(r["agrees"] for r in rows)
    refused = CliRunner().invoke(cli, ["limits", "--dtype", "float8_e4m3fn", "--pipeline",
                                       "torch"])
    assert refused.exit_code == 2 and "does not run in float8_e4m3fn" in refused.stderr
    sweep = CliRunner().invoke(cli, ["sweep", "--dtype", "float8_e5m2", "--to", "100",
                                     "--format", "json", "--pipeline", "naive,stable"])
    assert sweep.exit_code == 0
    curves = {c["pipeline"]: c for c in json.loads(sweep.stdout)["sweep"]["curves"]}
    assert curves["stable"]["first_nonfinite"] is None
    assert curves["naive"]["first_nonfinite"] is not None
    # bits of error: between 0 and every bit of e5m2 (3), measured against the rounded inputs
    assert all(0 <= b <= 3 for b in curves["stable"]["bits"])


def test_torch_has_no_float8_cross_entropy() -> None:
    """What docs/frameworks-torch.md and the left-out note say, checked live."""
    torch = require("torch")
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        x = torch.tensor([[1.0, 2.0, 3.0]]).to(dtype)
        with pytest.raises(NotImplementedError):
            torch.nn.functional.cross_entropy(x, torch.tensor([0]))
        with pytest.raises(NotImplementedError):
            torch.log_softmax(x, dim=-1)
        with pytest.raises(NotImplementedError):
            torch.exp(x)
        with pytest.raises(NotImplementedError):
            x.sum()
    # its cast saturates where ml_dtypes (and xentcheck) give NaN
    big = torch.tensor([500.0, float("inf")])
    assert big.to(torch.float8_e4m3fn).float().tolist() == [448.0, 448.0]
    assert np.isnan(Precision("float8_e4m3fn").round(big.numpy()).astype(np.float32)).all()


def test_a_soft_cap_cannot_save_a_logit_e4m3fn_cannot_store() -> None:
    """The cap is applied in D, after the cast: configs/lm_softcap_zloss.yaml's logit near
    3000 is NaN in float8_e4m3fn before tanh could bring it to 30 (float8_e5m2 stores it,
    as 3072, and the capped loss is finite). The z-loss gradient's non-finite product is
    watched in its own shape."""
    path = Path(__file__).resolve().parent.parent / "configs" / "lm_softcap_zloss.yaml"
    result = CliRunner().invoke(cli, ["run", str(path), "--dtype", "float8_e4m3fn,float8_e5m2",
                                      "--pipeline", "stable", "--format", "json"])
    assert result.exit_code in (0, 1), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    doc = json.loads(result.stdout)["scenarios"][0]
    e4m3, e5m2 = doc["results"]
    assert (e4m3["dtype"], e4m3["loss"], e4m3["first_bad_stage"], e4m3["first_bad_kind"]) == (
        "float8_e4m3fn", "nan", "cast", "overflow")
    assert e5m2["dtype"] == "float8_e5m2" and isinstance(e5m2["loss"], float)
    assert float(np.float32(2998).astype(ml_dtypes.float8_e5m2)) == 3072.0


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_logits_from_safetensors_are_their_values(tmp_path: Path, name: str) -> None:
    """A .safetensors dump of fp8 logits (F8_E4M3, F8_E5M2) is read as its values: every
    number of the report is the one the same values give as float32 (held exactly)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    values = (rng.standard_normal((6, 5)) * 4).astype(getattr(ml_dtypes, name))
    labels = rng.integers(0, 5, 6)
    save_file({"logits": values, "labels": labels}, str(tmp_path / "dump.safetensors"))
    np.save(tmp_path / "x.npy", values.astype(np.float32))
    np.save(tmp_path / "y.npy", labels)
    runs = []
    for logits, labels_file, keys in (
            ("dump.safetensors", "dump.safetensors", ["--logits-key", "logits", "--labels-key",
                                                      "labels"]),
            ("x.npy", "y.npy", [])):
        result = CliRunner().invoke(cli, [
            "run", "--logits", str(tmp_path / logits), "--labels", str(tmp_path / labels_file),
            *keys, "--dtype", f"{name},bfloat16,float32", "--pipeline", "naive,stable",
            "--format", "json"])
        assert result.exit_code == 0, result.output
        scenario = json.loads(result.stdout)["scenarios"][0]
        runs.append((scenario["reference"], scenario["results"]))
    assert runs[0] == runs[1]
    # held exactly in D = its own format: no input rounding, and the loss is a number
    fp8 = [r for r in runs[0][1] if r["dtype"] == name]
    assert fp8 and all("input_rounding" not in r["flags"] for r in fp8)
