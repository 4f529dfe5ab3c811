"""The limits command and the closed forms it prints next to the bisection."""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from xentcheck.cli import cli
from xentcheck.findings import Limit
from xentcheck.limit_closed_forms import closed_form_limit
from xentcheck.limits import limit_rows, limits_agree, pipeline_limit
from xentcheck.pipelines import textbook
from xentcheck.precision import Precision, precisions_for

ALL = precisions_for(["float16", "bfloat16", "float32", "float64"])


@pytest.mark.parametrize("classes", [1, 2, 3, 10, 255, 256, 257, 1000, 2049, 50_000, 65519,
                                     65520, 65521, 128256, 262144])
def test_closed_forms_agree_with_bisection_in_every_precision(classes: int) -> None:
    rows = limit_rows(textbook("softmax", True) + textbook("sigmoid", True), ALL, classes)
    assert len(rows) == 4 * 5
    assert all(row.agrees for row in rows), [(r.pipeline, r.dtype) for r in rows if not r.agrees]


@pytest.mark.parametrize("classes", [3, 255, 256, 257])
def test_closed_forms_follow_a_sum_accumulated_in_d(classes: int) -> None:
    # accumulate "same": a bfloat16 running sum stalls (a sum of ones at 256), so the
    # closed forms must use the sum as the pipeline rounds it, not C times the term
    same = precisions_for(["float16", "bfloat16", "float32", "float64"], "same")
    rows = limit_rows(textbook("softmax", True), same, classes)
    assert all(row.agrees for row in rows), [(r.pipeline, r.dtype) for r in rows if not r.agrees]
    naive = next(r for r in rows if r.pipeline == "naive" and r.dtype == "bfloat16")
    assert naive.closed_form is not None and naive.closed_form.largest_safe_logit is not None
    # Independently: every bfloat16 e between max / 512 and max, summed C times with each
    # partial sum rounded to bfloat16 by ml_dtypes; the edge is where exp rounds past the
    # largest e whose sum stays finite (the midpoint to the next bfloat16 value).
    bits = np.arange(0x7B00, 0x7F80, dtype=np.uint16)  # up to inf
    e = bits.view(ml_dtypes.bfloat16).astype(np.float64)
    total = np.zeros_like(e)
    with np.errstate(over="ignore"):
        for _ in range(classes):
            total = (total + e).astype(ml_dtypes.bfloat16).astype(np.float64)
    last = int(np.flatnonzero(np.isfinite(total) & np.isfinite(e))[-1])
    assert naive.closed_form.largest_safe_logit == pytest.approx(
        math.log((e[last] + e[last + 1]) / 2) if last + 1 < len(e) and np.isfinite(e[last + 1])
        else math.log(e[last] * (1 + 2.0**-9)), rel=1e-12)


def test_limits_at_an_llm_vocabulary_say_where_no_value_is_safe() -> None:
    runner = CliRunner()
    table = runner.invoke(cli, ["limits", "--classes", "128256", "--dtype", "float16",
                                "--loss", "softmax"], env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    stable = next(line for line in table.stdout.splitlines() if "stable" in line)
    assert stable.count("no safe value") == 7 and "yes" in stable
    naive = next(line for line in table.stdout.splitlines() if "naive" in line)
    assert "-0.671875" in naive and "-17.32812" in naive
    doc = json.loads(runner.invoke(cli, ["limits", "--classes", "128256", "--dtype", "float16",
                                         "--loss", "softmax", "--format", "json"]).stdout)
    by_name = {r["pipeline"]: r for r in doc["limits"]}
    assert by_name["stable"]["largest_safe_logit"] is None
    assert by_name["stable"]["no_safe_logit"] is True and by_name["stable"]["no_safe_spread"]
    assert by_name["naive"]["no_safe_logit"] is False
    # ln(65520 / 128256) = -0.67162 lies between -0.671875 and the next float16 up
    assert by_name["naive"]["largest_safe_logit"] == -0.671875
    assert by_name["naive"]["smallest_safe_logit"] == -17.328125  # just above ln(2^-25)
    assert by_name["naive"]["closed_form"]["smallest_safe_logit"] == pytest.approx(
        -25 * math.log(2))


def test_published_float_edges() -> None:
    # ln(FLT_MAX) = 88.72, ln(65504) = 11.09, ln(DBL_MAX) = 709.78 (C = 1: no sum to overflow)
    naive = textbook("softmax", True)[0]
    edges = {p.name: closed_form_limit(naive, p, 1) for p in ALL}
    assert edges["float32"] is not None and edges["float16"] is not None
    assert round(edges["float32"].largest_safe_logit or 0, 2) == 88.72
    assert round(edges["float16"].largest_safe_logit or 0, 2) == 11.09
    assert edges["float64"] is not None
    assert round(edges["float64"].largest_safe_logit or 0, 2) == 709.78
    # minus ln C once C terms are summed, up to where exp(L) falls on D's grid: the edge
    # is where exp rounds past the largest e of D with 3 e < FLT_MAX + ulp/2, whose
    # relative distance below (FLT_MAX + ulp/2) / 3 is under float32's spacing 2^-23
    three = closed_form_limit(naive, Precision("float32"), 3)
    assert three is not None and three.largest_safe_logit is not None
    assert three.largest_safe_logit == pytest.approx(
        (edges["float32"].largest_safe_logit or 0) - math.log(3), abs=2.0**-23)


def test_spread_without_subnormals_is_the_normal_range() -> None:
    # flush-to-zero float32: p_t = e^-S / 2 must stay >= 2^-126
    rows = limit_rows(textbook("softmax", True)[:1], precisions_for(["float32"]), 3)
    assert rows[0].spread_without_subnormals == pytest.approx(126 * math.log(2) - math.log(2))


def test_limits_command_table_and_json() -> None:
    runner = CliRunner()
    table = runner.invoke(cli, ["limits", "--dtype", "float32", "-C", "3"],
                          env={"NO_COLOR": "1"})
    assert table.exit_code == 0
    naive = next(line for line in table.stdout.splitlines() if "softmax" in line
                 and "naive" in line)
    assert "87.62422" in naive and "102.8735" in naive and "yes" in naive
    result = runner.invoke(cli, ["limits", "--format", "json", "--dtype", "float16",
                                 "--loss", "sigmoid"])
    doc = json.loads(result.stdout)
    naive_sigmoid = next(r for r in doc["limits"] if r["pipeline"] == "naive")
    bisected = pipeline_limit(textbook("sigmoid", True)[0], Precision("float16"), 3)
    assert naive_sigmoid["largest_safe_logit"] == bisected.largest_safe_logit
    # 1 + round(e^-x) rounds to 1 once e^-x < 2^-11 (1 + 2^-11): x > 11 ln 2 - ln(1 + 2^-11)
    assert naive_sigmoid["closed_form"]["largest_safe_logit"] == pytest.approx(
        11 * math.log(2) - math.log1p(2.0**-11), rel=1e-15)
    assert naive_sigmoid["agrees"] is True


def test_limits_bad_dtype_exits_2() -> None:
    result = CliRunner().invoke(cli, ["limits", "--dtype", "float8"])
    assert result.exit_code == 2 and "unknown dtype" in result.stderr and result.stdout == ""


def test_agreement_means_within_a_unit_of_d_at_the_edge() -> None:
    f32 = Precision("float32")
    ulp = 2.0**-17  # float32 spacing in [64, 128)
    found = Limit(87.625, None, -103.96875)
    assert limits_agree(found, Limit(87.625 + 0.9 * ulp, None, -103.96875), f32)
    assert not limits_agree(found, Limit(87.625 + 3 * ulp, None, -103.96875), f32)
    assert not limits_agree(found, Limit(math.inf, None, -103.96875), f32)
    assert not limits_agree(found, Limit(None, None, None, no_safe_logit=True), f32)
    # near float64's maximum the closed form stays finite: ln(DBL_MAX) - ln 2
    naive = textbook("softmax", True)[0]
    two = closed_form_limit(naive, Precision("float64"), 2)
    assert two is not None and two.largest_safe_logit is not None
    assert two.largest_safe_logit == pytest.approx(
        math.log(np.finfo(np.float64).max) - math.log(2), abs=1e-12)


def test_limits_of_framework_pipelines_by_name() -> None:
    # 70,000 float16 ones sum to inf once stored in float16 (65,520 rounds up): PyTorch's
    # log_softmax stores its float32 sum in D, so no logit is safe; torch.compile's fused
    # kernel keeps the sum in float32 and has no edge before float16's own range
    result = CliRunner().invoke(cli, ["limits", "--classes", "70000", "--loss", "softmax",
                                      "--pipeline", "torch,fused", "--dtype", "float16",
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = {row["pipeline"]: row for row in json.loads(result.stdout)["limits"]}
    assert list(rows) == ["torch", "fused"]
    assert rows["torch"]["no_safe_logit"] is True and rows["torch"]["largest_safe_logit"] is None
    assert rows["fused"]["largest_safe_logit"] == 65504.0
    assert rows["torch"]["closed_form"] is None  # found on the pipeline alone


def test_limits_refuses_an_unknown_pipeline() -> None:
    result = CliRunner().invoke(cli, ["limits", "--pipeline", "tourch"])
    assert result.exit_code == 2
    assert "unknown pipeline 'tourch'" in result.stderr and "torch" in result.stderr


FP8 = precisions_for(["float8_e4m3fn", "float8_e5m2"])


def in_band(precision: Precision, classes: int) -> bool:
    """C between 1 / u and where round(1 / round(C)) surely vanishes: naive's equal logits
    there are safe at some levels and not at others (1000 classes in float8_e4m3fn, 128,256
    in float8_e5m2; see test_limit_closed_forms.py), so its edges are not an interval."""
    shrink = 1 - 2.0 ** -(precision.mantissa_bits + 1)
    return 1 <= classes * precision.smallest_subnormal < 2 / shrink


@pytest.mark.parametrize("classes", [1, 2, 3, 10, 100, 300, 464, 465, 466, 1000, 1100, 2049,
                                     50_000, 128256, 262144])
def test_closed_forms_agree_with_bisection_in_the_8_bit_formats(classes: int) -> None:
    # 262,144 classes: even the sum of C smallest subnormals is past e4m3fn's 448
    rows = limit_rows(textbook("softmax", True) + textbook("sigmoid", True), FP8, classes)
    assert len(rows) == 2 * 5
    assert all(row.agrees or (row.pipeline == "naive" and row.family == "softmax"
                              and in_band(Precision(row.dtype), classes)) for row in rows), [
        (r.pipeline, r.dtype) for r in rows if not r.agrees]
    assert [in_band(p, classes) for p in FP8] == [classes == 1000, classes == 128256]


@pytest.mark.parametrize("classes", [3, 20, 100])
def test_closed_forms_follow_a_running_sum_in_the_8_bit_formats(classes: int) -> None:
    # accumulate "same" in fp8: a sum of ones stalls at 16 (e4m3fn) or 8 (e5m2), so the sum
    # of C ones, and the edges, are those of the running sum
    rows = limit_rows(textbook("softmax", True), precisions_for(
        ["float8_e4m3fn", "float8_e5m2"], "same"), classes)
    assert all(row.agrees for row in rows), [(r.pipeline, r.dtype) for r in rows if not r.agrees]
