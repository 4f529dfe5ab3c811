"""Table reports at every terminal width from 40 columns: nothing cut, nothing too wide.

Every shipped scenario, ``limits``, ``sweep`` and ``explain`` are rendered through the
command line (piped, with ``COLUMNS``) and through a rich Console of the width, and each
number the JSON report holds for a table cell is looked for, whole, in the text.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from frameworks import require
from rich.cells import cell_len
from rich.console import Console

from xentcheck.case import Case, LossSpec
from xentcheck.cli import cli
from xentcheck.evaluator import evaluate
from xentcheck.limits import limit_rows
from xentcheck.misuse import RULES
from xentcheck.pipelines import select
from xentcheck.precision import DTYPE_NAMES, Precision, precisions_for
from xentcheck.report_table import (
    LEGEND,
    render_limits_table,
    render_sweep_table,
    render_table,
)
from xentcheck.sweep import SweepSpec, run_sweep

WIDTHS = (40, 60, 80, 100, 160)
ROOT = Path(__file__).parent.parent
# relative, as a user gives them: an absolute path can be longer than a 40-column line
CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _in_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
FORMAT_MAX = {name: float(Precision(name).max) for name in DTYPE_NAMES}  # type: ignore[arg-type]


def invoke(*args: str, width: int, **env: str) -> str:
    result = CliRunner().invoke(cli, list(args), env={"COLUMNS": str(width), "NO_COLOR": "1",
                                                      **env}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def as_json(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(cli, [*args, "--format", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def assert_fits(text: str, width: int) -> None:
    assert "…" not in text
    for line in text.splitlines():
        assert cell_len(line) <= width, (width, line)


def assert_whole(token: str, text: str) -> None:
    """``token`` appears with no digit, letter, point or sign glued to either side (a cut
    number, or a number run into another, would not match)."""
    pattern = rf"(?<![\w.+\-]){re.escape(token)}(?![\w.])"
    assert re.search(pattern, text), f"{token!r} is not in the table whole"


def printed(value: float | str | None, digits: int) -> str | None:
    """A JSON number as the table prints it (independently formatted here)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value  # "nan", "inf", "-inf"
    return f"{value:.{digits}g}"


def limit_printed(value: float | None, dtype: str, digits: int) -> str | None:
    if value is None or value == FORMAT_MAX[dtype] or value < 0:
        return None  # "—", "format max" and "none (…)" are words, not numbers
    return f"{value:.{digits}g}"


def focus_index(scenario: dict[str, Any]) -> tuple[int, ...]:
    """The example the table's loss column shows: the counted example where the pipelines
    are farthest from the reference, recomputed from the JSON report."""
    reference = np.asarray(scenario["reference"]["per_example"], dtype=np.float64)
    farthest = np.zeros(reference.shape)
    for result in scenario["results"]:
        values = np.asarray(result["per_example"], dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            relative = np.where(values == reference, 0.0,
                                np.abs(values - reference) / np.abs(reference))
        farthest = np.maximum(farthest, np.where(np.isnan(relative), np.inf, relative))
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(farthest)), reference.shape))


def assert_run_cells(text: str, scenario: dict[str, Any]) -> None:
    assert_whole(scenario["name"], text)
    assert_whole(scenario["source"], text)
    focus = focus_index(scenario) if scenario["reduction"] == "none" else None
    if focus is not None:
        assert_whole("[" + ",".join(map(str, focus)) + "]", text)
    for result in scenario["results"]:
        assert_whole(result["pipeline"], text)
        assert_whole(result["dtype"], text)
        loss = result["loss"] if focus is None else \
            np.asarray(result["per_example"], dtype=object)[focus]
        tokens = [printed(loss, 9)] + [printed(result[k], 3)
                                       for k in ("abs_error", "rel_error", "ulp_error")]
        tokens += [limit_printed(result[k], result["dtype"], 6)
                   for k in ("largest_safe_logit", "largest_safe_spread")]
        tokens += result["flags"]
        for token in tokens:
            if token is not None:
                assert_whole(token, text)
    for mismatch in scenario["mismatches"]:
        for loss in mismatch["losses"]:
            assert_whole(printed(loss, 9) or "", text)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_run_tables_keep_every_number_whole(config: Path, width: int) -> None:
    text = invoke("run", str(config), width=width)
    assert_fits(text, width)
    (scenario,) = as_json("run", str(config))["scenarios"]
    assert_run_cells(text, scenario)
    # the legend wraps at spaces: its words, in order, with nothing cut
    flowing = " ".join(text.split())
    for paragraph in LEGEND:
        assert " ".join(paragraph.split()) in flowing


@pytest.mark.parametrize("width", WIDTHS)
def test_check_summary_fits(width: int) -> None:
    configs = str(CONFIGS[0].parent)
    assert_fits(invoke("check", configs, width=width), width)


@pytest.mark.parametrize("width", WIDTHS)
def test_failed_expectations_fit_and_keep_their_numbers(
    width: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a failing check prints each failed expectation with the measured value: wrapped at
    # spaces to the width, the numbers whole
    scenario = tmp_path / "f.yaml"
    scenario.write_text("logits: [[1.0, 2.0]]\nlabels: [1]\nexpect:\n"
                        "  - pipeline: naive\n    loss: nan\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["check", "f.yaml"],
                                env={"COLUMNS": str(width), "NO_COLOR": "1"})
    assert result.exit_code == 1, result.output
    text = result.stdout
    assert all(cell_len(line) <= width for line in text.splitlines()), text
    assert "…" not in text
    for measured in ("0.313477", "0.320312", "0.313262"):
        assert measured in text
    # the verdict's own lines and each failure wrap under their start, indented, so the
    # next scenario's PASS/FAIL stays the only thing at the left margin
    lines = text.splitlines()
    assert lines[0].startswith("FAIL") and all(line.startswith(" ") for line in lines[1:])


@pytest.mark.parametrize("width", WIDTHS)
def test_limits_keep_every_number_whole(width: int) -> None:
    args = ("limits", "--classes", "50257")
    text = invoke(*args, width=width)
    assert_fits(text, width)
    for row in as_json(*args)["limits"]:
        for token in (row["loss"], row["pipeline"], row["dtype"]):
            assert_whole(token, text)
        closed = row["closed_form"] or {}
        for value in (row["largest_safe_logit"], row["largest_safe_spread"],
                      closed.get("largest_safe_logit"), closed.get("largest_safe_spread"),
                      row["spread_without_subnormals"]):
            token = limit_printed(value, row["dtype"], 7)
            if token is not None:
                assert_whole(token, text)


def curve_lines(text: str) -> dict[str, str]:
    """``pipeline dtype`` to the sparkline, from whichever layout the width chose."""
    lines = text.splitlines()
    curves = {}
    for n, line in enumerate(lines):
        match = re.match(r"^│?(\w+)\s*│?\s*(\w+)\s*│.*│\s*([▁▂▃▄▅▆▇█x]+)│?$", line) or \
            re.match(r"^(\w+) (\w+)\s+([▁▂▃▄▅▆▇█x]+)$", line)
        if match:
            curves[f"{match[1]} {match[2]}"] = match[3]
        elif re.match(r"^(\w+) (\w+)$", line) and n + 1 < len(lines) and \
                re.match(r"^  [▁▂▃▄▅▆▇█x]+$", lines[n + 1]):
            curves[line] = lines[n + 1].strip()
    return curves


@pytest.mark.parametrize("width", WIDTHS)
def test_sweep_keeps_its_numbers_and_the_curve_its_broken_end(width: int) -> None:
    args = ("sweep", "--to", "1000", "--points", "60")
    text = invoke(*args, width=width)
    assert_fits(text, width)
    sweep = as_json(*args)["sweep"]
    assert_whole("1", text) and assert_whole("1000", text)  # the axis, both ends
    curves = curve_lines(text)
    assert len(curves) == len(sweep["curves"])
    for curve in sweep["curves"]:
        for token in (curve["pipeline"], curve["dtype"],
                      printed(curve["first_nonfinite"], 5),
                      printed(curve["first_inaccurate"], 5),
                      printed(curve["grad_first_nonfinite"], 5),
                      printed(curve["grad_first_inaccurate"], 5)):
            if token is not None:
                assert_whole(token, text)
        line = curves[f"{curve['pipeline']} {curve['dtype']}"]
        # NaN or inf at the largest magnitudes: the curve's last mark says so
        assert line.endswith("x") == (curve["bits"][-1] is None), (curve, line)


@pytest.mark.parametrize("width", WIDTHS)
def test_explain_wraps_at_spaces(width: int) -> None:
    listing = invoke("explain", width=width)
    assert_fits(listing, width)
    for rule in RULES.values():
        assert_whole(rule.id, listing) and assert_whole(rule.name, listing)
        text = invoke("explain", rule.id, width=width)
        assert_fits(text, width)
        assert " ".join(rule.explanation.split()) in " ".join(text.split())


def rich_text(render: Any, width: int) -> str:
    buffer = io.StringIO()
    render(Console(file=buffer, width=width, no_color=True, highlight=False))
    return buffer.getvalue()


@pytest.mark.parametrize("width", WIDTHS)
def test_a_rich_console_of_each_width(width: int) -> None:
    """The report functions themselves, given a real rich Console of the width."""
    rows = limit_rows(select("softmax", True, None), [Precision("float16")], 128)
    text = rich_text(lambda c: render_limits_table(rows, c), width)
    assert_fits(text, width)
    tokens = [limit_printed(row.bisected.largest_safe_spread, "float16", 7) for row in rows]
    assert any(tokens)  # naive and shifted have a spread edge
    for token in filter(None, tokens):
        assert_whole(token, text)
    case = Case("c", np.array([[1000.0, 2000.0, 2500.0], [0.0, -40.0, 1.0]]), np.array([1, 0]),
                "index", LossSpec())
    result = evaluate(case, precisions_for(["bfloat16", "float64"]),
                      select("softmax", True, None))
    text = rich_text(lambda c: render_table([result], c), width)
    assert_fits(text, width)
    for finding in result.findings:
        assert finding.loss is not None
        assert_whole(f"{finding.loss:.9g}", text)
    spec = SweepSpec(classes=10, stop=1e3, points=40)
    result = run_sweep(spec, [Precision("bfloat16")], select("softmax", True, None))
    text = rich_text(lambda c: render_sweep_table(result, c), width)
    assert_fits(text, width)
    assert set(curve_lines(text)) == {f"{c.pipeline} bfloat16" for c in result.curves}


@pytest.mark.parametrize("width", (60, 80))
def test_forced_colour_keeps_the_narrow_layout(width: int) -> None:
    """FORCE_COLOR colours a pipe; the layout still follows COLUMNS (the codes take no
    columns); NO_COLOR wins over FORCE_COLOR."""
    config = str(CONFIGS[0])
    coloured = invoke("run", config, width=width, FORCE_COLOR="1", NO_COLOR="")
    assert "\x1b[" in coloured
    assert_fits(re.sub(r"\x1b\[[0-9;]*m", "", coloured), width)
    plain = invoke("run", config, width=width, FORCE_COLOR="1")
    assert "\x1b[3" not in plain


def test_without_columns_a_pipe_gets_the_wide_table() -> None:
    """No COLUMNS and no terminal (a log): 180 columns, so the whole table in one piece (boxed
    where it fits, else with light rules), not split."""
    config = CONFIGS[0].parent / "naive_overflow.yaml"
    result = CliRunner().invoke(cli, ["run", str(config)], env={"COLUMNS": None},
                                catch_exceptions=False)
    headers = [line for line in result.stdout.splitlines()
               if line.lstrip("│┃ ").startswith("pipeline ")]
    assert len(headers) == 1
    assert " loss " in headers[0] and "safe spread ≤" in headers[0]
    assert max(cell_len(line) for line in result.stdout.splitlines()) <= 180


EXAMPLES = sorted(p.relative_to(ROOT) for p in (ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("width", [40, 80])
@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_user_function_tables_fit(example: Path, width: int) -> None:
    """A user's function's row carries its SPEC and the FILE:LINE where it broke: both
    long, neither cut."""
    if "torch" in example.name or "jax" in example.name:
        require("torch" if "torch" in example.name else "jax")
    text = invoke("run", str(example), width=width)
    assert_fits(text, width)
    assert_whole(f"{example.stem}.py:loss", text.replace("\n", " "))
