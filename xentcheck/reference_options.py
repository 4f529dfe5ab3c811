"""The reference with the loss options: the transformed logits in double-double, the z-term,
and the gradient by the chain rule.

A loss is a difference of nearly equal numbers of the logits (``m - x_t``, ``exp(x_j - m)``):
rounding ``x'' = CAP tanh(x / (T CAP))`` to float64 would put an error of ``|x''| 2**-53``
into every difference, which for a tiny loss (``[0, -40]``: 4.2e-18) is tens of ulps of the
loss. So ``x / T`` is carried as a double-double pair (Dekker's exact product gives the
division's remainder) and ``tanh`` is evaluated in double-double from ``expm1`` of the
reduced argument (Taylor series in double-double after ``2**-8`` scaling, squared back by
``expm1(2a) = expm1(a) (2 + expm1(a))``), so that ``x''`` is known to about ``2**-100``
relative; :func:`xentcheck.reference.shifted_log_sum` then takes the pairs' differences
exactly as it takes the raw logits'. The z-term ``COEF lse^2`` is formed from
``lse = m + log1p(T1)`` carried in two parts.

References
----------
.. [1] T. J. Dekker, "A floating-point technique for extending the available precision",
   Numer. Math. 18, 224-242, 1971 (exact product by splitting, double-double arithmetic).
.. [2] J.-M. Muller et al., *Handbook of Floating-Point Arithmetic*, 2nd ed., Birkhauser,
   2018, ch. 14 (double-word arithmetic) and ch. 11 (argument reduction for exp).
"""

from __future__ import annotations

from fractions import Fraction
from math import factorial

import numpy as np

from . import reference as ref
from .case import LossSpec
from .precision import FloatArray

Pair = tuple[FloatArray, FloatArray]

_SPLITTER = 134217729.0  # 2**27 + 1: Veltkamp's split of a float64 into two 26-bit halves
# ln 2 as a double-double pair (to about 2**-107)
_LN2 = (0.6931471805599453, 2.3190468138462996e-17)
# Taylor terms of expm1 on |r| <= ln2 / 2 / 2**_HALVINGS < 1.4e-3: 11 terms reach 2**-110
_HALVINGS = 8
_TERMS = 11


def _pair(value: Fraction) -> tuple[float, float]:
    hi = float(value)
    return hi, float(value - Fraction(hi))


# 1/n! as double-double pairs, n = 1.._TERMS
_INVERSE_FACTORIALS = [_pair(Fraction(1, factorial(n))) for n in range(1, _TERMS + 1)]


def _split(a: FloatArray) -> Pair:
    t = _SPLITTER * a
    hi = t - (t - a)
    return hi, a - hi


def two_product(a: FloatArray, b: FloatArray) -> Pair:
    """``a * b = p + e`` exactly, ``p = fl(a b)`` (Dekker [1]; no FMA needed)."""
    p = a * b
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    e = ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
    return p, e


def _fast_two_sum(a: FloatArray, b: FloatArray) -> Pair:
    s = a + b
    return s, b - (s - a)


def dd_add(a: Pair, b: Pair) -> Pair:
    """Double-double sum (Muller et al. [2], Alg. 14.3: relative error below 3 * 2**-106)."""
    s, e = ref._two_sum(np.asarray(a[0]), np.asarray(b[0]))
    t, f = ref._two_sum(np.asarray(a[1]), np.asarray(b[1]))
    s, e = _fast_two_sum(s, e + t)
    return _fast_two_sum(s, e + f)


def dd_mul(a: Pair, b: Pair) -> Pair:
    """Double-double product (relative error below 7 * 2**-106)."""
    p, e = two_product(np.asarray(a[0]), np.asarray(b[0]))
    return _fast_two_sum(p, e + (a[0] * b[1] + a[1] * b[0]))


def dd_div(a: Pair, b: Pair) -> Pair:
    """Double-double quotient: one float64 quotient refined by the exact remainder."""
    q = a[0] / b[0]
    with np.errstate(invalid="ignore", over="ignore"):
        p, e = dd_mul((q, np.zeros_like(q)), b)
        remainder = ((a[0] - p) - e) + a[1]
        hi, lo = _fast_two_sum(q, remainder / b[0])
    finite = np.isfinite(q)  # an infinite quotient (a masked logit) has no low part
    return np.where(finite, hi, q), np.where(finite, lo, 0.0)


def divide(x: FloatArray, divisor: float) -> Pair:
    """``x / divisor`` as a pair: the quotient and its remainder divided (exact to 2**-106).
    Infinite inputs (masked logits) give a zero low part."""
    x = np.asarray(x, dtype=np.float64)
    # the split in two_product overflows past 2**996: such quotients are formed scaled
    # down by 2**-64 (exact) and scaled back
    scale = np.where(np.abs(x) > 2.0**900, 2.0**-64, 1.0)
    with np.errstate(invalid="ignore", over="ignore"):
        q = (x * scale) / divisor
        p, e = two_product(q, np.full_like(q, divisor))
        low = ((x * scale - p) - e) / divisor
        q, low = q / scale, low / scale
    return q, np.where(np.isfinite(q), low, 0.0)


def expm1_negative(y: Pair) -> Pair:
    """``expm1(y)`` for ``y <= 0`` given as a pair, as a pair accurate to about 2**-100
    (absolute, the result lying in (-1, 0])."""
    hi, lo = np.asarray(y[0], dtype=np.float64), np.asarray(y[1], dtype=np.float64)
    far = hi < -36.0  # exp(y) < 2.4e-16: -1 + exp(y) to far below an ulp of 1
    safe_hi = np.where(far, 0.0, hi)
    safe_lo = np.where(far, 0.0, lo)
    k = np.rint(safe_hi / _LN2[0])
    p, e = two_product(k, np.full_like(k, _LN2[0]))
    r = dd_add((safe_hi, safe_lo), (-p, -e - k * _LN2[1]))
    scale = 2.0 ** -_HALVINGS
    r = (r[0] * scale, r[1] * scale)  # exact
    # Horner: sum_{n>=1} r^n / n! = r (1/1! + r (1/2! + r (...)))
    acc: Pair = (np.full_like(hi, _INVERSE_FACTORIALS[-1][0]),
                 np.full_like(hi, _INVERSE_FACTORIALS[-1][1]))
    for c_hi, c_lo in reversed(_INVERSE_FACTORIALS[:-1]):
        acc = dd_add(dd_mul(acc, r), (np.full_like(hi, c_hi), np.full_like(hi, c_lo)))
    m = dd_mul(acc, r)
    for _ in range(_HALVINGS):  # expm1(2a) = expm1(a) (2 + expm1(a))
        m = dd_mul(m, dd_add(m, (np.full_like(hi, 2.0), np.zeros_like(hi))))
    # expm1(y) = 2^k expm1(r) + (2^k - 1); both exact scalings (k >= -52 here)
    power = np.ldexp(1.0, k.astype(np.int64))
    out = dd_add((m[0] * power, m[1] * power), (power - 1.0, np.zeros_like(hi)))
    with np.errstate(under="ignore"):
        tail = np.exp(hi) * (1.0 + lo)
    return np.where(far, -1.0, out[0]), np.where(far, tail, out[1])


def tanh_pair(u: Pair) -> Pair:
    """``tanh(u)`` as a pair: ``-E / (2 + E)`` with ``E = expm1(-2|u|)`` (no cancellation:
    ``2 + E >= 1``), the sign restored."""
    hi, lo = np.asarray(u[0], dtype=np.float64), np.asarray(u[1], dtype=np.float64)
    sign = np.where(hi < 0, -1.0, 1.0)
    e = expm1_negative((-2.0 * hi * sign, -2.0 * lo * sign))
    t = dd_div((-e[0], -e[1]), dd_add(e, (np.full_like(hi, 2.0), np.zeros_like(hi))))
    with np.errstate(invalid="ignore"):
        # infinite arguments (masked logits): tanh is +-1 exactly
        infinite = np.isinf(hi)
        return (np.where(infinite, sign, sign * t[0]), np.where(infinite, 0.0, sign * t[1]))


def transformed(logits: FloatArray, spec: LossSpec) -> tuple[Pair, FloatArray]:
    """``x'' = CAP tanh((x / T) / CAP)`` as a pair, and ``dx''/dx`` (float64)."""
    x = np.asarray(logits, dtype=np.float64)
    scaled = divide(x, spec.temperature) if spec.temperature != 1.0 else (
        x, np.zeros_like(x))
    derivative = np.full_like(x, 1.0 / spec.temperature)
    cap = spec.logit_softcap
    if cap is None:
        return scaled, derivative
    u = dd_div(scaled, (np.full_like(x, cap), np.zeros_like(x)))
    t = tanh_pair(u)
    capped = dd_mul(t, (np.full_like(x, cap), np.zeros_like(x)))
    with np.errstate(over="ignore", under="ignore"):
        # d/du tanh = 1 / cosh(u)^2, with no cancellation (1 - t^2 would lose it near
        # |t| = 1); at u + u_lo it is sech(u)^2 (1 - 2 tanh(u) u_lo) to first order
        sech = 1.0 / np.cosh(u[0])
        square = sech * sech * (1.0 - 2.0 * t[0] * u[1])
    return capped, derivative * square


def z_terms(parts: ref.ShiftedLogSum, x: Pair, coef: float) -> tuple[FloatArray, FloatArray]:
    """Per row ``COEF lse^2`` and ``lse = m + log1p(T1)`` (``m = x''[top]`` as a pair), from
    the shared intermediates of the transformed logits ``x``."""
    rows = np.arange(len(parts.top))
    with np.errstate(invalid="ignore", over="ignore"):
        lse_hi, lse_lo = ref._two_sum(x[0][rows, parts.top], parts.log_t)
        lse_lo = lse_lo + x[1][rows, parts.top]
        return coef * (lse_hi * lse_hi + 2.0 * lse_hi * lse_lo), lse_hi + lse_lo


def z_gradient(parts: ref.ShiftedLogSum, lse: FloatArray, weight: FloatArray) -> FloatArray:
    """``d(w COEF lse^2) / dx''_j = 2 w COEF lse softmax_j`` per row; ``weight`` is
    ``w COEF`` (0 on rows that do not count)."""
    with np.errstate(invalid="ignore", over="ignore"):
        grad = ref._softmax(parts)
        grad *= (2.0 * weight * lse)[:, None]
    grad[weight == 0] = 0.0
    return grad
