"""torch and jax loss functions end to end, through the command line: ``run --loss-fn``'s JSON
names the user's line, ``limits --loss-fn`` finds the textbook loss's edges by evaluating
the real function, and a correct torch loss matches the reference, its autograd gradient
too (every number checked against torch itself or a closed form)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from click.testing import CliRunner
from frameworks import require
from user_loss_fixture import line_of

from xentcheck.cli import cli
from xentcheck.reference import softmax_index_gradients, softmax_index_losses

EXAMPLES = Path(__file__).parent.parent / "examples"
FLT_MAX = float(np.finfo(np.float32).max)
EXP_CALL = {"torch": "torch.exp(", "jax": "jnp.exp("}
EXP_OP = {"torch": "aten::exp", "jax": "exp"}


def invoke(*args: str) -> click.testing.Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The torch and jax examples in a folder that is the working directory."""
    for path in EXAMPLES.glob("*.py"):
        shutil.copy(path, tmp_path / path.name)
    np.save(tmp_path / "issue.npy", np.array([[1000.0, 2000.0, 2500.0]]))
    np.save(tmp_path / "label.npy", np.array([0]))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _results(result: click.testing.Result) -> dict[str, dict[str, Any]]:
    assert result.exit_code == 0, result.output
    (scenario,) = json.loads(result.stdout)["scenarios"]
    return {row["pipeline"]: row for row in scenario["results"]}


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_run_names_the_exp_line_of_the_textbook_loss(folder: Path, framework: str) -> None:
    require(framework)
    spec = f"{framework}_textbook.py:loss"
    rows = _results(invoke("run", "--logits", "issue.npy", "--labels", "label.npy",
                           "--loss-fn", spec, "--pipeline", "naive", "--dtype", "float32",
                           "--format", "json"))
    row = rows[spec]
    assert row["loss"] == "nan" and {"nan", "overflow"} <= set(row["flags"])
    assert row["first_bad_stage"] == EXP_OP[framework]
    assert row["first_bad_index"] == [0, 0]
    exp_line = line_of(folder / f"{framework}_textbook.py", EXP_CALL[framework])
    assert row["first_bad_source"] == f"{framework}_textbook.py:{exp_line.split(':')[-1]}"
    # the backward pass is located in the user's file too (the division's line)
    division = line_of(folder / f"{framework}_textbook.py", "p = e / e.sum(")
    assert row["grad_first_bad_source"] == f"{framework}_textbook.py:" \
                                           f"{division.split(':')[-1]}"
    assert rows["naive"]["loss"] == "nan"  # the same formula, xentcheck's


def _limits(*specs: str) -> dict[str, dict[str, Any]]:
    args = ["limits", "--classes", "3", "--dtype", "float32", "--loss", "softmax",
            "--pipeline", "naive", "--format", "json"]
    for spec in specs:
        args += ["--loss-fn", spec]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return {row["pipeline"]: row for row in json.loads(result.stdout)["limits"]}


def test_limits_of_the_torch_textbook_loss_are_naives(folder: Path) -> None:
    require("torch")
    rows = _limits("torch_textbook.py:loss")
    torch_row, naive = rows["torch_textbook.py:loss"], rows["naive"]
    # ln(FLT_MAX) - ln 3: past it three equal exps sum to inf
    assert torch_row["largest_safe_logit"] == pytest.approx(math.log(FLT_MAX) - math.log(3),
                                                            abs=1e-5)
    assert round(torch_row["largest_safe_logit"], 2) == 87.62
    for key in ("largest_safe_logit", "largest_safe_spread", "smallest_safe_logit"):
        assert torch_row[key] == naive[key], key


def test_limits_of_the_jax_textbook_loss_show_the_flushed_reciprocal(folder: Path) -> None:
    require("jax")
    rows = _limits("jax_textbook.py:loss")
    row, naive = rows["jax_textbook.py:loss"], rows["naive"]
    # a division by a broadcast sum past 2**126 flushes to 0 (the docstring says so):
    # three equal logits past 126 ln 2 - ln 3; and exp below -126 ln 2 is flushed itself
    assert row["largest_safe_logit"] == pytest.approx(126 * math.log(2) - math.log(3),
                                                      abs=1e-5)
    assert row["smallest_safe_logit"] == pytest.approx(-126 * math.log(2), abs=1e-5)
    # its spread edge is naive's with subnormals flushed (the target's exp, past the
    # smallest normal number, is 0): not "no safe value" from a worst level below its
    # own lower edge
    assert row["no_safe_spread"] is False
    assert row["largest_safe_spread"] == pytest.approx(naive["spread_without_subnormals"],
                                                       abs=1e-5)
    text = (folder / "jax_textbook.py").read_text()
    assert f"126 ln 2 - ln C ({126 * math.log(2) - math.log(3):.2f} for C = 3" in text
    assert f"lasts\nto {math.log(FLT_MAX) - math.log(3):.2f})" in text


def test_a_correct_torch_loss_matches_the_reference_with_its_gradient(folder: Path) -> None:
    torch = require("torch")
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((16, 10)) * 5
    labels = rng.integers(0, 10, size=16)
    np.save(folder / "batch.npy", logits)
    np.save(folder / "labels.npy", labels)
    spec = "torch_stable.py:loss"
    rows = _results(invoke("run", "--logits", "batch.npy", "--labels", "labels.npy",
                           "--loss-fn", spec, "--pipeline", "stable", "--dtype",
                           "float32", "--reduction", "mean", "--format", "json"))
    row = rows[spec]
    assert row["flags"] == [] and row["grad_flags"] == [] and row["first_bad_stage"] is None

    # independently: the same function called by torch itself, autograd's gradient of the
    # mean, the reference in float64
    from importlib.util import module_from_spec, spec_from_file_location

    module_spec = spec_from_file_location("stable", folder / "torch_stable.py")
    assert module_spec is not None and module_spec.loader is not None
    module = module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    x = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
    per_example = module.loss(x, torch.tensor(labels))
    mean = per_example.mean()
    (gradient,) = torch.autograd.grad(mean, x)
    ones = np.ones(len(labels))
    # the reference is the loss of the inputs as given (float64), before rounding to float32
    reference = softmax_index_losses(logits, labels, ones).mean()
    reference_gradient = softmax_index_gradients(logits, labels, ones) / len(labels)
    grad_error = (np.abs(gradient.double().numpy() - reference_gradient).max()
                  / np.abs(reference_gradient).max())
    assert row["grad_error"] == pytest.approx(grad_error, rel=1e-12)
    assert row["grad_error"] < 8 * np.finfo(np.float32).eps
    loss = float(row["loss"])
    # the reported loss is the mean of the function's float32 losses, rounded to float32
    assert loss == pytest.approx(float(mean.detach()), rel=2 * float(np.finfo(np.float32).eps))
    assert abs(loss - reference) <= 8 * np.finfo(np.float32).eps * abs(reference)


@pytest.mark.parametrize(("framework", "scenarios"), [
    ("torch", ("torch_textbook", "torch_subtle")),
    # jax compiles each primitive for each input shape and dtype: its textbook scenario
    # (four dtypes, with limits) is left to CI's `xentcheck check examples/`
    ("jax", ("jax_subtle",))])
def test_the_examples_scenarios_hold(framework: str, scenarios: tuple[str, ...]) -> None:
    require(framework)
    result = invoke("check", *(str(EXAMPLES / f"{name}.yaml") for name in scenarios))
    assert result.exit_code == 0, result.output
    assert result.output.count("PASS") == len(scenarios)


def test_a_torch_function_that_raises_is_one_line(folder: Path) -> None:
    require("torch")
    (folder / "broken.py").write_text(
        "import torch\n\n\ndef loss(logits, labels):\n"
        "    return torch.log(logits).sum(-1)[labels.numel() + 3]  # IndexError\n")
    result = invoke("run", "--logits", "issue.npy", "--labels", "label.npy", "--loss-fn",
                    "broken.py:loss", "--dtype", "float32")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "broken.py:loss" in lines[0] and "IndexError" in lines[0]
    assert lines[0].endswith("broken.py:5")


def test_a_sweep_of_the_torch_textbook_loss_breaks_where_naive_does(folder: Path) -> None:
    require("torch")
    result = invoke("sweep", "-C", "3", "--dtype", "float32", "--pattern", "top", "--to",
                    "1000", "--points", "9", "--pipeline", "naive", "--loss-fn",
                    "torch_textbook.py:loss", "--format", "json")
    assert result.exit_code == 0, result.output
    curves = {c["pipeline"]: c for c in json.loads(result.stdout)["sweep"]["curves"]}
    torch_curve, naive = curves["torch_textbook.py:loss"], curves["naive"]
    # the same formula in the same precision: the loss goes non-finite at the same point,
    # the first magnitude of the sweep's grid past ln(FLT_MAX) - ln 3
    assert torch_curve["first_nonfinite"] == naive["first_nonfinite"]
    magnitudes = json.loads(result.stdout)["sweep"]["magnitudes"]
    assert magnitudes.index(torch_curve["first_nonfinite"]) == next(
        i for i, m in enumerate(magnitudes) if m > math.log(FLT_MAX) - math.log(3))


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_a_3d_case_locates_the_op_in_the_inputs_coordinates(folder: Path,
                                                             framework: str) -> None:
    require(framework)
    logits = np.zeros((2, 2, 3))
    logits[1, 0] = [1000.0, 2000.0, 2500.0]  # batch 1, position 0 overflows
    np.save(folder / "x3.npy", logits)
    np.save(folder / "y3.npy", np.array([[0, 1], [2, 0]]))
    spec = f"{framework}_textbook.py:loss"
    rows = _results(invoke("run", "--logits", "x3.npy", "--labels", "y3.npy", "--loss-fn",
                           spec, "--pipeline", "naive", "--dtype", "float32", "--format",
                           "json"))
    # the function saw the (2, 2, 3) array; its exp overflowed at [1, 0, 0], where naive's
    assert rows[spec]["first_bad_index"] == rows["naive"]["first_bad_index"] == [1, 0, 0]
    assert rows[spec]["grad_first_bad_index"] == [1, 0, 0]
