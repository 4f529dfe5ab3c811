"""Limits found by bisection against closed forms derived from the formats' parameters."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from xentcheck.case import Case, LossSpec
from xentcheck.execution import run_pipeline
from xentcheck.limit_closed_forms import closed_form_limit
from xentcheck.limit_closed_forms import worst_target as _worst_target
from xentcheck.limits import find_limit, pipeline_limit
from xentcheck.pipelines import textbook
from xentcheck.precision import Precision

# (largest finite, smallest subnormal, stored significand bits), from the IEEE formats
# (bfloat16: float32's exponent with 7 stored bits) and the OCP 8-bit formats (e4m3fn: bias
# 7, no infinity, 0x7F is NaN so its largest is 1.75 * 2**8; e5m2: IEEE-like, bias 15).
FORMATS = {
    "float16": ((2 - 2**-10) * 2.0**15, 2.0**-24, 10),
    "bfloat16": ((2 - 2**-7) * 2.0**127, 2.0**-133, 7),
    "float32": ((2 - 2**-23) * 2.0**127, 2.0**-149, 23),
    "float64": ((2 - 2**-52) * 2.0**1023, 2.0**-1074, 52),
    "float8_e4m3fn": (1.75 * 2.0**8, 2.0**-9, 3),
    "float8_e5m2": ((2 - 2**-2) * 2.0**15, 2.0**-16, 2),
}
DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32,
          "float64": np.float64, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
          "float8_e5m2": ml_dtypes.float8_e5m2}
UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
# float8_e4m3fn's sum of more than 464 ones is NaN: C equal logits have no safe value there
WIDE_SUM = [d for d in FORMATS if d != "float8_e4m3fn"]


def pairs(classes: list[int]) -> list[tuple[str, int]]:
    """(dtype, C) for every format while 1/C is above the smallest subnormal u: from about
    1 / u classes on (512 in float8_e4m3fn, 65536 in float8_e5m2) the probability 1/C of C
    equal logits is near u / 2 and rounds to 0 at some levels and not at others (see
    test_float8_e4m3fn_naive_probability_of_1000_equal_logits_rounds_to_zero)."""
    return [(d, c) for d in FORMATS for c in classes if c * FORMATS[d][1] < 1]


def pipeline(family: str, name: str):  # type: ignore[no-untyped-def]
    return next(p for p in textbook(family, True) if p.name == name)


def next_up(value: float, dtype: str) -> float:
    bits = UNSIGNED[np.dtype(DTYPES[dtype]).itemsize]
    b = np.array(value, dtype=DTYPES[dtype]).view(bits) + bits(1)
    return float(np.array(b).view(DTYPES[dtype]).astype(np.float64))


def ln_overflow_threshold(dtype: str) -> float:
    """ln of where rounding overflows (to inf, or NaN in float8_e4m3fn): max + half an ulp,
    ``(2 - 2^-(p+1)) 2^emax`` for the IEEE formats, 448 + 16 = 464 for float8_e4m3fn."""
    top, _, p = FORMATS[dtype]
    emax = math.frexp(top)[1] - 1
    return math.log(top / 2.0**emax + 2.0 ** -(p + 1)) + emax * math.log(2)


def slack(dtype: str, classes: int) -> float:
    """How far roundings may move the edge: exp's rounding to D and the sum's (in float32
    for 16-bit D) each perturb e^L relatively, which moves ln by the same amount."""
    _, _, p = FORMATS[dtype]
    acc_bits = 23 if p < 23 else p
    return 2 * 2.0**-p + classes * 2.0**-acc_bits


@pytest.mark.parametrize(("dtype", "classes"), pairs([1, 2, 3, 10, 300, 1000]))
def test_naive_softmax_largest_safe_logit(dtype: str, classes: int) -> None:
    limit = pipeline_limit(pipeline("softmax", "naive"), Precision(dtype), classes)
    edge = ln_overflow_threshold(dtype) - math.log(classes)
    found = limit.largest_safe_logit
    assert found is not None
    # the edge lies between the last safe value of D and the next one up, up to rounding
    assert found <= edge + slack(dtype, classes) * 2
    assert next_up(found, dtype) >= edge - slack(dtype, classes) * 2


@pytest.mark.parametrize("dtype", list(FORMATS))
def test_the_edge_is_real(dtype: str) -> None:
    # Finite at the limit, not finite one value of D above it (C = 3, all logits equal).
    naive = pipeline("softmax", "naive")
    found = pipeline_limit(naive, Precision(dtype), 3).largest_safe_logit
    assert found is not None
    x = np.array([[found] * 3, [next_up(found, dtype)] * 3])
    case = Case("edge", x, np.zeros(2, dtype=np.int64), "index", LossSpec(reduction="none"))
    loss, _, _ = run_pipeline(naive, Precision(dtype), case)
    finite = np.isfinite(np.asarray(loss, dtype=np.float64))
    assert finite.tolist() == [True, False]


@pytest.mark.parametrize("dtype", WIDE_SUM)
@pytest.mark.parametrize("name", ["shifted", "stable"])
def test_shifted_and_stable_never_overflow_below_the_format(name: str, dtype: str) -> None:
    limit = pipeline_limit(pipeline("softmax", name), Precision(dtype), 1000)
    assert limit.largest_safe_logit == FORMATS[dtype][0]


@pytest.mark.parametrize("dtype", list(FORMATS))
def test_spread_edge_two_and_three_classes(dtype: str) -> None:
    _, tiny_sub, _ = FORMATS[dtype]
    p = pipeline("softmax", "shifted")
    # C = 2: p_t = round(e^-S) is non-zero while e^-S > half the smallest subnormal.
    two = pipeline_limit(p, Precision(dtype), 2).largest_safe_spread
    edge2 = math.log(2) - math.log(tiny_sub)
    # C = 3: p_t = round(e_t / 2) with e_t a multiple of the smallest subnormal; e_t = 1
    # subnormal gives exactly half a subnormal, a tie that rounds to even (0), so e_t must
    # round to 2 subnormals: e^-S >= 1.5 subnormals.
    three = pipeline_limit(p, Precision(dtype), 3).largest_safe_spread
    edge3 = -math.log(1.5) - math.log(tiny_sub)
    for found, edge in ((two, edge2), (three, edge3)):
        assert found is not None
        tol = 4 * 2.0**-23 * edge  # exp evaluated in float32 (or D) before rounding
        assert found <= edge + tol
        assert next_up(found, dtype) >= edge - tol


@pytest.mark.parametrize("dtype", list(FORMATS))
def test_stable_softmax_spread_is_the_format_range(dtype: str) -> None:
    limit = pipeline_limit(pipeline("softmax", "stable"), Precision(dtype), 3)
    assert limit.largest_safe_spread == FORMATS[dtype][0]


@pytest.mark.parametrize("dtype", list(FORMATS))
def test_naive_sigmoid_edge(dtype: str) -> None:
    # 1 + e^-x rounds to 1 once e^-x <= 2^-(p+1) (half an ulp of 1; the tie goes to even),
    # then 1 - s = 0 and log(1 - s) = -inf for a zero target: x < (p + 1) ln 2.
    # e = round(e^-x) is at most 2^-(p+1) while e^-x is below 2^-(p+1) plus half the
    # spacing above it, 2^-(2p+2) (the tie rounds to the even power of two): so
    # x < (p + 1) ln 2 - ln(1 + 2^-(p+1)), a correction that moves the 8-bit formats' edge
    # by more than their grid's step.
    _, _, p = FORMATS[dtype]
    edge = (p + 1) * math.log(2) - math.log(1 + 2.0 ** -(p + 1))
    found = pipeline_limit(pipeline("sigmoid", "naive"), Precision(dtype), 1).largest_safe_logit
    assert found is not None
    tol = 4 * 2.0**-23 * edge
    assert found <= edge + tol
    assert next_up(found, dtype) >= edge - tol
    stable = pipeline_limit(pipeline("sigmoid", "stable"), Precision(dtype), 1)
    assert stable.largest_safe_logit == FORMATS[dtype][0]


def next_down(value: float, dtype: str) -> float:
    return -next_up(-value, dtype)


def rows_finite(name: str, family: str, dtype: str, logits: list[list[float]],
                labels: list[list[float]] | list[int]) -> list[bool]:
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    kind = "binary" if family == "sigmoid" else "index"
    case = Case("edge", x, y, kind, LossSpec(family=family, reduction="none"))  # type: ignore[arg-type]
    _, per_example, _ = run_pipeline(pipeline(family, name), Precision(dtype), case)
    values = np.asarray(per_example, dtype=np.float64).reshape(len(x), -1)
    return [bool(v) for v in np.isfinite(values).all(axis=-1)]


LLM_SIZES = [65519, 65520, 65521, 128256, 262144]


@pytest.mark.parametrize("classes", LLM_SIZES)
def test_naive_softmax_edge_at_vocabulary_sizes_in_float16(classes: int) -> None:
    # C equal logits L: the float16 sum of C copies of e^L is inf once C e^L reaches
    # 65504 + 16, so the edge is ln(65520 / C): 0 at C = 65520, where the sum of C ones
    # is already inf, so the last safe value is negative from there on.
    found = pipeline_limit(pipeline("softmax", "naive"), Precision("float16"), classes)
    edge = ln_overflow_threshold("float16") - math.log(classes)
    assert found.largest_safe_logit is not None and not found.no_safe_logit
    assert (found.largest_safe_logit < 0) == (classes >= 65520)
    # float16's spacing near the edge, and float32's rounding of exp and of the sum
    tol = 2 * 2.0**-10 + 8 * 2.0**-23 * classes ** 0.5
    assert found.largest_safe_logit <= edge + tol
    assert next_up(found.largest_safe_logit, "float16") >= edge - tol


@pytest.mark.parametrize("classes", LLM_SIZES)
def test_float16_sum_of_ones_decides_whether_shifted_and_stable_have_an_edge(
        classes: int) -> None:
    # numpy's own rounding of the exact sums: 65519 -> 65504, 65520 -> inf (the tie at
    # 65504 + 16 goes to the even 65536, past the format)
    with np.errstate(over="ignore"):
        all_equal_inf = bool(np.isinf(np.float32(classes).astype(np.float16)))
        others_inf = bool(np.isinf(np.float32(classes - 1).astype(np.float16)))
    assert all_equal_inf == (classes >= 65520) and others_inf == (classes >= 65521)
    for name in ("shifted", "stable"):
        found = pipeline_limit(pipeline("softmax", name), Precision("float16"), classes)
        assert found.no_safe_logit == all_equal_inf
        if all_equal_inf:
            assert found.largest_safe_logit is None and found.smallest_safe_logit is None
        else:
            assert found.largest_safe_logit == 65504.0 and found.smallest_safe_logit == -65504.0
        assert found.no_safe_spread == others_inf
        assert (found.largest_safe_spread is None) == others_inf
    # and the pipelines agree: C equal logits are not finite at any magnitude
    if all_equal_inf:
        assert rows_finite("stable", "softmax", "float16",
                           [[v] * classes for v in (-60000.0, 0.0, 60000.0)],
                           [0, 0, 0]) == [False] * 3


def test_spread_edge_at_65520_float16_classes() -> None:
    # The other 65519 ones sum to 65504 in float16; e^-S / 65504 must stay above half the
    # smallest subnormal 2^-24, so S < 25 ln 2 - ln 65504 = 6.2388.
    edge = 25 * math.log(2) - math.log(65504)
    found = pipeline_limit(pipeline("softmax", "shifted"), Precision("float16"), 65520)
    assert found.largest_safe_spread is not None
    assert found.largest_safe_spread <= edge < next_up(found.largest_safe_spread, "float16")
    assert round(found.largest_safe_spread, 3) == 6.238
    naive = pipeline_limit(pipeline("softmax", "naive"), Precision("float16"), 65520)
    assert naive.largest_safe_spread is not None
    assert naive.largest_safe_spread < found.largest_safe_spread  # see below


def worst_target(dtype: str) -> float:
    """The largest value T of the format whose exp (in float32 for 16-bit formats, as the
    precision model computes it) rounds to the smallest subnormal u: e^T just under 1.5 u.
    Found with numpy and ml_dtypes over the format's values near ln(1.5 u)."""
    _, tiny_sub, _ = FORMATS[dtype]
    compute = np.float64 if dtype == "float64" else np.float32
    bits = UNSIGNED[np.dtype(DTYPES[dtype]).itemsize]

    def rounds_to_u(magnitude_bits: int) -> bool:  # exp(-t) rounded to the format is u
        t = np.array(magnitude_bits, dtype=bits).view(DTYPES[dtype]).astype(np.float64)
        with np.errstate(under="ignore"):
            e = np.exp(-t.astype(compute)).astype(DTYPES[dtype]).astype(np.float64)
        return bool(e == tiny_sub)

    def magnitude_bits(t: float) -> int:
        return int(np.array(t, dtype=DTYPES[dtype]).view(bits))

    # bisect on the bit patterns of |T| (ordered like the magnitudes): below ln(1 / (2 u))
    # exp rounds to 2 u or more, at ln(1 / u) to u
    small, large = magnitude_bits(-math.log(2 * tiny_sub)), magnitude_bits(-math.log(tiny_sub))
    assert not rounds_to_u(small) and rounds_to_u(large)
    while large - small > 1:
        middle = (small + large) // 2
        small, large = (small, middle) if rounds_to_u(middle) else (middle, large)
    return -float(np.array(large, dtype=bits).view(DTYPES[dtype]).astype(np.float64))


def round_down(value: float, dtype: str) -> float:
    """The largest value of the format at most ``value``."""
    near = float(np.array(value).astype(DTYPES[dtype]).astype(np.float64))
    return near if near <= value else next_down(near, dtype)


def test_no_float8_e5m2_value_has_an_exp_rounding_to_the_smallest_subnormal() -> None:
    # float8_e5m2's values around ln(1.5 u) = -10.68 are 2 apart: e^-10 = 2.98 u rounds to
    # 3 u, e^-12 = 0.40 u to 0. The naive spread is then the others-at-0 one, shifted's.
    u = 2.0**-16
    e = np.exp(np.array([-10.0, -12.0], dtype=np.float32)).astype(ml_dtypes.float8_e5m2)
    assert e.astype(np.float64).tolist() == [3 * u, 0.0]
    assert _worst_target(Precision("float8_e5m2")) is None
    for classes in (2, 3, 300):
        naive, shifted = (pipeline_limit(pipeline("softmax", name), Precision("float8_e5m2"),
                                         classes) for name in ("naive", "shifted"))
        assert naive.largest_safe_spread == shifted.largest_safe_spread


# float8_e5m2 has no worst level (test above); in float8_e4m3fn at C = 300 the others' level
# M = ln(2 / 299) = -5.0 lies on a grid 0.5 apart, coarser than the spread's near 1 (0.125),
# so the next spread up lands on the same M and the others-at-0 pattern binds instead.
@pytest.mark.parametrize(("dtype", "classes"), [
    (d, c) for d in FORMATS for c in (2, 3, 300)
    if d != "float8_e5m2" and (d, c) != ("float8_e4m3fn", 300)])
def test_naive_spread_edge_is_taken_at_the_worst_level(dtype: str, classes: int) -> None:
    # Naive softmax does not shift: with the target at T (e^T rounds down to u from almost
    # 1.5 u) and the other C - 1 at M = T + S, p = u / ((C - 1) e^M) must exceed u / 2, so
    # M < ln(2 / (C - 1)) and S < ln(2 / (C - 1)) - T: up to ln 1.5 less than with the
    # others at 0. ([1, -102.97] in float32 has p = 0 at a spread of 103.97.)
    t = worst_target(dtype)
    found = pipeline_limit(pipeline("softmax", "naive"), Precision(dtype), classes)
    assert found.largest_safe_spread is not None
    edge = math.log(2 / (classes - 1)) - t
    # M lies on D's grid (spacing up to 2^-p |M| + the subnormal rounding of e^M)
    _, _, p = FORMATS[dtype]
    tol = 2 * 2.0**-p * (abs(math.log(2 / (classes - 1))) + 1) + 2.0**-p * edge
    assert abs(found.largest_safe_spread - edge) <= tol
    # inputs at the worst level: the highest others within the edge are finite, within
    # the next spread up they are not
    within = round_down(t + found.largest_safe_spread, dtype)
    beyond = round_down(t + next_up(found.largest_safe_spread, dtype), dtype)
    assert rows_finite("naive", "softmax", dtype, [[t] + [within] * (classes - 1),
                                                   [t] + [beyond] * (classes - 1)],
                       [0, 0]) == [True, False]


@pytest.mark.parametrize(("dtype", "classes"), pairs([1, 3, 300, 1000, 128256]))
def test_naive_softmax_lower_edge(dtype: str, classes: int) -> None:
    # exp (in float32 for 16-bit formats) rounds to 0 in D once e^L <= u / 2, u the
    # smallest subnormal; then every probability is 0/0.
    _, tiny_sub, _ = FORMATS[dtype]
    edge = math.log(tiny_sub) - math.log(2)
    found = pipeline_limit(pipeline("softmax", "naive"), Precision(dtype), classes)
    low = found.smallest_safe_logit
    assert low is not None
    tol = 4 * 2.0 ** -(52 if dtype == "float64" else 23) * abs(edge)
    assert low >= edge - tol
    assert next_down(low, dtype) <= edge + tol
    if classes <= 1000:  # the edge is real: finite at it, NaN one value of D below
        finite = rows_finite("naive", "softmax", dtype,
                             [[low] * classes, [next_down(low, dtype)] * classes], [0, 0])
        assert finite == [True, False]


@pytest.mark.parametrize("dtype", list(FORMATS))
def test_naive_sigmoid_lower_edge(dtype: str) -> None:
    # x = -L: exp(-x) = e^L overflows at ln(max + ulp/2); then s = 1/inf = 0, and the
    # loss is inf (target 1) or 0 * log 0 = NaN (target 0).
    edge = -ln_overflow_threshold(dtype)
    found = pipeline_limit(pipeline("sigmoid", "naive"), Precision(dtype), 1)
    low = found.smallest_safe_logit
    assert low is not None
    tol = 4 * 2.0 ** -(52 if dtype == "float64" else 23) * abs(edge)
    assert low >= edge - tol
    assert next_down(low, dtype) <= edge + tol
    assert rows_finite("naive", "sigmoid", dtype, [[low, low], [next_down(low, dtype)] * 2],
                       [[0.0, 1.0], [0.0, 1.0]]) == [True, False]
    stable = pipeline_limit(pipeline("sigmoid", "stable"), Precision(dtype), 1)
    assert stable.smallest_safe_logit == -FORMATS[dtype][0]


@pytest.mark.parametrize(("dtype", "classes"), pairs([1, 2, 3, 300, 1000]))
def test_search_from_the_closed_form_finds_what_full_bisection_finds(
        dtype: str, classes: int) -> None:
    for family in ("softmax", "sigmoid"):
        for p in textbook(family, True):
            bracketed = find_limit(p, Precision(dtype), classes)
            full = find_limit(p, Precision(dtype), classes, from_closed_form=False)
            assert bracketed == full, (p.family, p.name)


def test_search_without_closed_form_finds_absent_edges() -> None:
    for name in ("naive", "stable"):
        p = pipeline("softmax", name)
        assert find_limit(p, Precision("float16"), 65521, from_closed_form=False) == \
            find_limit(p, Precision("float16"), 65521)


def test_label_smoothing_spread_edge_is_where_the_sum_of_log_probabilities_overflows() -> None:
    # stable, float16, C = 1000, smoothing: for [0, -S, ..., -S] the smoothing term sums
    # 999 log-probabilities of about -S each (accumulated in float32, rounded to float16),
    # inf once 999 S reaches 65520; one logit S below the others never overflows below the
    # format's range.
    stable = pipeline("softmax", "stable")
    found = find_limit(stable, Precision("float16"), 1000, 0.1)
    spread = found.largest_safe_spread
    assert spread is not None
    assert 999 * spread < 65520 <= 999 * next_up(spread, "float16") + math.log(1000)
    assert find_limit(stable, Precision("float16"), 1000).largest_safe_spread == 65504.0
    # C ln C for C equal logits: 7000 ln 7000 = 61974 fits, 7500 ln 7500 = 66848 does not
    assert not find_limit(stable, Precision("float16"), 7000, 0.1).no_safe_logit
    assert find_limit(stable, Precision("float16"), 7500, 0.1).no_safe_logit


def test_float8_e4m3fn_naive_probability_of_1000_equal_logits_rounds_to_zero() -> None:
    # C = 1000 logits of -1: e = round(e^-1 = 0.3679) = 0.375 (spacing 2^-5 in [0.25, 0.5)),
    # their float32 sum 375 rounds to 384 (spacing 32 in [256, 448]), and 0.375 / 384 =
    # 2^-10 is half the smallest subnormal 2^-9: a tie, to the even 0. log(0) is -inf, which
    # float8_e4m3fn has not: NaN, reported as the pole it is.
    e = float(np.float32(np.exp(np.float32(-1.0))).astype(ml_dtypes.float8_e4m3fn))
    assert e == 0.375 and 1000 * e == 375.0
    assert float(np.float32(375.0).astype(ml_dtypes.float8_e4m3fn)) == 384.0
    assert 0.375 / 384 == 2.0**-10 == FORMATS["float8_e4m3fn"][1] / 2
    x = np.full((1, 1000), -1.0)
    case = Case("tie", x, np.zeros(1, dtype=np.int64), "index", LossSpec(reduction="none"))
    _, per_example, run = run_pipeline(pipeline("softmax", "naive"),
                                       Precision("float8_e4m3fn"), case)
    assert np.isnan(np.asarray(per_example, dtype=np.float64)).all()
    assert [(e.stage, e.kind) for e in run.events] == [("divide", "underflow"),
                                                        ("log", "log_of_zero")]


@pytest.mark.parametrize(("classes", "safe"), [(464, True), (465, False)])
def test_float8_e4m3fn_sum_of_ones_decides_whether_stable_has_a_logit_edge(
        classes: int, safe: bool) -> None:
    # 464 ones sum to 464 in float32, a tie between 448 and the NaN above: the even 448. 465
    # is past it: NaN. So C equal logits are safe at every magnitude up to C = 464 classes
    # and at none from 465 on: stable and shifted in float8_e4m3fn break on an LM row of
    # equal logits whatever their value.
    assert float(np.float32(464).astype(ml_dtypes.float8_e4m3fn)) == 448.0
    assert np.isnan(float(np.float32(465).astype(ml_dtypes.float8_e4m3fn)))
    for name in ("shifted", "stable"):
        found = pipeline_limit(pipeline("softmax", name), Precision("float8_e4m3fn"), classes)
        assert found.no_safe_logit == (not safe)
        assert found.largest_safe_logit == (448.0 if safe else None)
        assert rows_finite(name, "softmax", "float8_e4m3fn", [[v] * classes for v in
                                                              (-448.0, 0.0, 448.0)],
                           [0, 0, 0]) == [safe] * 3


@pytest.mark.parametrize("classes", [1100, 2000, 50257])
def test_float8_e4m3fn_naive_equal_logits_vanish_from_about_1024_classes(classes: int) -> None:
    # round(C e) >= C e (1 - 2^-4), so p = e / round(C e) <= 1 / (0.9375 C), which is at
    # most u / 2 = 2^-10 from C = 1093 on: p rounds to 0 at every level, log(0) is NaN in
    # e4m3fn. Closed form and bisection both say no value is safe.
    naive = pipeline("softmax", "naive")
    assert classes * 0.9375 * 2.0**-10 >= 1
    found = find_limit(naive, Precision("float8_e4m3fn"), classes)
    assert found.no_safe_logit and found.largest_safe_logit is None
    assert closed_form_limit(naive, Precision("float8_e4m3fn"), classes).no_safe_logit
    levels = [-6.5, -4.0, -2.0, -1.0, 0.0, 2.0]  # values of e4m3fn across its range
    assert rows_finite("naive", "softmax", "float8_e4m3fn", [[v] * classes for v in levels],
                       [0] * len(levels)) == [False] * len(levels)
