"""The precision model and the stage watch, against hand-derived values."""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

from xentcheck.errors import UsageError
from xentcheck.precision import Precision
from xentcheck.stages import StageRunner


def runner(dtype: str, accumulate: str = "default", rows: int = 1) -> StageRunner:
    run = StageRunner(Precision(dtype, accumulate), ("cast", "exp", "sum", "log", "divide"))  # type: ignore[arg-type]
    return run.bind(np.ones(rows, dtype=bool))


def test_rounding_to_bfloat16_and_float16() -> None:
    p = Precision("bfloat16")
    assert p.round(np.array([2500.0, 2000.0])).astype(np.float64).tolist() == [2496.0, 2000.0]
    h = Precision("float16")
    # 65504 is float16's largest; values from 65520 (max + half an ulp) round to inf
    assert h.round(np.array([65519.0, 65520.0])).astype(np.float64).tolist() == [65504.0,
                                                                                  math.inf]


def test_running_sum_in_bfloat16_stalls_at_256() -> None:
    ones = np.ones((1, 1000))
    # 256 + 1 = 257 needs 9 significant bits; bfloat16 has 8 and the tie rounds to even 256
    assert float(runner("bfloat16", "same").sum("sum", ones)[0]) == 256.0
    assert float(runner("bfloat16").sum("sum", ones)[0]) == 1000.0  # float32 accumulation
    assert float(runner("float16", "same").sum("sum", ones)[0]) == 1000.0  # 11 bits suffice
    assert float(runner("float16", "same").sum("sum", np.ones((1, 5000)))[0]) == 2048.0


def test_float16_sum_of_100000_ones_is_inf_and_reported_as_overflow() -> None:
    run = runner("float16")
    assert float(run.sum("sum", np.ones((1, 100_000)))[0]) == math.inf
    assert [(e.stage, e.kind, e.index) for e in run.events] == [("sum", "overflow", (0,))]


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_ulp_matches_numpy_spacing(dtype: str) -> None:
    values = np.array([1.0, 3.0, 1000.0, 1e-6, 2.0**-20, 0.5, 7.0], dtype=dtype)
    got = Precision(dtype).ulp(values.astype(np.float64))
    np.testing.assert_array_equal(got, np.spacing(values).astype(np.float64))


def test_ulp_bfloat16_by_hand() -> None:
    # 8 significant bits: spacing 2^(e-7) in [2^e, 2^(e+1)); subnormal spacing 2^-133
    got = Precision("bfloat16").ulp(np.array([1.0, 496.0, 2500.0, 0.0, 1e-40]))
    assert got.tolist() == [2.0**-7, 2.0, 16.0, 2.0**-133, 2.0**-133]


def test_elementwise_steps_are_correctly_rounded_in_float16() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(0, 100, 500).astype(np.float16)
    b = rng.normal(0, 3, 500).astype(np.float16)
    run = runner("float16", rows=500)
    got = {
        "add": run.add("exp", a, b), "sub": run.subtract("exp", a, b),
        "mul": run.multiply("exp", a, b), "div": run.divide("divide", a, b),
    }
    for name, result in got.items():
        for x, y, r in zip(a, b, result, strict=True):
            fx, fy = Fraction(float(x)), Fraction(float(y))
            exact = {"add": fx + fy, "sub": fx - fy, "mul": fx * fy,
                     "div": fx / fy if fy else None}[name]
            if exact is None:
                continue
            candidates = np.array([float(exact)], dtype=np.float64).astype(np.float16)
            nearest = float(candidates[0])
            # correctly rounded: no float16 value is closer to the exact result
            assert abs(Fraction(float(r)) - exact) <= abs(Fraction(nearest) - exact), name


def test_watch_names_stage_kind_and_index() -> None:
    run = runner("float32", rows=2)
    x = np.array([[0.0, 100.0], [0.0, 0.0]])
    e = run.exp("exp", run.cast("cast", x))
    s = run.sum("sum", e, keepdims=True)
    run.divide("divide", e, s)
    run.log("log", np.array([[1.0, 0.0], [1.0, 1.0]]))
    events = {(ev.stage, ev.kind): ev.index for ev in run.events}
    assert events[("exp", "overflow")] == (0, 1)
    assert events[("divide", "nan")] == (0, 1)  # inf / inf
    assert events[("log", "log_of_zero")] == (0, 1)
    assert ("sum", "overflow") not in events  # the inf came in: not this stage's doing


def test_ignored_rows_are_not_watched() -> None:
    run = StageRunner(Precision("float32"), ("exp",)).bind(np.array([False, True]), 10)
    run.exp("exp", np.array([[100.0], [1.0]]))
    assert run.events == []
    run.bind(np.array([True, True]), 10)
    run.exp("exp", np.array([[1.0], [100.0]]))
    assert [(e.kind, e.index) for e in run.events] == [("overflow", (11, 0))]  # block offset


def test_underflow_only_at_critical_positions() -> None:
    run = runner("float32", rows=1)
    critical = np.array([[False, True]])
    run.exp("exp", np.array([[-200.0, -200.0]]), critical=critical)
    assert [(e.kind, e.index) for e in run.events] == [("underflow", (0, 1))]


def test_unknown_dtype_or_accumulate() -> None:
    with pytest.raises(UsageError, match="unknown dtype"):
        Precision("float8")
    with pytest.raises(UsageError, match="accumulate"):
        Precision("float16", "int8")  # type: ignore[arg-type]
    assert Precision("bfloat16").dtype == np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_bit_tests_agree_with_numpy_on_every_16_bit_pattern(name: str) -> None:
    # all 65,536 values of the format, NaNs of every payload, both zeros and infinities
    precision = Precision(name)  # type: ignore[arg-type]
    values = np.arange(1 << 16, dtype=np.uint16).view(precision.dtype)
    wide = values.astype(np.float32)
    np.testing.assert_array_equal(precision.isfinite(values), np.isfinite(wide))
    np.testing.assert_array_equal(precision.isnan(values), np.isnan(wide))
    np.testing.assert_array_equal(precision.isinf(values), np.isinf(wide))
    np.testing.assert_array_equal(precision.iszero(values), wide == 0)
    assert precision.isnan(np.float32("nan")) and not precision.iszero(np.float32(1e-40))


def _numpy_half(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x.astype(np.float16).astype(np.float32)


def test_float16_rounding_within_float32_is_numpys_conversion() -> None:
    # float16 values are held in float32 and rounded there; the rounding must be numpy's
    # float32 -> float16 conversion exactly. Every float16 number, its float32 neighbours,
    # every midpoint between float16 neighbours (the ties) and the float32 numbers beside
    # them, specials and a million random bit patterns. (All 2**32 inputs were checked once
    # by a script; this keeps the cases that can go wrong.)
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = np.sort(halves[np.isfinite(halves)].astype(np.float64))
    mids = ((finite[1:] + finite[:-1]) / 2).astype(np.float32)  # exact: 12 bits
    centres = np.concatenate([finite.astype(np.float32), mids,
                              np.float32([65504, 65519.996, 65520, 65536, 2.0**-14, 2.0**-25,
                                          3 * 2.0**-26, 1e-45, 3.4e38])])
    bits = centres.view(np.uint32).astype(np.int64)
    around = (bits[:, None] + np.arange(-3, 4)[None, :]).ravel()
    around = around[(around >= 0) & (around < 1 << 32)].astype(np.uint32)
    specials = np.array([0x7F800000, 0xFF800000, 0x7FC00000, 0x7FFFFFFF, 0xFFFFF000,
                         0x7FFFF000, 0x00000001, 0x80000001], dtype=np.uint32)
    rng = np.random.default_rng(0)
    random = rng.integers(0, 1 << 32, 1_000_000, dtype=np.uint64).astype(np.uint32)
    for patterns in (around, specials, random):
        for x in (patterns.view(np.float32), -patterns.view(np.float32)):
            got = Precision("float16").round(x)
            want = _numpy_half(x)
            same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
            assert same.all(), x[~same][:5]
            assert got.dtype == np.float32
