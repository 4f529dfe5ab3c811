"""Inputs at the ends of float64's range are findings, never warnings or tracebacks."""

from __future__ import annotations

import json
import math
from pathlib import Path

from click.testing import CliRunner

from xentcheck.cli import cli


def test_a_spread_past_float64s_range_is_inf_without_a_warning(tmp_path: Path) -> None:
    # 1e308 - (-1e308) overflows float64: the spread is inf, the headroom -inf (the suite
    # turns warnings into errors, so a RuntimeWarning fails here)
    scenario = tmp_path / "far.yaml"
    scenario.write_text("logits: [[1.0e+308, -1.0e+308]]\nlabels: [1]\n")
    result = CliRunner().invoke(cli, ["run", str(scenario), "--format", "json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    [entry] = document["scenarios"]
    assert entry["input"]["max_spread"] == "inf"
    # the true loss is 2e308 - log1p(e^-2e308) = inf in float64; every pipeline says inf or nan
    assert entry["reference"]["loss"] == "inf"
    for r in entry["results"]:
        assert r["loss"] in ("inf", "nan") or math.isinf(float(r["loss"]))
