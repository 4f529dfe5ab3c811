"""Expectations, `xentcheck check`, --fail-on and the CI formats (JUnit, GitHub)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from xentcheck.cli import cli
from xentcheck.pipelines import select

Write = Callable[[str, str], Path]

GOOD = """\
name: good
logits: [1000, 2000, 2500]
labels: 1
expect:
  - pipeline: naive
    loss: nan
  - pipeline: stable
    dtype: float64
    max_ulp_error: 0
"""

# Line 6 holds a deliberately false expectation: stable is exact (500), not NaN.
BAD = """\
name: bad
logits: [1000, 2000, 2500]
labels: 1
dtypes: [float32]
expect:
  - pipeline: stable
    loss: nan
  - pipeline: naive
    flags: [overflow]
"""


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_check_passes_and_fails_with_the_measured_value_and_line(write: Write) -> None:
    good = write("cfg/good.yaml", GOOD)
    write("cfg/sub/bad.yaml", BAD)
    result = invoke("check", str(good.parent), env={"NO_COLOR": "1"})
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("PASS  good ")
    assert lines[1].startswith("FAIL  bad ")
    bad_path = good.parent / "sub" / "bad.yaml"
    assert f"{bad_path}:6: stable float32: loss expected nan, measured 500" in result.stdout
    assert invoke("check", str(good)).exit_code == 0


def test_check_defaults_to_configs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text(GOOD)
    monkeypatch.chdir(tmp_path)
    result = invoke("check")
    assert result.exit_code == 0 and "PASS  good" in result.stdout


def test_run_exits_1_on_a_failed_expectation(write: Write) -> None:
    result = invoke("run", str(write("bad.yaml", BAD)), env={"NO_COLOR": "1"})
    assert result.exit_code == 1
    assert "FAIL  bad" in result.stdout and "measured 500" in result.stdout


def test_fail_on_turns_findings_into_failures(write: Write) -> None:
    path = write("s.yaml", "logits: [1000, 2000, 2500]\nlabels: 1\n")
    assert invoke("run", str(path), "--fail-on", "nan@stable").exit_code == 0
    failed = invoke("check", str(path), "--fail-on", "nan,inf@naive,shifted",
                    env={"NO_COLOR": "1"})
    assert failed.exit_code == 1
    assert "--fail-on: naive float32: flags expected none of nan,inf, measured nan,overflow" \
        in failed.stdout
    bad = invoke("check", str(path), "--fail-on", "nann")
    assert bad.exit_code == 2 and "--fail-on 'nann'" in bad.stderr


def test_expectations_for_dtypes_left_out_are_skipped_and_typos_rejected(
    write: Write,
) -> None:
    # float16 is not run (the scenario's dtypes), so its expectation has nothing to judge
    path = write("s.yaml", "logits: [1, 2]\nlabels: 0\ndtypes: [float32]\nexpect:\n"
                           "  - {dtype: float16, loss: nan}\n  - {dtype: float32, loss: finite}\n")
    result = invoke("check", str(path), env={"NO_COLOR": "1"})
    # one check per float32 finding: the default pipelines (textbook and torch)
    checks = len(select("softmax", True, None))
    assert result.exit_code == 0 and f"{checks} checks hold" in result.stdout
    typo = write("t.yaml", "logits: [1, 2]\nlabels: 0\nexpect:\n"
                           "  - {pipeline: stabel, loss: nan}\n")
    result = invoke("check", str(typo))
    assert result.exit_code == 2
    assert "expect[0] (line 4): expect.pipeline: 'stabel' is not one of naive, shifted, " \
        "stable" in result.stderr


def test_no_mismatch(write: Write) -> None:
    path = write("s.yaml", "logits: [1000, 2000, 2500]\nlabels: 1\ndtypes: [float64]\n"
                           "expect:\n  - no_mismatch: [shifted, stable]\n"
                           "  - no_mismatch: [naive, stable]\n")
    result = invoke("check", str(path), env={"NO_COLOR": "1"})
    assert result.exit_code == 1
    assert ":6: float64: mismatch expected none between naive, stable, measured naive vs " \
        "stable (finiteness)" in result.stdout
    assert ":5:" not in result.stdout


def test_junit_is_valid_and_counts_failures(write: Write, tmp_path: Path) -> None:
    write("cfg/good.yaml", GOOD)
    write("cfg/bad.yaml", BAD)
    target = tmp_path / "junit.xml"
    result = invoke("check", str(tmp_path / "cfg"), "--format", "junit", "--output", str(target))
    assert result.exit_code == 1
    assert "FAIL  bad" in result.stdout  # the console keeps the human summary
    root = ET.parse(target).getroot()
    assert root.tag == "testsuites"
    assert root.get("tests") == "4" and root.get("failures") == "1"
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert set(suites) == {"good", "bad"}
    cases = suites["bad"].findall("testcase")
    assert [c.get("line") for c in cases] == ["6", "8"]
    failure = cases[0].find("failure")
    assert failure is not None
    assert failure.get("message") == "stable float32: loss expected nan, measured 500"
    assert cases[1].find("failure") is None


def test_github_annotations_and_step_summary(write: Write, tmp_path: Path) -> None:
    bad = write("bad.yaml", BAD)
    summary = tmp_path / "summary.md"
    result = invoke("check", str(bad), "--format", "github",
                    env={"GITHUB_STEP_SUMMARY": str(summary), "NO_COLOR": "1"})
    assert result.exit_code == 1
    annotation = next(line for line in result.stdout.splitlines() if line.startswith("::error"))
    assert annotation == (f"::error file={bad},line=6,title=xentcheck bad::"
                          "stable float32: loss expected nan, measured 500")
    text = summary.read_text()
    assert "| `bad` | ❌ fail |" in text


def test_json_carries_the_expectation_outcomes(write: Write) -> None:
    result = invoke("check", str(write("bad.yaml", BAD)), "--format", "json")
    doc = json.loads(result.stdout)
    scenario = doc["scenarios"][0]
    assert scenario["passed"] is False
    failed = [o for o in scenario["expectations"] if not o["passed"]]
    assert failed == [{"line": 6, "origin": "expect", "subject": "stable float32",
                       "condition": "loss", "expected": "nan", "measured": "500",
                       "passed": False}]


def test_shipped_configs_hold() -> None:
    root = Path(__file__).resolve().parent.parent / "configs"
    result = invoke("check", str(root), env={"NO_COLOR": "1"})
    assert result.exit_code == 0, result.stdout
    assert result.stdout.count("PASS") == len(list(root.glob("*.yaml")))


def test_junit_names_say_the_expectation_as_written(write: Write, tmp_path: Path) -> None:
    # Names held Python tuple text: "no_flags ('nan', 'inf')".
    path = write("s.yaml", "name: s\nlogits: [1000, 2000, 2500]\nlabels: 1\nexpect:\n"
                           "  - pipeline: [shifted, stable]\n    dtype: float64\n"
                           "    no_flags: [nan, inf]\n    max_ulp_error: 0\n"
                           "    first_bad_stage: null\n")
    target = tmp_path / "junit.xml"
    result = invoke("check", str(path), "--format", "junit", "--output", str(target),
                    "--fail-on", "nan,inf@stable")
    assert result.exit_code == 0
    names = [c.get("name") for c in ET.parse(target).getroot().iter("testcase")]
    assert names == [
        "line 5: pipeline: [shifted, stable], dtype: float64, no_flags: [nan, inf], "
        "max_ulp_error: 0, first_bad_stage: null",
        "--fail-on nan,inf@stable",
    ]


CI_WORKFLOW = """\
name: ci
on: [push]
jobs:
  test:
    runs-on: ubuntu-latest
    steps:
      - run: xentcheck check configs/
"""


def test_check_of_a_repository_skips_what_is_not_a_scenario(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, write: Write
) -> None:
    # `xentcheck check .` failed on .github/workflows/ci.yml
    write("repo/configs/good.yaml", GOOD)
    write("repo/.github/workflows/ci.yml", "name: [unclosed\n")  # hidden: never read
    write("repo/.pre-commit-config.yaml", "repos: [{\n")  # a hidden file: never read
    write("repo/.venv/pyvenv.cfg", "home = /usr/bin\n")
    write("repo/.venv/lib/site-packages/pkg/config.yaml", "{\n")
    write("repo/env/pyvenv.cfg", "home = /usr/bin\n")  # a venv that is not hidden
    write("repo/env/lib/python3.12/site-packages/x.yaml", "{\n")
    write("repo/web/node_modules/pkg/x.yml", "{\n")
    write("repo/deploy/workflow.yml", CI_WORKFLOW)
    write("repo/deploy/list.yaml", "- a\n- b\n")
    monkeypatch.chdir(tmp_path / "repo")
    result = invoke("check", ".", env={"NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith("PASS  good ")
    assert result.stderr.splitlines() == [
        "xentcheck: note: skipped deploy/list.yaml: not a scenario (none of the keys logits, "
        "labels, scenarios)",
        "xentcheck: note: skipped deploy/workflow.yml: not a scenario (none of the keys "
        "logits, labels, scenarios)",
    ]


def test_a_scenario_with_a_typo_still_fails_in_a_folder(write: Write, tmp_path: Path) -> None:
    write("cfg/good.yaml", GOOD)
    typo = write("cfg/typo.yaml", "logits: [1, 2]\nlables: 0\n")
    result = invoke("check", str(tmp_path / "cfg"))
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (f"xentcheck: error: {typo}: lables (line 2): unknown key; did "
                             "you mean 'labels'? (keys: name, description, loss, logits, "
                             "labels, from_logits, class_weights, pos_weight, label_smoothing, "
                             "ignore_index, reduction, dtypes, pipelines, functions, tolerance, "
                             "expect)\n")


def test_a_file_named_is_always_read_as_a_scenario(write: Write, tmp_path: Path) -> None:
    workflow = write("ci.yml", CI_WORKFLOW)
    result = invoke("check", str(workflow))
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"xentcheck: error: {workflow}: on (line 2): "
                                    "unknown key")
    empty = write("empty/notes.yaml", "title: notes\n")
    result = invoke("check", str(empty.parent))
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (f"xentcheck: error: {empty.parent}: holds no "
                                              "scenario files (1 other YAML files skipped)")


def test_a_scenario_without_expectations_ran_and_had_nothing_to_check(
    write: Write, tmp_path: Path
) -> None:
    # It said "PASS ... (0 checks hold)"
    plain = write("cfg/plain.yaml", "logits: [1, 2]\nlabels: 0\n")
    skipped = write("cfg/skipped.yaml", "logits: [1, 2]\nlabels: 0\ndtypes: [float32]\n"
                                        "expect:\n  - {dtype: float16, loss: nan}\n")
    result = invoke("check", str(tmp_path / "cfg"), env={"NO_COLOR": "1"})
    assert result.exit_code == 0  # the exit status does not change
    assert result.stdout.splitlines() == [
        f"RAN   plain  ({plain}: no expectations)",
        f"RAN   skipped  ({skipped}: no expectation applies to the dtypes and pipelines run)",
    ]
    target = tmp_path / "junit.xml"
    assert invoke("check", str(plain), "--format", "junit", "--output",
                  str(target)).exit_code == 0
    (case,) = ET.parse(target).getroot().iter("testcase")
    assert case.get("name") == "runs (no expectations)" and case.find("failure") is None
    summary = tmp_path / "summary.md"
    github = invoke("check", str(plain), "--format", "github",
                    env={"GITHUB_STEP_SUMMARY": str(summary), "NO_COLOR": "1"})
    assert github.exit_code == 0 and "::error" not in github.stdout
    assert "| `plain` | ran (no expectations) | — |" in summary.read_text()
    document = json.loads(invoke("check", str(plain), "--format", "json").stdout)
    assert document["scenarios"][0]["passed"] is True
    assert document["scenarios"][0]["expectations"] == []
    # with a --fail-on rule there is something to check: a pass again
    ruled = invoke("check", str(plain), "--fail-on", "nan", env={"NO_COLOR": "1"})
    # one check per finding: the default pipelines x 4 dtypes
    checks = 4 * len(select("softmax", True, None))
    assert ruled.stdout.startswith("PASS  plain ") and f": {checks} checks hold)" in ruled.stdout
