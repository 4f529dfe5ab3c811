"""--loss-fn, --framework, --traceback and functions: through click's CliRunner: reports,
JSON, limits, sweeps, checks, and one line with exit 2 for every bad function."""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from click.testing import CliRunner

from xentcheck.cli import cli

Write = Callable[[str, str], Path]
EXAMPLES = Path(__file__).parent.parent / "examples"
TEXTBOOK = "numpy_textbook.py:loss"


def invoke(*args: str, env: dict[str, str] | None = None) -> click.testing.Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


@pytest.fixture
def examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The examples copied into a folder that is the working directory."""
    for name in ("numpy_textbook", "numpy_stable", "numpy_subtle"):
        for suffix in (".py", ".yaml"):
            shutil.copy(EXAMPLES / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    np.save(tmp_path / "logits.npy", np.array([[1000.0, 2000.0, 2500.0]]))
    np.save(tmp_path / "labels.npy", np.array([0]))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def exp_line(folder: Path, name: str = "numpy_textbook.py") -> int:
    return next(n for n, line in enumerate((folder / name).read_text().splitlines(), 1)
                if "np.exp(" in line)


def one_line_error(result: click.testing.Result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def results_of(result: click.testing.Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    (scenario,) = json.loads(result.stdout)["scenarios"]
    found: list[dict[str, Any]] = scenario["results"]
    return found


def test_every_option_has_help_text() -> None:
    for name, command in cli.commands.items():  # type: ignore[attr-defined]
        assert command.help, name
        for parameter in command.params:
            if isinstance(parameter, click.Option):
                assert parameter.help, (name, parameter.name)
        help_text = invoke(name, "--help").output
        if name in ("run", "check", "sweep", "limits"):
            assert "--loss-fn" in help_text and "--framework" in help_text
            assert "--traceback" in help_text


def test_run_names_the_users_exp_line(examples: Path) -> None:
    spec = f"./{TEXTBOOK}"  # kept exactly as given
    result = invoke("run", "--logits", "logits.npy", "--labels", "labels.npy", "--dtype",
                    "float32", "--pipeline", "naive", "--loss-fn", spec, "--format", "json")
    naive, mine = results_of(result)
    assert naive["pipeline"] == "naive" and naive["first_bad_source"] is None
    assert mine["pipeline"] == spec
    assert mine["loss"] == "nan" and {"nan", "overflow"} <= set(mine["flags"])
    assert (mine["first_bad_stage"], mine["first_bad_kind"]) == ("exp", "overflow")
    assert mine["first_bad_index"] == [0, 0]
    assert mine["first_bad_source"] == f"./numpy_textbook.py:{exp_line(examples)}"
    assert mine["events"][0]["source"] == mine["first_bad_source"]
    # the same limits as naive, found on the function
    assert mine["largest_safe_logit"] == naive["largest_safe_logit"]
    assert mine["largest_safe_spread"] == naive["largest_safe_spread"]


def test_the_issues_case_one_example_of_three_logits(examples: Path) -> None:
    """`logits: [1000, 2000, 2500]`, one example: the function gets shape (3,) and a 0-d
    label, and is NaN in every dtype at its exp line, where naive is."""
    (examples / "one.yaml").write_text("logits: [1000, 2000, 2500]\nlabels: 1\n")
    found = results_of(invoke("run", "one.yaml", "--pipeline", "naive", "--loss-fn", TEXTBOOK,
                              "--format", "json"))
    naive = [r for r in found if r["pipeline"] == "naive"]
    mine = [r for r in found if r["pipeline"] == TEXTBOOK]
    assert [r["dtype"] for r in mine] == ["float16", "bfloat16", "float32", "float64"]
    for ours, theirs in zip(naive, mine, strict=True):
        assert theirs["loss"] == "nan" and ours["loss"] == "nan"
        assert (theirs["first_bad_stage"], theirs["first_bad_index"]) == (
            ours["first_bad_stage"], ours["first_bad_index"]) == ("exp", [0])
        assert theirs["first_bad_source"] == f"numpy_textbook.py:{exp_line(examples)}"
        # its limits: limit rows reach it one at a time, shaped (3,) like the case
        for key in ("largest_safe_logit", "largest_safe_spread", "smallest_safe_logit"):
            assert theirs[key] == ours[key], (theirs["dtype"], key)


def test_the_table_shows_the_users_line(examples: Path) -> None:
    result = invoke("run", "--logits", "logits.npy", "--labels", "labels.npy", "--dtype",
                    "float32", "--loss-fn", TEXTBOOK, env={"COLUMNS": "200"})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    at = next(n for n, line in enumerate(lines) if line.startswith(TEXTBOOK))
    assert "nan" in lines[at]
    # the cell may wrap at its spaces, the FILE:LINE under the start of the cell
    where = f"numpy_textbook.py:{exp_line(examples)}"
    start = lines[at].index("exp: overflow at [0,0] in")
    assert lines[at][start:].startswith(f"exp: overflow at [0,0] in {where}") \
        or lines[at + 1][start:].startswith(where)
    # the default pipelines run beside it
    assert any(line.startswith("stable ") for line in result.stdout.splitlines())
    # and on a narrow terminal the line is still there, whole
    narrow = invoke("run", "--logits", "logits.npy", "--labels", "labels.npy", "--dtype",
                    "float32", "--loss-fn", TEXTBOOK, env={"COLUMNS": "60"})
    assert f"numpy_textbook.py:{exp_line(examples)}" in narrow.stdout


def test_limits_finds_naives_edges_on_the_function(examples: Path) -> None:
    common = ("limits", "-C", "3", "--dtype", "float32", "--loss", "softmax", "--format",
              "json")
    both = json.loads(invoke(*common, "--pipeline", "naive", "--loss-fn", TEXTBOOK).stdout)
    alone = json.loads(invoke(*common, "--pipeline", "naive").stdout)
    rows = {row["pipeline"]: row for row in both["limits"]}
    mine, naive = rows[TEXTBOOK], rows["naive"]
    assert naive == alone["limits"][0]
    for key in ("largest_safe_logit", "smallest_safe_logit", "largest_safe_spread"):
        assert mine[key] == naive[key], key
    assert f"{mine['largest_safe_logit']:.2f}" == "87.62"
    assert abs(mine["largest_safe_logit"] - (math.log(np.finfo(np.float32).max) - math.log(3))) \
        < 1e-5
    assert mine["closed_form"] is None  # no closed form for a user's function
    table = invoke("limits", "-C", "3", "--dtype", "float32", "--loss", "softmax",
                   "--loss-fn", TEXTBOOK, env={"COLUMNS": "200"}).stdout
    naive_row, = (line for line in table.splitlines() if " naive " in line)
    mine_row, = (line for line in table.splitlines() if f" {TEXTBOOK} " in line)
    assert "87.62422" in mine_row and "87.62422" in naive_row


def test_sweep_sweeps_the_function(examples: Path) -> None:
    result = invoke("sweep", "-C", "3", "--dtype", "float32", "--pattern", "top", "--to",
                    "1000", "--points", "40", "--pipeline", "naive", "--loss-fn", TEXTBOOK,
                    "--format", "json")
    assert result.exit_code == 0, result.output
    curves = {c["pipeline"]: c for c in json.loads(result.stdout)["sweep"]["curves"]}
    assert curves[TEXTBOOK]["first_nonfinite"] == curves["naive"]["first_nonfinite"]
    assert 88.72 < curves[TEXTBOOK]["first_nonfinite"] < 88.72 * 1000 ** (1 / 39)


def test_check_runs_the_examples(examples: Path) -> None:
    result = invoke("check", ".")
    assert result.exit_code == 0, result.output
    assert [line.split()[:2] for line in result.stdout.splitlines()] == [
        ["PASS", "numpy_stable"], ["PASS", "numpy_subtle"], ["PASS", "numpy_textbook"]]


def test_an_expectation_on_the_users_line_can_fail(examples: Path, write: Write) -> None:
    text = (examples / "numpy_textbook.yaml").read_text()
    line = exp_line(examples)
    write("wrong.yaml", text.replace(f"numpy_textbook.py:{line}", f"numpy_textbook.py:{line + 1}"))
    result = invoke("check", "wrong.yaml")
    assert result.exit_code == 1
    assert "first_bad_source" in result.stdout and f"numpy_textbook.py:{line}" in result.stdout


def test_fail_on_names_a_function(examples: Path) -> None:
    args = ("run", "--logits", "logits.npy", "--labels", "labels.npy", "--dtype", "float32",
            "--loss-fn", TEXTBOOK, "--loss-fn", "numpy_stable.py:loss")
    assert invoke(*args, "--fail-on", "nan@numpy_stable.py:loss").exit_code == 0
    assert invoke(*args, "--fail-on", f"nan@{TEXTBOOK}").exit_code == 1


def test_functions_in_a_scenario_are_relative_to_it(examples: Path, write: Write) -> None:
    scenario = write("sub/s.yaml", textwrap.dedent("""
        logits: [[1000.0, 2000.0, 2500.0]]
        labels: [0]
        dtypes: float32
        functions:
          - ../numpy_textbook.py:loss
          - {spec: ../numpy_stable.py:loss, framework: numpy}
    """))
    result = invoke("run", str(scenario), "--pipeline", "stable", "--format", "json")
    stable, textbook, good = results_of(result)
    assert textbook["pipeline"] == "../numpy_textbook.py:loss"
    assert textbook["first_bad_source"] == f"../numpy_textbook.py:{exp_line(examples)}"
    assert good["pipeline"] == "../numpy_stable.py:loss" and good["loss"] == stable["loss"]
    assert good["grad_error"] is not None and good["grad_error"] < 1e-6


@pytest.mark.parametrize(("functions", "message"), [
    ("functions: nowhere.py:loss", "functions: nowhere.py:loss: nowhere.py: no such file"),
    ("functions: [{spec: numpy_textbook.py:loss, framework: tf}]",
     "functions: framework 'tf' is not one of auto, numpy, torch, jax"),
    ("functions: [{path: numpy_textbook.py:loss}]", "functions: each item must be a SPEC"),
    ("functions: []", "functions: must be a SPEC"),
    ("functions: [numpy_textbook.py]", "functions: 'numpy_textbook.py': expected FILE.py:NAME"),
])
def test_bad_functions_in_a_scenario(functions: str, message: str, examples: Path,
                                     write: Write) -> None:
    scenario = write("s.yaml", f"logits: [[1.0, 2.0]]\nlabels: [0]\n{functions}\n")
    line = one_line_error(invoke("run", str(scenario)))
    assert line.startswith(f"xentcheck: error: {scenario}: {message}"), line


def write_module(folder: Path, name: str, source: str) -> str:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    return f"{name}.py:loss"


@pytest.mark.parametrize(("source", "message"), [
    ("def loss(logits, labels):\n    return logits.sum()[0]\n",
     "raised IndexError: invalid index to scalar variable. (bad.py:2)"),
    ("import numpy as np\ndef loss(logits, labels):\n    return np.zeros((5,), logits.dtype)\n",
     "returned an array of shape [5] for logits of shape [1, 3]; expected [1] (one loss per "
     "example), [1, 3] (sigmoid: one per element) or a scalar"),
    ("import numpy as np\ndef loss(logits, labels):\n    return labels\n",
     "returned an array of int64, not floating point"),
    ("def loss(logits, labels):\n    return None\n", "returned a NoneType, not a numpy array "
     "(return the array of D the loss was computed in)"),
    ("raise RuntimeError('no GPU')\ndef loss(logits, labels):\n    return logits\n",
     "importing it raised RuntimeError: no GPU (bad.py:1)"),
])
def test_bad_functions_exit_2_with_one_line(source: str, message: str, examples: Path) -> None:
    spec = write_module(examples, "bad", source)
    result = invoke("run", "--logits", "logits.npy", "--labels", "labels.npy", "--dtype",
                    "float32", "--loss-fn", spec)
    assert one_line_error(result) == f"xentcheck: error: {spec}: {message}"


def test_traceback_only_when_asked(examples: Path) -> None:
    spec = write_module(examples, "deep", """
        def helper(x):
            raise KeyError("vocab")
        def loss(logits, labels):
            return helper(logits)
    """)
    args = ("run", "--logits", "logits.npy", "--labels", "labels.npy", "--dtype", "float32",
            "--loss-fn", spec)
    assert one_line_error(invoke(*args)) == (
        f"xentcheck: error: {spec}: raised KeyError: 'vocab' (deep.py:3)")
    shown = invoke(*args, "--traceback")
    assert shown.exit_code == 2
    assert shown.stderr.startswith("Traceback (most recent call last):")
    assert 'deep.py", line 3, in helper' in shown.stderr
    assert shown.stderr.strip().splitlines()[-1] == (
        f"xentcheck: error: {spec}: raised KeyError: 'vocab' (deep.py:3)")


@pytest.mark.parametrize("args", [
    ("--loss-fn", "missing.py:loss"),
    ("--loss-fn", "numpy_textbook.py:nope"),
    ("--loss-fn", "numpy_textbook.py"),
    ("--framework", "numpy"),
    ("--loss-fn", TEXTBOOK, "--framework", "tensorflow"),
])
@pytest.mark.parametrize("command", [
    ("run", "--logits", "logits.npy", "--labels", "labels.npy"), ("check", "."),
    ("limits", "-C", "3"), ("sweep", "--points", "3"),
])
def test_every_command_refuses_a_bad_spec(command: tuple[str, ...], args: tuple[str, ...],
                                          examples: Path) -> None:
    one_line_error(invoke(*command, *args))


def test_both_frameworks_need_framework(examples: Path) -> None:
    spec = write_module(examples, "both", """
        def loss(logits, labels):
            import torch
            import jax
            return logits
    """)
    line = one_line_error(invoke("limits", "--loss-fn", spec))
    assert "imports both torch and jax; say which the function uses with --framework" in line
