"""The reference with the loss options (temperature, soft-cap, z-loss) against mpmath at 60
significant digits, straight from the definitions: losses and gradients, on the extreme
values of issue 13 and on hypothesis-drawn rows."""

from __future__ import annotations

import math
from typing import Any

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xentcheck import reference_options as ro
from xentcheck.case_validation import make_case
from xentcheck.evaluator import reference_block
from xentcheck.execution import blocks

MPMATH_DPS = 60  # this module's tests run at it (conftest.py)


def mp_transformed(x: list[float], options: dict[str, float]) -> list[mpmath.mpf]:
    values = [mpmath.mpf(v) / mpmath.mpf(options.get("temperature", 1.0)) for v in x]
    cap = options.get("logit_softcap")
    if cap is not None:
        values = [mpmath.mpf(cap) * mpmath.tanh(v / mpmath.mpf(cap)) for v in values]
    return values


def mp_loss(x: list[float], target: int, options: dict[str, float]) -> mpmath.mpf:
    """lse(x'') - x''_t + COEF lse(x'')^2, the first part as ``log1p(sum_{j != t}
    exp(x''_j - x''_t))`` (``log(1 + e^-107)`` at 60 digits would keep 13 of them)."""
    xs = mp_transformed(x, options)
    loss = mpmath.log1p(mpmath.fsum(mpmath.exp(v - xs[target])
                                    for j, v in enumerate(xs) if j != target))
    lse = xs[target] + loss
    return loss + mpmath.mpf(options.get("z_loss", 0.0)) * lse**2


def mp_gradient(x: list[float], target: int, options: dict[str, float]) -> list[mpmath.mpf]:
    """d loss / d x_j in closed form at 60 digits: ``(softmax_j (1 + 2 COEF lse) - [j = t])
    dx''_j/dx_j`` with ``dx''/dx = sech^2(x' / CAP) / T``. (Numerical differentiation
    cannot resolve entries like e^-500 next to a loss of 625.)"""
    xs = mp_transformed(x, options)
    lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in xs))
    scale = 1 + 2 * mpmath.mpf(options.get("z_loss", 0.0)) * lse
    temperature = mpmath.mpf(options.get("temperature", 1.0))
    cap = options.get("logit_softcap")
    grads = []
    for j, v in enumerate(xs):
        g = mpmath.exp(v - lse) * scale - (1 if j == target else 0)
        derivative = 1 / temperature
        if cap is not None:
            derivative *= mpmath.sech(mpmath.mpf(x[j]) / temperature / mpmath.mpf(cap)) ** 2
        grads.append(g * derivative)
    return grads


def ulps(got: float, true: mpmath.mpf) -> float:
    """|got - true| in units of float64's spacing at the true value."""
    t = float(true)
    spacing = float(np.spacing(abs(t))) if t else 5e-324
    return float(abs(mpmath.mpf(got) - true) / spacing)


def reference(x: list[float], target: int, options: dict[str, Any],
              ) -> tuple[float, np.ndarray]:
    case = make_case(name="row", logits=np.array([x]), labels=np.array([target]), **options)
    losses, grad = reference_block(next(blocks(case)), gradient=True)
    assert grad is not None
    return float(losses[0]), grad[0]


EXTREMES = [
    ([1000.0, 2000.0, 2500.0], 2, {"z_loss": 1e-4}),
    ([1000.0, 2000.0, 2500.0], 0, {"z_loss": 1e-4}),
    ([1e4, -1e4, 0.0, 5.0], 0, {"logit_softcap": 30.0}),
    ([1e4, 9999.0, -3.0], 1, {"logit_softcap": 30.0}),
    ([0.0, -40.0], 0, {"temperature": 3.0}),
    ([0.0, -40.0], 0, {"logit_softcap": 30.0}),
    ([0.0, -40.0], 0, {"temperature": 0.5, "logit_softcap": 50.0}),
    ([0.0, -40.0], 0, {"temperature": 3.0, "logit_softcap": 30.0, "z_loss": 1e-4}),
    ([0.3, -100.0, 7.0], 2, {"temperature": 0.7, "logit_softcap": 20.0, "z_loss": 1e-3}),
]


@pytest.mark.parametrize(("x", "target", "options"), EXTREMES)
def test_extreme_rows_within_an_ulp(x: list[float], target: int,
                                    options: dict[str, float]) -> None:
    loss, grad = reference(x, target, options)
    assert ulps(loss, mp_loss(x, target, options)) <= 1.0
    for got, true in zip(grad, mp_gradient(x, target, options), strict=True):
        # an entry that is 0 in float64 is one whose true value is below the subnormals
        assert ulps(float(got), true) <= 4.0 or (got == 0 and abs(true) < 1e-300)


def test_tiny_loss_with_cap_keeps_its_digits() -> None:
    # rounding x'' to float64 would move this loss by tens of ulps: the pairs keep it
    loss, _ = reference([0.0, -40.0], 0, {"logit_softcap": 30.0})
    assert loss == pytest.approx(4.614351156731356e-12, rel=2**-52)
    true = mp_loss([0.0, -40.0], 0, {"logit_softcap": 30.0})
    x2 = 30.0 * math.tanh(-40.0 / 30.0)  # x'' rounded to float64
    rounded = math.log1p(math.exp(x2))
    assert ulps(rounded, true) > 4 * ulps(loss, true) + 2


@settings(max_examples=150, derandomize=True, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=2, max_size=8),
    st.integers(0, 7),
    st.sampled_from([1.0, 0.3, 2.5, 1e3]),
    st.sampled_from([None, 1.0, 30.0, 1e3]),
    st.sampled_from([0.0, 1e-4, 0.5]),
)
def test_losses_property(values: list[float], pick: int, temperature: float,
                         cap: float | None, coef: float) -> None:
    options = {"temperature": temperature, "logit_softcap": cap, "z_loss": coef}
    target = pick % len(values)
    loss, _ = reference(values, target, options)
    assert ulps(loss, mp_loss(values, target, options)) <= 3.0


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.floats(-800, 800, allow_nan=False), st.floats(1e-3, 1e3))
def test_tanh_pair_to_double_double_accuracy(u: float, scale: float) -> None:
    arg = np.array([u / scale])
    hi, lo = ro.tanh_pair((arg, np.zeros(1)))
    true = mpmath.tanh(mpmath.mpf(float(arg[0])))
    error = abs(mpmath.mpf(float(hi[0])) + mpmath.mpf(float(lo[0])) - true)
    assert error <= abs(true) * mpmath.mpf(2) ** -98 or error < mpmath.mpf(2) ** -1000


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.floats(-1e300, 1e300, allow_nan=False), st.floats(1e-3, 1e3))
def test_division_pair_is_the_exact_quotient(x: float, t: float) -> None:
    hi, lo = ro.divide(np.array([x]), t)
    true = mpmath.mpf(x) / mpmath.mpf(t)
    error = abs(mpmath.mpf(float(hi[0])) + mpmath.mpf(float(lo[0])) - true)
    assert error <= abs(true) * mpmath.mpf(2) ** -104 or abs(true) < 1e-290


def test_sigmoid_with_options_against_mpmath() -> None:
    x = np.array([[-40.0, 35.0, 0.5]])
    z = np.array([[1.0, 0.0, 1.0]])
    options = {"temperature": 1.5, "logit_softcap": 20.0}
    case = make_case(name="s", logits=x, labels=z, family="sigmoid", **options)
    losses, grad = reference_block(next(blocks(case)), gradient=True)
    assert grad is not None
    for j, (xj, zj) in enumerate(zip(x[0], z[0], strict=True)):
        def loss_at(v: mpmath.mpf, zj: float = float(zj)) -> mpmath.mpf:
            h = mp_transformed([v], options)[0]  # type: ignore[list-item]
            # -log sigmoid(h) or -log(1 - sigmoid(h)), each a softplus
            return mpmath.log1p(mpmath.exp(-h)) if zj else mpmath.log1p(mpmath.exp(h))
        assert ulps(float(losses[0, j]), loss_at(mpmath.mpf(xj))) <= 2.0
        assert ulps(float(grad[0, j]), mpmath.diff(loss_at, mpmath.mpf(xj))) <= 4.0
