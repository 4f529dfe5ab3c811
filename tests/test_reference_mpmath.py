"""The reference against mpmath at 50 significant digits, straight from the definitions."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xentcheck import reference as ref

MPMATH_DPS = 50  # this module's tests run at it (conftest.py)


def mp_softmax(x: list[float], a: list[float]) -> mpmath.mpf:
    """sum_c a_c (log sum_j exp(x_j) - x_c)."""
    xs = [mpmath.mpf(v) for v in x]
    lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in xs))
    return mpmath.fsum(mpmath.mpf(ac) * (lse - xc) for ac, xc in zip(a, xs, strict=True) if ac)


def mp_probabilities(p: list[float], a: list[float]) -> mpmath.mpf:
    """sum_c a_c (log sum(p) - log p_c), with 0 log 0 = 0."""
    ps = [mpmath.mpf(v) for v in p]
    total = mpmath.fsum(ps)
    terms = []
    for ac, pc in zip(a, ps, strict=True):
        if ac:
            terms.append(mpmath.inf if pc == 0 else mpmath.mpf(ac) * mpmath.log(total / pc))
    return mpmath.fsum(terms)


def mp_sigmoid(x: float, z: float, pw: float = 1.0) -> mpmath.mpf:
    """-(pw z log s + (1 - z) log(1 - s)), s = 1 / (1 + exp(-x)), 1 - s = 1 / (1 + exp(x)).

    1 - s is written as sigmoid(-x): at 50 digits, 1 - 1/(1 + e^-1000) would be 0.
    """
    xm = mpmath.mpf(x)
    s = 1 / (1 + mpmath.exp(-xm))
    one_minus_s = 1 / (1 + mpmath.exp(xm))
    terms = []
    if z:
        terms.append(mpmath.mpf(pw) * mpmath.mpf(z) * mpmath.log(s))
    if z != 1:
        terms.append((1 - mpmath.mpf(z)) * mpmath.log(one_minus_s))
    return -mpmath.fsum(terms)


def ulps(got: float, true: mpmath.mpf) -> float:
    """|got - true| in units of float64's spacing at the true value."""
    t = float(true)
    if math.isinf(t):
        return 0.0 if got == t else math.inf
    spacing = float(np.spacing(abs(t))) if t else 5e-324
    return float(abs(mpmath.mpf(got) - true) / spacing)


def one_hot(classes: int, target: int, weight: float = 1.0) -> list[float]:
    return [weight if c == target else 0.0 for c in range(classes)]


def softmax_loss(x: list[float], a: list[float]) -> float:
    return float(ref.softmax_losses(np.array([x]), np.array([a]))[0])


def test_tiny_loss_keeps_every_digit() -> None:
    got = softmax_loss([0.0, -40.0], [1.0, 0.0])
    assert got == 4.2483542552915889e-18 or ulps(got, mp_softmax([0, -40], [1, 0])) <= 1
    assert ulps(got, mp_softmax([0.0, -40.0], [1.0, 0.0])) <= 1


def test_naive_overflow_case_is_exactly_500() -> None:
    assert softmax_loss([1000.0, 2000.0, 2500.0], one_hot(3, 1)) == 500.0


@pytest.mark.parametrize(("x", "target"), [
    ([1000.0, 1000.5], 0), ([1000.0, 1000.5], 1),  # a near-tie at large magnitude
    ([1000.0, 1.0], 1), ([1000.0, 1.0], 0),  # log_softmax([1000, 1])
    ([3.0, 3.0, 3.0], 2),  # ties
    ([1e-10, -1e-10], 0), ([700.0, -700.0, 0.0], 1), ([-745.0, 0.0], 0),
    ([0.1, 0.2, 0.3, 0.4, 0.5], 4), ([20.0, 0.0, -20.0], 0),
])
def test_integer_labels(x: list[float], target: int) -> None:
    a = one_hot(len(x), target)
    assert ulps(softmax_loss(x, a), mp_softmax(x, a)) <= 2


def test_single_class_loss_is_zero() -> None:
    assert softmax_loss([123.0], [1.0]) == 0.0


@pytest.mark.parametrize("a", [
    [0.2, 0.3, 0.5], [0.0, 0.0, 1.0], [0.7 * 2.0, 0.1 * 1.0, 0.2 * 0.5],  # soft, one-hot, weighted
    [0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3],  # label smoothing 0.1 on class 0
])
def test_dense_coefficients(a: list[float]) -> None:
    x = [2.5, -1.0, 0.25]
    assert ulps(softmax_loss(x, a), mp_softmax(x, a)) <= 2


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4, allow_subnormal=False), min_size=2, max_size=8),
    st.integers(0, 7),
    st.sampled_from([0.0, 1.0, 1e3, -3e3]),
    st.sampled_from([1.0, 1e-3, 50.0]),
)
def test_integer_labels_property(values: list[float], pick: int, offset: float,
                                 scale: float) -> None:
    # Scaled rows give ties, near-ties and wide spreads; offsets give large magnitudes.
    x = [offset + v * scale / 1e4 for v in values]
    a = one_hot(len(x), pick % len(x))
    assert ulps(softmax_loss(x, a), mp_softmax(x, a)) <= 4


@pytest.mark.parametrize(("p", "a"), [
    ([0.2, 0.3, 0.4], [0.0, 0.0, 1.0]),  # a row summing to 0.9
    ([0.05, 0.9, 0.3], [1.0, 0.0, 0.0]),  # a row summing to 1.25
    ([1.0 - 1e-12, 1e-12], [1.0, 0.0]),  # target probability near 1: tiny loss
    ([1.0, 1e-310], [0.0, 1.0]),  # a subnormal target probability: ratio overflows
    ([1e-310, 3e-310], [0.5, 0.5]),  # everything subnormal
    ([0.5, 0.5, 0.0], [0.5, 0.5, 0.0]),  # 0 log 0 = 0
])
def test_probability_inputs(p: list[float], a: list[float]) -> None:
    got = float(ref.softmax_probability_losses(np.array([p]), np.array([a]))[0])
    assert ulps(got, mp_probabilities(p, a)) <= 2


def test_probability_zero_under_a_label_is_infinite() -> None:
    got = ref.softmax_probability_losses(np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]]))
    assert got[0] == math.inf


@pytest.mark.parametrize("x", [-1000.0, -40.0, -1e-10, 0.0, 1e-10, 0.51, 40.0, 1000.0])
@pytest.mark.parametrize(("z", "pw"), [(0.0, 1.0), (1.0, 1.0), (0.3, 1.0), (1.0, 3.0), (0.7, 0.5)])
def test_sigmoid_logits(x: float, z: float, pw: float) -> None:
    got = float(ref.sigmoid_losses(np.array([x]), np.array([z]),
                                   None if pw == 1.0 else np.array(pw))[0])
    assert ulps(got, mp_sigmoid(x, z, pw)) <= 2


@pytest.mark.parametrize("p", [1e-300, 1e-7, 0.3, 0.5, 1 - 1e-7, 1 - 2**-53])
@pytest.mark.parametrize("z", [0.0, 1.0, 0.25])
def test_sigmoid_probabilities(p: float, z: float) -> None:
    got = float(ref.sigmoid_probability_losses(np.array([p]), np.array([z]))[0])
    pm, zm = mpmath.mpf(p), mpmath.mpf(z)
    true = -(zm * mpmath.log(pm) + (1 - zm) * mpmath.log1p(-pm))
    assert ulps(got, true) <= 2


def test_keras_published_binary_example() -> None:
    # keras.losses.BinaryCrossentropy(from_logits=True) docs: y_true [0, 1, 0, 0],
    # y_pred [-18.6, 0.51, 2.94, -12.8] gives 0.865 (to three places).
    x = np.array([-18.6, 0.51, 2.94, -12.8])
    z = np.array([0.0, 1.0, 0.0, 0.0])
    mean = ref.reduce(ref.sigmoid_losses(x, z), "mean", 4.0)
    assert round(mean, 3) == 0.865


def test_keras_published_categorical_example() -> None:
    # keras.losses.CategoricalCrossentropy docs: y_true [[0, 1, 0], [0, 0, 1]],
    # y_pred [[0.05, 0.95, 0], [0.1, 0.8, 0.1]] gives 1.177.
    p = np.array([[0.05, 0.95, 0.0], [0.1, 0.8, 0.1]])
    a = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    mean = ref.reduce(ref.softmax_probability_losses(p, a), "mean", 2.0)
    assert round(mean, 3) == 1.177


def test_reduce_against_mpmath() -> None:
    values = np.array([1e-18, 1.0, 1e16, 3.0, 2.0**-60])
    true = mpmath.fsum(mpmath.mpf(v) for v in values)
    assert ulps(ref.reduce(values, "sum", 0.0), true) <= 0.5
    assert ulps(ref.reduce(values, "mean", 5.0), true / 5) <= 1
    assert ref.reduce(np.array([1.0, math.inf]), "sum", 0.0) == math.inf


def test_differences_exact_only_when_float64_holds_them() -> None:
    # float32 magnitudes within 2**27 of the largest: every x - max(x) fits in 53 bits
    assert ref._differences_exact(np.array([[20.0, 1.5, -3.25, 0.0]], dtype=np.float32))
    # 1e-9 next to 20 has its last bit 2**-59 below 20's binade: float64 cannot hold 20 - 1e-9
    assert not ref._differences_exact(np.array([[20.0, 1e-9]], dtype=np.float32))
    assert not ref._differences_exact(np.array([[20.0, 1.5]]))  # float64: never claimed
    assert not ref._differences_exact(np.array([[np.inf, 1.0]], dtype=np.float32))


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    st.lists(st.floats(-60, 60, width=32), min_size=2, max_size=12),
    st.integers(0, 11),
    st.sampled_from([1.0, 1e-8, 1e-30, 8.0]),
    st.sampled_from([[], [20.0], [-35.5, 3.0]]),
)
def test_float32_inputs_on_either_path(values: list[float], pick: int, scale: float,
                                       anchors: list[float]) -> None:
    # Scaled by 1e-8 or 1e-30 next to an anchor of ordinary size, entries lie far below the
    # anchor's binade (the TwoSum path); otherwise the differences fit float64 exactly.
    x = np.array([*(np.float32(v) * np.float32(scale) for v in values), *anchors],
                 dtype=np.float32)
    target = pick % len(x)
    a = one_hot(len(x), target)
    got = float(ref.softmax_index_losses(x[None, :], np.array([target]), np.array([1.0]))[0])
    # log(sum(exp)) - x_t cancels to a loss as small as e^-spread: carry enough digits
    spread = float(x.max() - x.min())
    with mpmath.workdps(60 + int(spread / 2.3)):
        true = mp_softmax([float(v) for v in x], a)
    assert ulps(got, true) <= 4


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.lists(st.floats(0, 1e3), min_size=1, max_size=40), st.sampled_from([1, 1e-200, 1e-310]))
def test_sum_of_non_negative_terms_is_nearly_exact(values: list[float], scale: float) -> None:
    from fractions import Fraction

    terms = np.array([values]) * scale
    hi, lo = ref._sum_terms_of_one_sign(terms)
    exact = sum((Fraction(float(t)) for t in terms[0]), Fraction(0))
    error = abs(Fraction(float(hi[0])) + Fraction(float(lo[0])) - exact)
    # the bound 2**(2k - 104) relative, k = 6 for 40 terms; and no worse than subnormal spacing
    assert error <= exact * Fraction(2) ** (2 * 6 - 104) + Fraction(2) ** -1074
    # hi is hi + lo rounded (|lo| <= half an ulp of hi), and hi + lo is within the bound
    # above of the exact sum: a term 1e-48 times smaller than the sum may be dropped
    assert hi[0] == float(exact) or abs(Fraction(float(hi[0])) - exact) <= Fraction(
        float(np.spacing(float(exact)))) / 2 + exact * Fraction(2) ** (2 * 6 - 104) \
        + Fraction(2) ** -1074


@pytest.mark.parametrize("spread", [1.0, 30.0, 700.0])
def test_sum_of_a_vocabulary_of_terms_against_fsum(spread: float) -> None:
    # 131,072 terms exp(d), d in [-spread, 0]: the class counts of real vocabularies. The
    # residual of the double-double result against Shewchuk's exactly rounded sum
    # (math.fsum) must be within the bound 2**(2k - 104) of the sum, k = 17.
    rng = np.random.default_rng(int(spread))
    terms = np.exp(-rng.random((1, 1 << 17)) * spread)
    hi, lo = ref._sum_terms_of_one_sign(terms)
    exact = math.fsum(terms[0])
    assert float(hi[0]) == exact or abs(float(hi[0]) - exact) <= np.spacing(exact)
    residual = math.fsum([*terms[0], -float(hi[0])])  # sum - hi, rounded once
    assert abs(float(lo[0]) - residual) <= exact * 2.0 ** (2 * 17 - 104) + np.spacing(residual)
