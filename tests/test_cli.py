"""The command line through click's CliRunner: reports, exit codes, one-line errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from xentcheck.cli import cli

Write = Callable[[str, str], Path]
NAIVE_OVERFLOW = "logits: [1000, 2000, 2500]\nlabels: 1\n"


def invoke(*args: str, env: dict[str, str] | None = None) -> click.testing.Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_every_command_has_help_text() -> None:
    commands = cli.commands  # type: ignore[attr-defined]
    assert commands
    for name, command in commands.items():
        assert command.help and "Example" in command.help, name
        assert invoke(name, "--help").exit_code == 0
    assert "Example" in (cli.help or "")


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and "xentcheck" in result.output


def test_run_table_explains_the_naive_overflow(write: Write) -> None:
    path = write("s.yaml", NAIVE_OVERFLOW)
    result = invoke("run", str(path), env={"NO_COLOR": "1"})
    assert result.exit_code == 0  # a NaN is a finding, not a failure
    out = result.stdout
    assert "\x1b[" not in out  # plain text when not a terminal
    naive_rows = [line for line in out.splitlines() if line.lstrip("│").startswith("naive ")]
    assert len(naive_rows) == 4
    assert all("nan" in row and "exp: overflow at [0]" in row for row in naive_rows)
    stable_rows = [line for line in out.splitlines() if line.lstrip("│").startswith("stable ")]
    assert ["496" in row for row in stable_rows] == [False, True, False, False]
    assert all(" 500 " in row for i, row in enumerate(stable_rows) if i != 1)
    assert "loss of the inputs rounded to: bfloat16 496 (reference 500;" in out


def test_run_json_is_schema_1(write: Write) -> None:
    path = write("s.yaml", NAIVE_OVERFLOW)
    result = invoke("run", str(path), "--format", "json", "--dtype", "float32")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert document["schema"] == 1 and document["tool"] == "xentcheck"
    (scenario,) = document["scenarios"]
    assert scenario["reference"]["loss"] == 500.0
    naive = next(r for r in scenario["results"] if r["pipeline"] == "naive")
    assert naive["loss"] == "nan" and naive["first_bad_stage"] == "exp"
    assert naive["first_bad_index"] == [0]


def test_output_file(tmp_path: Path, write: Write) -> None:
    path = write("s.yaml", NAIVE_OVERFLOW)
    target = tmp_path / "report.json"
    result = invoke("run", str(path), "--format", "json", "--output", str(target))
    assert result.exit_code == 0 and result.stdout.startswith("RAN   s ")  # the summary
    assert json.loads(target.read_text())["schema"] == 1
    table = tmp_path / "report.txt"
    assert invoke("run", str(path), "--output", str(table)).exit_code == 0
    assert "naive" in table.read_text() and "\x1b[" not in table.read_text()


def test_dtype_pipeline_and_tolerance_options(write: Write) -> None:
    path = write("s.yaml", "logits: [0, -40]\nlabels: 0\n")
    result = invoke("run", str(path), "--format", "json", "--dtype", "float64,float32",
                    "--pipeline", "stable", "--rtol", "2", "--accumulate", "same")
    results = json.loads(result.stdout)["scenarios"][0]["results"]
    assert [(r["pipeline"], r["dtype"]) for r in results] == [("stable", "float64"),
                                                               ("stable", "float32")]
    # rel error 1 is within rtol 2: no precision_loss
    assert all(r["flags"] == [] for r in results)
    assert all(r["tolerance"] == {"rel": 2.0, "abs": 0.0} for r in results)
    assert results[1]["accumulate"] == "float32"


def test_logits_and_labels_files(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.array([[0.0, 100.0]], dtype=np.float32))
    np.save(tmp_path / "y.npy", np.array([0]))
    result = invoke("run", "--logits", str(tmp_path / "x.npy"), "--labels",
                    str(tmp_path / "y.npy"), "--format", "json", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    scenario = json.loads(result.stdout)["scenarios"][0]
    assert scenario["input"]["dtype"] == "float32"
    assert scenario["reference"]["loss"] == pytest.approx(100.0, rel=1e-15)


@pytest.mark.parametrize(("args", "message"), [
    (["run", "missing.yaml"], "missing.yaml: no such file"),
    (["run", "{bad}", "--dtype", "float8"], "unknown dtype 'float8'"),
    (["run", "{bad}", "--pipeline", "fancy"], "unknown pipeline 'fancy'"),
    (["run", "{bad}", "--format", "xml"], "Invalid value for '--format'"),
    (["run"], "give a scenario file"),
    (["run", "--logits", "x.npy"], "--logits needs --labels"),
    (["run", "{yaml}"], "not valid YAML"),
    (["run", "{bad}", "--rtol", "-1"], "--rtol"),
])
def test_usage_and_input_errors_exit_2_with_one_line(
    write: Write, args: list[str], message: str
) -> None:
    good = write("good.yaml", NAIVE_OVERFLOW)
    broken = write("broken.yaml", "logits: [1, 2\n")
    args = [a.replace("{bad}", str(good)).replace("{yaml}", str(broken)) for a in args]
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_input_error_is_a_single_line(write: Write) -> None:
    path = write("s.yaml", "logits: [[1, 2]]\nlabels: [5]\n")
    result = invoke("run", str(path))
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"xentcheck: error: {path}: labels: label 5")


def test_force_color(write: Write) -> None:
    path = write("s.yaml", NAIVE_OVERFLOW)
    colored = invoke("run", str(path), "--dtype", "float32", env={"FORCE_COLOR": "1"})
    assert "\x1b[" in colored.stdout
    plain = invoke("run", str(path), "--dtype", "float32",
                   env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert "\x1b[3" not in plain.stdout  # no colour codes (bold may remain)


def one_line_error(result: click.testing.Result) -> str:
    """The exit status is 2, stdout is empty and stderr is one line: return that line."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip()


def test_a_duplicate_key_exits_2_naming_the_key_and_its_line(write: Write) -> None:
    path = write("s.yaml", "logits: [1, 2]\nlabels: 0\nexpect:\n  - loss: finite\n"
                           "    loss: nan\n")
    line = one_line_error(invoke("check", str(path)))
    assert line == (f"xentcheck: error: {path}: loss (line 5): duplicate key (first given on "
                    "line 4); each key may appear once in a mapping")


@pytest.mark.parametrize("command", ["run", "check"])
@pytest.mark.parametrize(("rule", "message"), [
    ("nan@stabel", "--fail-on 'nan@stabel': unknown pipeline 'stabel'; pipelines are naive, "
                   "shifted, stable, accurate, online, chunked, clipped"),
    ("nan,inf@naive,fancy", "unknown pipeline 'fancy'"),
    ("nan@", "no pipeline after '@'"),
    ("nann@stable", "--fail-on 'nann@stable': unknown flag 'nann'; flags are nan, inf, "
                    "overflow, underflow, precision_loss, input_rounding"),
])
def test_an_unknown_pipeline_or_flag_in_fail_on_exits_2(
    write: Write, command: str, rule: str, message: str
) -> None:
    path = write("s.yaml", NAIVE_OVERFLOW)
    line = one_line_error(invoke(command, str(path), "--fail-on", rule))
    assert message in line


def test_fail_on_accepts_every_registered_pipeline(write: Write) -> None:
    # clipped is a probability-input pipeline: on logits it selects nothing, and is no typo
    path = write("s.yaml", NAIVE_OVERFLOW)
    assert invoke("check", str(path), "--fail-on", "nan@clipped,stable").exit_code == 0


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--rtol", "nan", "'nan' is not a finite number"),
    ("--rtol", "inf", "'inf' is not a finite number"),
    ("--atol", "nan", "'nan' is not a finite number"),
    ("--atol", "-1e-3", "'-1e-3' is negative"),
    ("--rtol", "-0.5", "'-0.5' is negative"),
])
def test_tolerances_on_the_command_line_are_finite_and_non_negative(
    write: Write, option: str, value: str, message: str
) -> None:
    # --rtol nan was accepted and flagged every row precision_loss
    path = write("s.yaml", NAIVE_OVERFLOW)
    for command in ("run", "check", "sweep"):
        args = [command, option, value] + ([] if command == "sweep" else [str(path)])
        line = one_line_error(invoke(*args))
        assert f"Invalid value for '{option}': {message}" in line


def test_a_bfloat16_npy_is_read_with_logits_dtype(tmp_path: Path) -> None:
    # numpy + ml_dtypes save bfloat16 as |V2, which was rejected as "holds |V2 values"
    import ml_dtypes
    from safetensors.numpy import save_file

    values = np.array([[2500.0, 1.0, -3.0], [0.5, 7.0, 2.0]], dtype=ml_dtypes.bfloat16)
    np.save(tmp_path / "x.npy", values)
    np.save(tmp_path / "y.npy", np.array([0, 2]))
    save_file({"logits": values}, str(tmp_path / "x.safetensors"))  # names bfloat16 itself
    rejected = one_line_error(invoke("run", "--logits", str(tmp_path / "x.npy"), "--labels",
                                     str(tmp_path / "y.npy")))
    assert "probably bfloat16 saved with numpy and ml_dtypes" in rejected
    assert "--logits-dtype bfloat16" in rejected and ".safetensors" in rejected

    def report(*args: str) -> dict[str, object]:
        result = invoke("run", *args, "--labels", str(tmp_path / "y.npy"), "--format", "json")
        assert result.exit_code == 0, result.output
        scenario = json.loads(result.stdout)["scenarios"][0]
        assert isinstance(scenario, dict)
        return scenario

    viewed = report("--logits", str(tmp_path / "x.npy"), "--logits-dtype", "bfloat16")
    named = report("--logits", str(tmp_path / "x.safetensors"))
    assert viewed["input"] == named["input"] and viewed["input"]["dtype"] == "bfloat16"
    assert viewed["reference"] == named["reference"] and viewed["results"] == named["results"]


@pytest.mark.parametrize(("args", "message"), [
    (["--logits", "{x}", "--logits-key", "a", "--labels", "{y}"],
     "--logits: {x}: --logits-key picks an array in an .npz or .safetensors file"),
    (["--logits", "{x}", "--labels", "{y}", "--labels-key", "b"],
     "--labels: {y}: --labels-key picks an array"),
    (["--logits", "{x}", "--labels-key", "b"], "--labels-key needs --labels FILE"),
    (["--logits", "{c}", "--label-column", "2", "--logits-key", "a"],
     "--logits-key does not apply to --label-column"),
    (["--logits", "{x}", "--labels", "{y}", "--logits-dtype", "bfloat16"],
     "holds float32 values, not bfloat16: --logits-dtype names the type of raw values"),
    (["{s}", "--logits-dtype", "bfloat16"], "give scenario files or --logits-dtype, not both"),
])
def test_array_options_that_do_not_apply_are_errors(
    tmp_path: Path, write: Write, args: list[str], message: str
) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 3), dtype=np.float32))
    np.save(tmp_path / "y.npy", np.array([0]))
    files = {"{x}": str(tmp_path / "x.npy"), "{y}": str(tmp_path / "y.npy"),
             "{c}": str(write("c.csv", "1,2,0\n")), "{s}": str(write("s.yaml", NAIVE_OVERFLOW))}
    for placeholder, path in files.items():
        args = [a.replace(placeholder, path) for a in args]
        message = message.replace(placeholder, path)
    assert message in one_line_error(invoke("run", *args))


@pytest.mark.parametrize("option", [["--loss", "sigmoid"], ["--probabilities"],
                                    ["--reduction", "sum"], ["--ignore-index", "0"],
                                    ["--label-smoothing", "0.1"], ["--temperature", "2"],
                                    ["--chunk-size", "8"]])
def test_loss_options_with_a_scenario_file_are_a_usage_error(write: Write,
                                                              option: list[str]) -> None:
    """A scenario file says its loss with keys: a --logits option given beside it would be
    ignored, so it is refused, naming the option (even given with its default value)."""
    path = write("s.yaml", NAIVE_OVERFLOW)
    result = CliRunner().invoke(cli, ["run", str(path), *option])
    assert result.exit_code == 2
    assert f"{option[0]} applies to --logits" in result.stderr
    assert "Traceback" not in result.output
    if option[0] == "--reduction":  # the default value, said explicitly, is refused too
        again = CliRunner().invoke(cli, ["run", str(path), "--reduction", "mean"])
        assert again.exit_code == 2 and "--reduction applies to --logits" in again.stderr


def test_loss_options_apply_to_logits_files(tmp_path: Path) -> None:
    logits, labels = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(logits, np.array([[0.0, 3.0, -1.0], [2.0, 2.0, 0.5]]))
    np.save(labels, np.array([1, -1]))
    result = invoke("run", "--logits", str(logits), "--labels", str(labels), "--reduction",
                    "sum", "--ignore-index", "-1", "--dtype", "float64", "--pipeline", "stable",
                    "--format", "json")
    [finding] = json.loads(result.stdout)["scenarios"][0]["results"]
    # the second row is ignored; the first's loss log(1 + e^-3 + e^-4) is the sum
    assert finding["loss"] == pytest.approx(np.log1p(np.exp(-3.0) + np.exp(-4.0)), rel=1e-15)
