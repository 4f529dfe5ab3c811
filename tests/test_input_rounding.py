"""Inputs are rounded to D once, correctly, from their own dtype.

Every rounding here is checked against an exact rounding written independently with
Python's integer arithmetic (``fractions.Fraction``): round to nearest, ties to the even
significand, subnormals on a fixed grid, and from D's largest number plus half an ulp on,
infinity (NaN in float8_e4m3fn, which has no infinity). The cases: exact ties between
neighbouring numbers of D and their neighbours (a float64 ulp either side, and ``2**-40``
relative), every binade's edges, the subnormal range and the underflow to zero, the
overflow threshold, the specials, and large random samples; every float16 and bfloat16
value into the 8-bit formats, and every 8-bit value into the other formats.
"""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

from xentcheck.precision import Precision

# (significand digits including the implicit bit, smallest normal exponent, largest exponent)
FORMATS = {
    "bfloat16": (8, -126, 127),
    "float16": (11, -14, 15),
    "float32": (24, -126, 127),
    "float64": (53, -1022, 1023),
    "float8_e4m3fn": (4, -6, 8),
    "float8_e5m2": (3, -14, 15),
}
FP8 = ["float8_e4m3fn", "float8_e5m2"]


def largest(name: str) -> Fraction:
    """The largest finite number: the top binade's last, except in float8_e4m3fn, whose
    all-ones pattern (1.875 * 2**8 = 480) is NaN, so 1.75 * 2**8 = 448 (OCP 8-bit floating
    point specification 1.0, 2023, table 1)."""
    digits, _, max_exponent = FORMATS[name]
    if name == "float8_e4m3fn":
        return Fraction(448)
    return (2 - Fraction(2) ** (1 - digits)) * Fraction(2) ** max_exponent


def exact_round(value: float | int, name: str) -> float:
    """``value`` (a float64 or an integer, taken exactly) rounded to nearest-even in ``name``.

    Past the largest finite number the result is inf, or NaN in float8_e4m3fn (no infinity:
    ±inf becomes NaN too). The rounding is that of the format with an unbounded exponent, so
    a tie between 448 and the 480 float8_e4m3fn lacks rounds to the even 448.
    """
    no_inf = name == "float8_e4m3fn"
    if isinstance(value, float) and not math.isfinite(value):
        return math.nan if no_inf else value
    digits, min_exponent, _ = FORMATS[name]
    exact = Fraction(value)
    sign = -1.0 if exact < 0 or (exact == 0 and math.copysign(1.0, value) < 0) else 1.0
    magnitude = abs(exact)
    if magnitude == 0:
        return math.copysign(0.0, sign)
    num, den = magnitude.numerator, magnitude.denominator
    exponent = num.bit_length() - den.bit_length()  # num/den in [2**(exponent-1), 2**(exponent+1))
    if (num << max(0, -exponent)) < (den << max(0, exponent)):
        exponent -= 1
    quantum = Fraction(2) ** (max(exponent, min_exponent) - (digits - 1))
    scaled = magnitude / quantum
    whole, rest = divmod(scaled.numerator, scaled.denominator)
    if 2 * rest > scaled.denominator or (2 * rest == scaled.denominator and whole % 2 == 1):
        whole += 1
    rounded = whole * quantum
    if rounded > largest(name):
        return math.nan if no_inf else math.copysign(math.inf, sign)
    return math.copysign(float(rounded), sign)


def numbers_of(name: str) -> np.ndarray:
    """Positive numbers of the format spread over its range: every binade's first, second
    and last numbers, subnormals, the largest."""
    digits, min_exponent, max_exponent = FORMATS[name]
    out = []
    for exponent in range(min_exponent - digits + 1, max_exponent + 1):
        base = 2.0**exponent
        step = 2.0 ** (max(exponent, min_exponent) - digits + 1)
        out += [base, base + step, 2 * base - step, base + 3 * step]
    return np.unique(np.array(out))


def hard_cases(name: str) -> np.ndarray:
    """Ties between neighbours of the format and the float64 values around them."""
    values = numbers_of(name)
    digits, min_exponent, _ = FORMATS[name]
    _, exponent = np.frexp(values)
    spacing = np.ldexp(1.0, np.maximum(exponent - 1, min_exponent) - digits + 1)
    ties = values + spacing / 2
    cases = [values, ties,
             np.nextafter(ties, np.inf), np.nextafter(ties, -np.inf),
             ties * (1 + 2.0**-40), ties * (1 - 2.0**-40),
             values * (1 + 2.0**-40), values * (1 - 2.0**-40),
             spacing / 4, spacing * 0.75]
    magnitudes = np.concatenate(cases)
    magnitudes = magnitudes[np.isfinite(magnitudes) & (magnitudes < 1e300)]
    return np.concatenate([magnitudes, -magnitudes])


def overflow_cases(name: str) -> np.ndarray:
    digits, _, max_exponent = FORMATS[name]
    top = float(largest(name))
    # max + half an ulp: a tie, to inf (to 448 in float8_e4m3fn, whose 448 is even)
    threshold = top + 2.0 ** (max_exponent - digits)
    near = [top, threshold, np.nextafter(threshold, 0), np.nextafter(threshold, np.inf),
            threshold * (1 - 2.0**-40), threshold * (1 + 2.0**-40), 2 * top, 1e300,
            np.finfo(np.float64).max]
    return np.array(near + [-v for v in near])


def specials() -> np.ndarray:
    tiny = np.finfo(np.float64).smallest_subnormal
    return np.array([0.0, -0.0, np.inf, -np.inf, tiny, -tiny, 1e-300, -1e-300])


def random_float64(count: int, seed: int) -> np.ndarray:
    """Random significands at random exponents over the 16-bit formats' range and beyond."""
    rng = np.random.default_rng(seed)
    significands = rng.uniform(1.0, 2.0, count)
    exponents = rng.integers(-140, 130, count)
    signs = rng.choice([-1.0, 1.0], count)
    return signs * np.ldexp(significands, exponents)


def assert_rounds_correctly(values: np.ndarray, name: str, rounded: np.ndarray) -> None:
    with np.errstate(invalid="ignore"):  # ml_dtypes warns converting its NaN
        got = np.asarray(rounded).astype(np.float64)
    for value, result in zip(values.tolist(), got.tolist(), strict=True):
        expected = exact_round(value, name)
        if math.isnan(expected):
            assert math.isnan(result), f"{value!r} rounded to {result!r}, not NaN"
            continue
        assert result == expected and math.copysign(1, result) == math.copysign(1, expected), (
            f"{value!r} ({float(value).hex()}) rounded to {result!r}, not {expected!r}")


# -- the case ----------------------------------------------------------------------


def test_the_reported_double_rounding_is_gone() -> None:
    x = np.array([1 + 2.0**-8 + 2.0**-40, 0.0])
    assert Precision("bfloat16").round(x).astype(np.float64).tolist() == [1.0078125, 0.0]
    assert exact_round(1 + 2.0**-8 + 2.0**-40, "bfloat16") == 1.0078125


def test_ml_dtypes_float64_to_bfloat16_rounds_twice() -> None:
    """What the README says of ml_dtypes: its float64 -> bfloat16 cast goes through float32
    (1 + 2**-8 + 2**-40 becomes the tie 1 + 2**-8 in float32, then 1.0)."""
    x = np.array([1 + 2.0**-8 + 2.0**-40])
    assert x.astype(ml_dtypes.bfloat16).astype(np.float64).tolist() == [1.0]


# -- float64 inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32"])
def test_float64_inputs_round_once(name: str) -> None:
    """bfloat16 through float32 rounded to odd; float16 by numpy's own conversion (shown here
    to round once); float32 by numpy's."""
    values = np.concatenate([hard_cases(name), overflow_cases(name), specials(),
                             random_float64(20_000, seed=5)])
    assert_rounds_correctly(values, name, Precision(name).round(values))


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_float64_nan_stays_nan(name: str) -> None:
    out = Precision(name).round(np.array([np.nan, -np.nan, 1.0]))
    assert np.isnan(out.astype(np.float64)[:2]).all()


def test_float64_scalar_rounds_like_an_array() -> None:
    value = np.float64(1 + 2.0**-8 + 2.0**-40)
    assert float(Precision("bfloat16").round(value)) == 1.0078125


# -- narrower float inputs -------------------------------------------------------------------


def test_float32_inputs_to_bfloat16_round_once() -> None:
    values = np.concatenate([hard_cases("bfloat16"), random_float64(20_000, seed=6)])
    values = values[np.abs(values) < 3e38].astype(np.float32)  # the cases in float32
    assert_rounds_correctly(values.astype(np.float64), "bfloat16",
                            Precision("bfloat16").round(values))


def test_float32_inputs_to_float16_round_once() -> None:
    values = np.concatenate([hard_cases("float16"), random_float64(20_000, seed=7) * 1e-30])
    values = values[np.abs(values) < 3e38].astype(np.float32)
    assert_rounds_correctly(values.astype(np.float64), "float16",
                            Precision("float16").round(values))


def test_every_float16_to_bfloat16_and_every_bfloat16_to_float16() -> None:
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    half = patterns.view(np.float16)
    half = half[np.isfinite(half)]
    assert_rounds_correctly(half.astype(np.float64), "bfloat16", Precision("bfloat16").round(half))
    brain = patterns.view(ml_dtypes.bfloat16)
    with np.errstate(invalid="ignore"):  # the NaN patterns, dropped here
        magnitude = np.abs(brain.astype(np.float64))
    # beyond these every bfloat16 is 0 or inf in float16 (a few of those stay as checks)
    brain = brain[(magnitude < 2.0**17) & ((magnitude > 2.0**-26) | (magnitude == 0))]
    assert_rounds_correctly(brain.astype(np.float64), "float16", Precision("float16").round(brain))


def test_inputs_already_in_d_are_unchanged() -> None:
    brain = np.array([1.0078125, -3.0, 2496.0], dtype=ml_dtypes.bfloat16)
    assert Precision("bfloat16").round(brain).tolist() == brain.tolist()


# -- integer inputs --------------------------------------------------------------------------


def integer_cases() -> list[int]:
    """Integers at and around ties of the 16-bit formats and float32, up to int64's range
    (beyond 2**53, where float64 itself rounds)."""
    out = []
    for power in (12, 20, 25, 40, 53, 54, 60, 62):
        for digits in (8, 11, 24, 53):
            base = 2**power
            half = 2 ** (power - digits) if power >= digits else 0
            for offset in (0, 1, -1, half, half + 1, half - 1, 3 * half, 3 * half + 1):
                for value in (base + offset, -(base + offset)):
                    if -(2**63) <= value < 2**63:
                        out.append(value)
    return out


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32", "float64"])
def test_integer_inputs_round_once(name: str) -> None:
    ints = integer_cases()
    got = Precision(name).round(np.array(ints, dtype=np.int64)).astype(np.float64)
    for value, result in zip(ints, got.tolist(), strict=True):
        assert result == exact_round(value, name), f"{value} rounded to {result!r}"


def test_unsigned_integers_near_the_top_of_uint64() -> None:
    ints = [2**64 - 1, 2**63 + 2**55 + 1, 2**63 + 2**55, 2**63 + 2**54 + 1, 7]
    got = Precision("bfloat16").round(np.array(ints, dtype=np.uint64)).astype(np.float64)
    assert got.tolist() == [exact_round(v, "bfloat16") for v in ints]


# -- through the evaluator: the rounded reference and the bfloat16 losses -------------------


def test_the_rounded_reference_and_bfloat16_losses_of_the_reported_row() -> None:
    """``[1 + 2**-8 + 2**-40, 0]``, label 1: bfloat16 holds ``[1.0078125, 0]``, so the loss of
    the rounded inputs is ``log(1 + e**1.0078125)`` (mpmath), and the stable pipeline's
    bfloat16 loss is that value rounded to bfloat16 (its float32 steps err far below a
    bfloat16 ulp here)."""
    import mpmath

    from xentcheck.case import Case, LossSpec
    from xentcheck.evaluator import evaluate
    from xentcheck.pipelines import select

    x = np.array([[1 + 2.0**-8 + 2.0**-40, 0.0]])
    case = Case("t", x, np.array([1]), "index", LossSpec())
    result = evaluate(case, [Precision("bfloat16")], select("softmax", True, ["stable"]))
    with mpmath.workdps(40):  # not mpmath's global precision: later tests rely on theirs
        rounded_truth = mpmath.log(1 + mpmath.exp(mpmath.mpf(1.0078125)))
    assert result.reference.rounded["bfloat16"] == pytest.approx(float(rounded_truth),
                                                                 rel=4 * 2.0**-53)
    # the double-rounded input 1.0 would give log(1 + e) = 1.3133, a bfloat16 ulp lower
    stable = result.findings[0]
    assert stable.loss == exact_round(float(rounded_truth), "bfloat16") == 1.3203125


# -- the 8-bit formats ------------------------------------------------------------------------


def random_fp8_range(count: int, seed: int) -> np.ndarray:
    """Random significands at exponents over the 8-bit formats' range and a little beyond."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(1.0, 2.0, count) * np.exp2(rng.integers(-20, 18, count))
    return rng.choice([-1.0, 1.0], count) * values


def test_the_largest_numbers_and_thresholds_of_the_8_bit_formats() -> None:
    """448 and 57344 (ml_dtypes' finfo agrees with the OCP table); float8_e4m3fn: 464 is a
    tie and rounds to the even 448, anything above becomes NaN; float8_e5m2: 61440 is a
    tie and rounds to inf, anything below to 57344."""
    e4m3, e5m2 = Precision("float8_e4m3fn"), Precision("float8_e5m2")
    assert (e4m3.max, e5m2.max) == (float(largest("float8_e4m3fn")), float(largest("float8_e5m2")))
    assert (e4m3.max, e5m2.max) == (448.0, 57344.0)
    assert (e4m3.has_inf, e5m2.has_inf) == (False, True)
    below, above = np.nextafter(464.0, 0.0), np.nextafter(464.0, np.inf)
    got = e4m3.round(np.array([464.0, below, above, -above, np.inf, -np.inf])).astype(np.float32)
    assert got[:2].tolist() == [448.0, 448.0] and np.isnan(got[2:]).all()
    got = e5m2.round(np.array([61440.0, np.nextafter(61440.0, 0.0), -61440.0, np.inf]))
    assert got.astype(np.float32).tolist() == [np.inf, 57344.0, -np.inf, np.inf]


@pytest.mark.parametrize("name", FP8)
def test_ml_dtypes_float64_to_fp8_rounds_twice(name: str) -> None:
    """Why float64 goes through float32 rounded to odd: ml_dtypes' own cast rounds to float32
    first, so a value just above a tie of the 8-bit format lands on the tie, then on the
    even neighbour below."""
    digits = FORMATS[name][0]
    tie_above = 1 + 2.0**-digits + 2.0**-40
    assert np.array([tie_above]).astype(Precision(name).dtype).astype(float).tolist() == [1.0]
    assert exact_round(tie_above, name) == 1 + 2.0 ** (1 - digits)
    assert Precision(name).round(np.array([tie_above])).astype(float).tolist() == [
        1 + 2.0 ** (1 - digits)]


@pytest.mark.parametrize("name", FP8)
def test_float64_inputs_round_once_to_fp8(name: str) -> None:
    values = np.concatenate([hard_cases(name), overflow_cases(name), specials(),
                             random_fp8_range(20_000, seed=11)])
    assert_rounds_correctly(values, name, Precision(name).round(values))


@pytest.mark.parametrize("name", FP8)
def test_float32_inputs_round_once_to_fp8(name: str) -> None:
    values = np.concatenate([hard_cases(name), overflow_cases(name),
                             random_fp8_range(20_000, seed=12)])
    values = values[np.abs(values) < 3e38].astype(np.float32)
    # the float32 neighbours of every tie (the float64 ones above collapse onto the tie)
    ties = values[np.isfinite(values)]
    values = np.concatenate([values, np.nextafter(ties, np.float32(np.inf)),
                             np.nextafter(ties, np.float32(-np.inf)),
                             np.array([np.inf, -np.inf], dtype=np.float32)])
    assert_rounds_correctly(values.astype(np.float64), name, Precision(name).round(values))


@pytest.mark.parametrize("name", FP8)
def test_every_float16_and_every_bfloat16_to_fp8(name: str) -> None:
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    for source in (np.float16, ml_dtypes.bfloat16):
        values = patterns.view(source)
        with np.errstate(invalid="ignore"):
            values = values[~np.isnan(values.astype(np.float32))]
        assert_rounds_correctly(values.astype(np.float64), name, Precision(name).round(values))


@pytest.mark.parametrize("name", FP8)
def test_every_fp8_value_to_every_format(name: str) -> None:
    """All 256 patterns (NaN ones aside) into the other 8-bit format and the wider ones."""
    values = np.arange(256, dtype=np.uint8).view(Precision(name).dtype)
    with np.errstate(invalid="ignore"):
        values = values[~np.isnan(values.astype(np.float32))]
    for target in ["float8_e4m3fn", "float8_e5m2", "float16", "bfloat16", "float32"]:
        assert_rounds_correctly(values.astype(np.float64), target, Precision(target).round(values))


@pytest.mark.parametrize("name", FP8)
def test_integer_inputs_round_once_to_fp8(name: str) -> None:
    ints = integer_cases() + [v for k in range(12) for v in (2**k + 2**max(0, k - 4),
                                                            2**k + 2**max(0, k - 4) + 1)]
    ints += [448, 463, 464, 465, 479, 480, 57343, 61439, 61440, 61441]
    ints += [-v for v in ints]
    got = Precision(name).round(np.array(ints, dtype=np.int64))
    assert_rounds_correctly(np.array(ints, dtype=object), name, got)


@pytest.mark.parametrize("name", FP8)
def test_fp8_nan_stays_nan(name: str) -> None:
    out = Precision(name).round(np.array([np.nan, -np.nan, 1.0]))
    with np.errstate(invalid="ignore"):
        assert np.isnan(out.astype(np.float64)[:2]).all()
