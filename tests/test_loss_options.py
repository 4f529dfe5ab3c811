"""The loss options as inputs: scenario keys and CLI options, their validation (one line,
exit 2), the JSON echo, and the evaluator's numbers with options against the reference
computed independently (mpmath) and the float64 pipelines within a few ulps of it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mpmath
import numpy as np
import pytest
from click.testing import CliRunner

from xentcheck.case import Case, LossSpec
from xentcheck.cli import cli
from xentcheck.evaluator import evaluate
from xentcheck.execution import run_with_gradient
from xentcheck.pipelines import available, textbook
from xentcheck.precision import Precision, precisions_for

MPMATH_DPS = 60  # this module's tests run at it (conftest.py)


def _scenario(tmp_path: Path, extra: str, loss: str = "softmax",
              from_logits: bool = True) -> Path:
    labels = "[0, 1]" if loss == "softmax" else "[[1, 0], [0, 1]]"
    path = tmp_path / "s.yaml"
    path.write_text(f"loss: {loss}\nfrom_logits: {str(from_logits).lower()}\n"
                    f"logits: [[0.2, 0.8], [0.4, 0.6]]\nlabels: {labels}\n{extra}\n")
    return path


@pytest.mark.parametrize(("extra", "message"), [
    ("z_loss: -1", "z_loss: must be >= 0"),
    ("z_loss: .nan", "z_loss: must be finite"),
    ("z_loss: yes", "z_loss: must be a number"),
    ("logit_softcap: 0", "logit_softcap: must be > 0"),
    ("logit_softcap: -3", "logit_softcap: must be > 0"),
    ("logit_softcap: .inf", "logit_softcap: must be finite"),
    ("temperature: 0", "temperature: must be > 0"),
    ("temperature: -2", "temperature: must be > 0"),
    ("temperature: abc", "temperature: must be a number"),
])
def test_bad_option_values_are_one_line_and_exit_2(tmp_path: Path, extra: str,
                                                   message: str) -> None:
    result = CliRunner().invoke(cli, ["run", str(_scenario(tmp_path, extra))])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.parametrize(("extra", "loss", "from_logits", "message"), [
    ("z_loss: 0.1", "sigmoid", True, "z_loss: applies to the softmax loss from logits only"),
    ("z_loss: 0.1", "softmax", False, "z_loss: applies to the softmax loss from logits only"),
    ("logit_softcap: 5", "softmax", False, "logit_softcap: applies to logits"),
    ("temperature: 2", "sigmoid", False, "temperature: applies to logits"),
])
def test_options_apply_where_they_mean_something(tmp_path: Path, extra: str, loss: str,
                                                  from_logits: bool, message: str) -> None:
    result = CliRunner().invoke(cli, ["run", str(_scenario(tmp_path, extra, loss,
                                                           from_logits))])
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_command_line_options_for_logits_files_and_not_for_scenarios(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.array([[1000.0, 2000.0, 2500.0]]))
    np.save(tmp_path / "y.npy", np.array([2]))
    runner = CliRunner()
    result = runner.invoke(cli, ["run", "--logits", str(tmp_path / "x.npy"), "--labels",
                                 str(tmp_path / "y.npy"), "--z-loss", "1e-4", "--dtype",
                                 "float64", "--format", "json"])
    assert result.exit_code == 0, result.output
    scenario = json.loads(result.stdout)["scenarios"][0]
    assert scenario["options"] == {"z_loss": 1e-4, "logit_softcap": None, "temperature": 1.0}
    # the loss is 0 + 1e-4 * lse^2 with lse = 2500 + log1p(e^-500 + e^-1500)
    assert scenario["reference"]["loss"] == 625.0
    stable = next(r for r in scenario["results"] if r["pipeline"] == "stable")
    assert stable["loss"] == 625.0
    bad = runner.invoke(cli, ["run", str(_scenario(tmp_path, "")), "--temperature", "2"])
    assert bad.exit_code == 2 and "--temperature applies to --logits" in bad.stderr
    bad = runner.invoke(cli, ["limits", "--temperature", "0"])
    assert bad.exit_code == 2 and "temperature: must be > 0" in bad.stderr
    bad = runner.invoke(cli, ["sweep", "--loss", "sigmoid", "--z-loss", "1"])
    assert bad.exit_code == 2 and "z_loss: applies to the softmax loss" in bad.stderr


def test_limits_and_sweep_echo_their_options() -> None:
    runner = CliRunner()
    limits = json.loads(runner.invoke(cli, [
        "limits", "--classes", "3", "--dtype", "float32", "--loss", "softmax",
        "--pipeline", "naive", "--temperature", "4", "--format", "json"]).stdout)
    row = limits["limits"][0]
    assert row["options"]["temperature"] == 4.0 and row["agrees"] is True
    assert row["largest_safe_logit"] == pytest.approx(4 * (88.7228 - math.log(3)), rel=1e-5)
    sweep = json.loads(runner.invoke(cli, [
        "sweep", "--points", "3", "--logit-softcap", "10", "--dtype", "float32",
        "--format", "json"]).stdout)
    assert sweep["sweep"]["options"]["logit_softcap"] == 10.0
    # a cap of 10 bounds every logit the loss sees: no pipeline breaks up to 1e5
    assert all(c["first_nonfinite"] is None for c in sweep["sweep"]["curves"]
               if c["pipeline"] != "naive")


def mp_losses(x: np.ndarray, labels: np.ndarray, spec: LossSpec) -> list[mpmath.mpf]:
    out = []
    for row, t in zip(x, labels, strict=True):
        xs = [mpmath.mpf(float(v)) / mpmath.mpf(spec.temperature) for v in row]
        if spec.logit_softcap is not None:
            cap = mpmath.mpf(spec.logit_softcap)
            xs = [cap * mpmath.tanh(v / cap) for v in xs]
        lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in xs))
        out.append(lse - xs[int(t)] + mpmath.mpf(spec.z_loss) * lse**2)
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_evaluation_with_options_against_mpmath(reduction: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(0, 20, (6, 7))
    labels = rng.integers(0, 7, 6)
    spec = LossSpec(reduction=reduction, temperature=1.3, logit_softcap=15.0,  # type: ignore[arg-type]
                    z_loss=1e-3)
    result = evaluate(Case("t", x, labels, "index", spec), precisions_for(["float64"]),
                      textbook("softmax", True))
    truth = mpmath.fsum(mp_losses(x, labels, spec))
    if reduction == "mean":
        truth /= len(labels)
    assert result.reference.loss == pytest.approx(float(truth), rel=4 * 2**-53)
    for finding in result.findings:
        # float64 pipelines: a few ulps of the loss (x'' rounds to float64 three times)
        assert finding.loss == pytest.approx(float(truth), rel=64 * 2**-53), finding.pipeline


def test_options_gradients_against_finite_differences_of_the_reference() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(0, 4, (3, 5))
    labels = np.array([0, 3, -100])
    spec = LossSpec(reduction="mean", ignore_index=-100, temperature=0.8,
                    logit_softcap=6.0, z_loss=0.05)
    case = Case("t", x, labels, "index", spec)
    _, _, grad = run_with_gradient(available("softmax", True)[2], Precision("float64"), case)
    assert grad is not None

    def row_loss(row: list[mpmath.mpf], t: int) -> mpmath.mpf:
        xs = [v / mpmath.mpf(spec.temperature) for v in row]
        cap = mpmath.mpf(spec.logit_softcap)
        xs = [cap * mpmath.tanh(v / cap) for v in xs]
        lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in xs))
        return lse - xs[t] + mpmath.mpf(spec.z_loss) * lse**2

    for i in range(2):  # the counted rows; the mean divides by 2
        for j in range(5):
            def along(v: mpmath.mpf, i: int = i, j: int = j) -> mpmath.mpf:
                row = [mpmath.mpf(float(u)) for u in x[i]]
                row[j] = v
                return row_loss(row, int(labels[i])) / 2
            numeric = float(mpmath.diff(along, mpmath.mpf(float(x[i, j]))))
            # the float64 pipeline (x'' rounded three times) to about 1e-15 of the row
            assert grad[i, j] == pytest.approx(numeric, rel=1e-12, abs=1e-15)
    assert not grad[2].any()  # the ignored row
