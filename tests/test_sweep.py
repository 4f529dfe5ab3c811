"""Sweeps: break points against closed forms, the curve, JSON, the PNG and the CLI."""

from __future__ import annotations

import builtins
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from xentcheck.cli import cli
from xentcheck.errors import UsageError
from xentcheck.pipelines import select, textbook
from xentcheck.plot import write_sweep_plot
from xentcheck.precision import precisions_for
from xentcheck.sweep import PATTERNS, SweepSpec, run_sweep, sweep_case


def curve(result: Any, pipeline: str, dtype: str) -> Any:
    return next(c for c in result.curves if c.pipeline == pipeline and c.dtype == dtype)


def first_above(magnitudes: np.ndarray, edge: float) -> float:
    return float(magnitudes[np.argmax(magnitudes > edge)])


def test_shifted_breaks_where_the_target_probability_underflows() -> None:
    # C = 2, pattern bottom: logits [m, -m], target -m. p_t = round(e^-2m) is 0 once
    # e^-2m <= 2^-150 (half float32's smallest subnormal): 2m > 150 ln 2.
    spec = SweepSpec(classes=2, pattern="bottom", start=10, stop=100, points=500)
    result = run_sweep(spec, precisions_for(["float32"]), textbook("softmax", True))
    edge = 150 * math.log(2) / 2
    assert curve(result, "shifted", "float32").first_nonfinite == first_above(
        result.magnitudes, edge)
    assert curve(result, "stable", "float32").first_nonfinite is None


def test_naive_overflows_at_ln_flt_max_with_a_fixed_spread() -> None:
    # pattern spread: logits [m, m - 10]; exp(m) overflows float32 once m > ln(FLT_MAX + ulp/2)
    spec = SweepSpec(classes=2, pattern="spread", spread=10.0, start=50, stop=120, points=700,
                     log_scale=False)
    result = run_sweep(spec, precisions_for(["float32"]), textbook("softmax", True))
    edge = math.log(2 - 2.0**-24) + 127 * math.log(2)
    naive = curve(result, "naive", "float32")
    assert naive.first_nonfinite == first_above(result.magnitudes, edge)
    assert curve(result, "shifted", "float32").first_nonfinite is None
    # the loss is log(1 + e^-10) at every magnitude: stable stays within the tolerance
    assert curve(result, "stable", "float32").first_inaccurate is None


def test_bits_are_log2_of_one_plus_ulps() -> None:
    # Softmax C = 2, pattern top: logits [m, -m], target m; the loss is log1p(e^-2m). For
    # 2m > 53 ln 2 shifted rounds p_t = 1 / (1 + e^-2m) to 1 and returns log(1) = 0, so its
    # error is the whole loss: loss / spacing(loss) ulps.
    spec = SweepSpec(classes=2, pattern="top", start=20, stop=25, points=3, log_scale=False)
    result = run_sweep(spec, precisions_for(["float64"]), textbook("softmax", True))
    shifted = curve(result, "shifted", "float64")
    truth = np.log1p(np.exp(-2 * result.magnitudes))
    ulps = truth / np.spacing(truth)
    np.testing.assert_allclose(shifted.bits, np.log2(1 + ulps), rtol=1e-12)
    assert shifted.first_inaccurate == 20.0


def test_patterns_build_the_documented_inputs() -> None:
    case = sweep_case(SweepSpec(classes=3, pattern="top", start=1, stop=2, points=2))
    np.testing.assert_array_equal(case.logits, [[1, 0, -1], [2, 0, -2]])
    assert case.labels.tolist() == [0, 0]
    case = sweep_case(SweepSpec(classes=3, pattern="spread", spread=4, start=1, stop=2,
                                points=2))
    np.testing.assert_array_equal(case.logits, [[1, -1, -3], [2, 0, -2]])
    assert case.labels.tolist() == [2, 2]
    with pytest.raises(UsageError, match="positive range"):
        SweepSpec(start=0)
    with pytest.raises(UsageError, match="unknown pattern"):
        SweepSpec(pattern="zigzag")


def test_cli_table_json_and_plot(tmp_path: Path) -> None:
    runner = CliRunner()
    table = runner.invoke(cli, ["sweep", "--dtype", "float32", "--points", "300"],
                          env={"NO_COLOR": "1"})
    assert table.exit_code == 0, table.output
    assert "not finite from" in table.stdout and "x" in table.stdout
    doc = json.loads(runner.invoke(cli, ["sweep", "--dtype", "float16", "--format",
                                         "json"]).stdout)
    curves = doc["sweep"]["curves"]
    assert {c["pipeline"] for c in curves} == {p.name for p in select("softmax", True, None)}
    assert len(curves[0]["bits"]) == doc["sweep"]["points"] == 200
    png = tmp_path / "sweep.png"
    result = runner.invoke(cli, ["sweep", "--points", "50", "--plot", str(png)])
    assert result.exit_code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    spec = SweepSpec(points=5)
    result = run_sweep(spec, precisions_for(["float32"]), textbook("softmax", True))
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(UsageError, match=r"pip install 'xentcheck\[plot\]'"):
        write_sweep_plot(result, tmp_path / "x.png")


def test_bad_sweep_options_exit_2() -> None:
    result = CliRunner().invoke(cli, ["sweep", "--from", "10", "--to", "1"])
    assert result.exit_code == 2 and "smaller to a larger" in result.stderr


def test_the_naive_gradient_breaks_before_the_loss() -> None:
    # C = 2, pattern bottom: [m, -m], target -m. The backward of log divides by
    # p_t = round(e^-2m) (a multiple k of float32's smallest subnormal 2^-149); 1/p_t
    # overflows once k <= 2^21 - 1, i.e. once e^-2m < (2^21 - 1/2) 2^-149:
    # 2m > 149 ln 2 - ln(2^21 - 1/2), m > 44.36, while the loss lasts until m > 51.99.
    spec = SweepSpec(classes=2, pattern="bottom", start=44.0, stop=53.0, points=9001,
                     log_scale=False)
    result = run_sweep(spec, precisions_for(["float32"]), textbook("softmax", True)[:1])
    naive = curve(result, "naive", "float32")
    edge = (149 * math.log(2) - math.log(2**21 - 0.5)) / 2
    assert naive.grad_first_nonfinite == first_above(result.magnitudes, edge)
    assert naive.first_nonfinite == first_above(result.magnitudes, 150 * math.log(2) / 2)


@pytest.mark.parametrize(("name", "magic"), [("s.png", b"\x89PNG\r\n\x1a\n"), ("s.pdf", b"%PDF-"),
                                             ("s.svg", b"<?xml"), ("s.SVG", b"<?xml")])
def test_plot_format_follows_the_suffix(tmp_path: Path, name: str, magic: bytes) -> None:
    result = CliRunner().invoke(cli, ["sweep", "--points", "20", "--dtype", "float32",
                                      "--plot", str(tmp_path / name)])
    assert result.exit_code == 0, result.output
    data = (tmp_path / name).read_bytes()
    assert data.startswith(magic)
    if name.lower().endswith(".svg"):
        assert b"<svg" in data


def one_line_error(result: Any) -> str:
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    return str(result.stderr.strip())


@pytest.mark.parametrize(("name", "message"), [
    ("p.txt", "--plot {path}: matplotlib writes no '.txt' images; the suffix chooses the "
              "format: end the name with one of .avif, .eps, .gif, .jpeg, .jpg, .pdf, .png,"),
    ("p", "--plot {path}: no suffix; the suffix chooses the format"),
    ("p.pgf", "matplotlib writes no '.pgf' images"),  # needs LaTeX: not offered
    ("missing/p.png", "--plot {path}: no such folder"),
])
def test_an_unusable_plot_name_exits_2_before_computing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, message: str
) -> None:
    # `sweep --plot p.txt` was a matplotlib traceback, with exit 1 (an expectation failed)
    from xentcheck import cli as cli_module

    def no_sweep(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the sweep ran before the plot name was checked")

    monkeypatch.setattr(cli_module, "run_sweep", no_sweep)
    path = tmp_path / name
    line = one_line_error(CliRunner().invoke(cli, ["sweep", "--plot", str(path)]))
    assert message.format(path=path) in line
    assert not path.exists()


def test_missing_matplotlib_exits_2_before_computing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xentcheck import cli as cli_module

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    def no_sweep(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the sweep ran before matplotlib was looked for")

    monkeypatch.setattr(cli_module, "run_sweep", no_sweep)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    line = one_line_error(CliRunner().invoke(cli, ["sweep", "--plot", str(tmp_path / "p.png")]))
    assert line == "xentcheck: error: --plot needs matplotlib: pip install 'xentcheck[plot]'"


def test_a_gradient_that_is_not_finite_is_also_inaccurate() -> None:
    # The float32 naive sweep, [m, -m] with the target at -m. Autograd of the division (as
    # PyTorch computes it) forms (e_t / s) / s = e^-3m, which falls into float32's subnormals:
    # its rounding error alone stays within the tolerance (8 eps = 2^-20) while
    # 2^-150 / e^-3m + 4 * 2^-24 <= 2^-20, i.e. up to m = (130 - log2(4/3)) ln 2 / 3 = 29.94,
    # so the gradient turns inaccurate after that and before it stops being finite, at
    # m > 44.36 where 1 / p_t = e^2m overflows. "Inaccurate" was None past that edge once.
    spec = SweepSpec(classes=2, pattern="bottom", start=25.0, stop=53.0, points=2801,
                     log_scale=False)
    result = run_sweep(spec, precisions_for(["float32"]), textbook("softmax", True)[:1])
    naive = curve(result, "naive", "float32")
    edge = (149 * math.log(2) - math.log(2**21 - 0.5)) / 2
    assert naive.grad_first_nonfinite == first_above(result.magnitudes, edge)
    assert naive.grad_first_inaccurate is not None
    assert (130 - math.log2(4 / 3)) * math.log(2) / 3 < naive.grad_first_inaccurate
    assert naive.grad_first_inaccurate < naive.grad_first_nonfinite


def test_the_gradient_is_never_inaccurate_only_after_it_stopped_being_finite() -> None:
    broken = []
    for pattern in PATTERNS:
        spec = SweepSpec(classes=2, pattern=pattern, points=400)
        # (float64 is left out: pattern top there trips an overflow warning in the
        # evaluator's relative gradient error, a separate matter)
        result = run_sweep(spec, precisions_for(["float16", "bfloat16", "float32"]),
                           textbook("softmax", True))
        broken += [c for c in result.curves if c.grad_first_nonfinite is not None]
    assert len(broken) > 10  # many gradients break in this range
    for c in broken:
        assert c.grad_first_inaccurate is not None
        assert c.grad_first_inaccurate <= c.grad_first_nonfinite, (c.pipeline, c.dtype)


@pytest.mark.parametrize(("args", "message"), [
    (["--to", "1e400"], "Invalid value for '--to': '1e400' is not a finite number"),
    (["--from", "nan"], "Invalid value for '--from': 'nan' is not a finite number"),
    (["--from", "-inf", "--linear"], "Invalid value for '--from': '-inf' is not a finite"),
    (["--spread", "-1", "--pattern", "spread"], "Invalid value for '--spread': '-1' is negative"),
    (["--from", "0"], "--from 0 --to 100000: a log-spaced sweep needs a positive range"),
    (["--from", "-5", "--to", "5"], "a log-spaced sweep needs a positive range"),
    (["--from", "5", "--to", "5"], "the range must go from a smaller to a larger magnitude"),
    (["--from", "-1e308", "--to", "1e308", "--linear"],
     "--from -1e+308 --to 1e+308: the range is wider than float64 holds"),
    (["--to", "1e308"], "--to 1e+308: the 'bottom' pattern's logits (or their differences) "
                        "overflow float64 at that magnitude; lower --to"),
    (["--to", "1e308", "--pattern", "normal"], "the 'normal' pattern's logits"),
    (["--to", "1e308", "--pattern", "normal", "--loss", "sigmoid"], "the 'normal' pattern"),
])
def test_sweep_bounds_out_of_range_exit_2_without_a_warning(
    args: list[str], message: str
) -> None:
    # `sweep --to 1e400` printed numpy's RuntimeWarning (the suite turns warnings into errors)
    line = one_line_error(CliRunner().invoke(cli, ["sweep", "--points", "5", *args]))
    assert message in line


def test_sweep_bounds_in_range_run() -> None:
    # the largest magnitudes whose logits and differences stay finite float64 numbers
    for args in (["--to", "8e307"], ["--to", "1e308", "--pattern", "spread"],
                 ["--to", "1e308", "--loss", "sigmoid"]):
        result = CliRunner().invoke(cli, ["sweep", "--points", "5", "--dtype", "float64", *args])
        assert result.exit_code == 0, (args, result.output)
