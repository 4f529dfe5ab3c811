"""The reference: each loss computed in float64 to within a few units in the last place.

Pipelines are judged against this, float64 pipelines included, so it cannot simply be the
``stable`` formulation evaluated in float64: that one loses every digit when the loss is
tiny (logits ``[0, -40]``, target 0: the loss is 4.248e-18 and ``z - log(sum(exp(z)))``
gives 0) and cancels when large logits nearly tie. The formulas below are rearranged so
that every term is non-negative (no cancellation), the differences of logits are carried
exactly as double-double pairs (Dekker's TwoSum), and the sums are accumulated in
double-double, so the only errors left are a few correctly-rounded or libm operations.
Tests check them against mpmath at 50 significant digits.

References
----------
.. [1] P. Blanchard, D. J. Higham, N. J. Higham, "Accurately computing the log-sum-exp and
   softmax functions", IMA J. Numer. Anal. 41(4), 2311-2330, 2021.
.. [2] T. J. Dekker, "A floating-point technique for extending the available precision",
   Numer. Math. 18, 224-242, 1971.
.. [3] T. Ogita, S. M. Rump, S. Oishi, "Accurate sum and dot product", SIAM J. Sci. Comput.
   26(6), 1955-1988, 2005.
"""

from __future__ import annotations

import numpy as np

from .precision import FloatArray

# Cody and Waite's split of ln 2: the high part has trailing zero bits, so k * LN2_HI is
# exact for |k| < 2**11, and LN2_HI + LN2_LO carries ln 2 to about 2**-85.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10


def _two_sum(a: FloatArray, b: FloatArray) -> tuple[FloatArray, FloatArray]:
    """``a + b = s + e`` exactly, with ``s = fl(a + b)`` (Knuth's TwoSum)."""
    s = a + b
    b_virtual = s - a
    a_virtual = s - b_virtual
    if not isinstance(a_virtual, np.ndarray) or a_virtual.ndim == 0:
        return s, (a - a_virtual) + (b - b_virtual)
    # in place from here on: these temporaries are as large as the inputs
    np.subtract(b, b_virtual, out=b_virtual)
    np.subtract(a, a_virtual, out=a_virtual)
    np.add(a_virtual, b_virtual, out=a_virtual)
    return s, a_virtual


def _dd_sum(hi: FloatArray, lo: FloatArray | None = None) -> tuple[FloatArray, FloatArray]:
    """Sum the last axis of ``hi + lo`` in double-double by a pairwise tree of TwoSums.

    The result ``(s, e)`` carries the sum to about ``2**-100`` relative for terms of one sign
    (cascaded summation, Ogita, Rump and Oishi [3]), with O(n) work in log2(n) vector steps.
    """
    hi = np.asarray(hi, dtype=np.float64)
    if hi.shape[-1] == 0:
        zeros = np.zeros(hi.shape[:-1])
        return zeros, zeros.copy()
    # An infinite term makes TwoSum's error term inf - inf; such sums are taken plainly.
    plain = np.sum(hi, axis=-1)
    low = None if lo is None else np.asarray(lo, dtype=np.float64)
    carried: list[tuple[FloatArray, FloatArray | None]] = []  # odd columns, added at the end
    with np.errstate(invalid="ignore", over="ignore"):
        while hi.shape[-1] > 1:
            if hi.shape[-1] % 2:
                carried.append((hi[..., -1], None if low is None else low[..., -1]))
                hi = hi[..., :-1]
                low = None if low is None else low[..., :-1]
            s, e = _two_sum(hi[..., 0::2], hi[..., 1::2])
            if low is not None:
                e += low[..., 0::2]
                e += low[..., 1::2]
            hi, low = s, e
        total, error = hi[..., 0], (np.zeros_like(hi[..., 0]) if low is None else low[..., 0])
        for column, column_low in carried:
            total, e = _two_sum(total, column)
            error = error + e if column_low is None else error + e + column_low
        s, e = _two_sum(total, error)
    finite = np.isfinite(plain)
    return np.where(finite, s, plain), np.where(finite, e, 0.0)


def _log1p_dd(hi: FloatArray, lo: FloatArray) -> FloatArray:
    """``log1p(hi + lo)`` for ``hi >= 0``, with ``lo`` tiny: one first-order correction."""
    return np.log1p(hi) + lo / (1.0 + hi)


def _nonnegative_total(hi: FloatArray, lo: FloatArray, extra: FloatArray) -> FloatArray:
    """``hi + lo + extra`` for non-negative parts: adding the small parts first keeps them."""
    return hi + (lo + extra)


def _shifted_log_sum(x: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """For rows of logits: ``(m, d_hi, d_lo, log1p(T1))`` with ``x - m = d_hi + d_lo`` exactly
    and ``T1 = sum_{j != k} exp(x_j - m)``, ``k`` the (first) position of the maximum ``m``."""
    rows = np.arange(x.shape[0])
    top = np.argmax(x, axis=-1)
    m = x[rows, top][:, None]
    with np.errstate(invalid="ignore", over="ignore"):
        d_hi, d_lo = _two_sum(x, -m)  # d <= 0
        d_lo[~np.isfinite(d_hi)] = 0.0
        e_hi = np.exp(d_hi)
        e_hi[rows, top] = 0.0  # T1 leaves out one maximal term: exp(0) = 1 is log1p's "1 +"
        # exp(d_hi + d_lo) = exp(d_hi) (1 + d_lo): the correction is needed only where the
        # difference was inexact (never for float32 or narrower inputs of similar scale).
        e_lo = e_hi * d_lo if d_lo.any() else None
    t_hi, t_lo = _dd_sum(e_hi, e_lo)
    return m, d_hi, d_lo, _log1p_dd(t_hi, t_lo)


ShiftedLogSum = tuple[FloatArray, FloatArray, FloatArray, FloatArray]


def shifted_log_sum(logits: FloatArray) -> ShiftedLogSum:
    """The intermediates the softmax losses and gradients share, computed once per block."""
    return _shifted_log_sum(np.asarray(logits, dtype=np.float64))


def softmax_losses(logits: FloatArray, coefficients: FloatArray) -> FloatArray:
    """Per-row ``-sum_c a_c log softmax(x)_c`` in float64, accurate to a few ulp.

    Parameters
    ----------
    logits
        ``(N, C)`` finite values (any float dtype; converted exactly to float64).
    coefficients
        ``(N, C)`` non-negative weights ``a`` (see :func:`xentcheck.case.softmax_coefficients`).

    Notes
    -----
    With ``m = x[k] = max x`` and ``T1 = sum_{j != k} exp(x_j - m)``::

        loss = sum_c a_c (m - x_c) + (sum_c a_c) * log1p(T1)

    Both terms are non-negative, so there is no cancellation however small the loss; the
    differences ``m - x_c`` are exact double-double pairs; ``exp(d_hi + d_lo)`` is taken as
    ``exp(d_hi) (1 + d_lo)``; ``log1p`` keeps the small-loss case accurate ([1], section 2).
    Rows containing ``inf`` (inputs rounded past a dtype's range) give ``nan`` or ``inf``.
    """
    x = np.asarray(logits, dtype=np.float64)
    a = np.asarray(coefficients, dtype=np.float64)
    _, d_hi, d_lo, log_t = _shifted_log_sum(x)
    with np.errstate(invalid="ignore"):
        s_hi, s_lo = _dd_sum(np.where(a > 0, a * -d_hi, 0.0), np.where(a > 0, a * -d_lo, 0.0))
        total_a = np.sum(a, axis=-1)
        return _nonnegative_total(s_hi, s_lo, total_a * log_t)


def softmax_index_losses(logits: FloatArray, target: FloatArray, weight: FloatArray,
                         parts: ShiftedLogSum | None = None) -> FloatArray:
    """:func:`softmax_losses` for integer labels without smoothing: ``a`` is ``weight`` at
    ``target`` and 0 elsewhere, so the first sum is one term per row (no dense pass)."""
    x = np.asarray(logits, dtype=np.float64)
    rows = np.arange(x.shape[0])
    _, d_hi, d_lo, log_t = parts if parts is not None else _shifted_log_sum(x)
    w = np.asarray(weight, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        gap_hi, gap_lo = -d_hi[rows, target], -d_lo[rows, target]
        return np.where(w > 0, w * gap_hi + (w * gap_lo + w * log_t), 0.0)


def softmax_probability_losses(probabilities: FloatArray, coefficients: FloatArray) -> FloatArray:
    """Per-row ``-sum_c a_c log(p_c / sum(p))`` for probability inputs (rows renormalised).

    Notes
    -----
    Each term is written ``a_c log1p(R_c / p_c)`` with ``R_c = sum(p) - p_c >= 0``, which
    has no cancellation when ``p_c`` is close to the row sum. ``R_c`` of the row's largest
    entry is summed directly (double-double, leaving that entry out); for every other entry
    ``p_c <= sum/2``, so ``sum - p_c`` loses nothing. ``a_c = 0`` terms are 0 even where
    ``p_c = 0`` (``0 log 0 = 0``); ``a_c > 0`` with ``p_c = 0`` gives ``inf``, the true loss.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    a = np.asarray(coefficients, dtype=np.float64)
    rows = np.arange(p.shape[0])
    top = np.argmax(p, axis=-1)
    total_hi, total_lo = _dd_sum(p)
    rest = p.copy()
    rest[rows, top] = 0.0
    rest_hi, rest_lo = _dd_sum(rest)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        r_hi, r_lo = _two_sum(total_hi[:, None], -p)
        remainder = r_hi + (r_lo + total_lo[:, None])
        remainder[rows, top] = rest_hi + rest_lo
        ratio = remainder / p
        terms = np.log1p(ratio)
        # Where R/p overflows, p is far below R: split both into significand and exponent
        # so the logarithm of the ratio is formed without overflow and without cancellation.
        huge = np.isinf(ratio) & (p > 0) & np.isfinite(remainder)
        if huge.any():
            r_frac, r_exp = np.frexp(remainder[huge])
            p_frac, p_exp = np.frexp(p[huge])
            k = (r_exp - p_exp).astype(np.float64)
            terms[huge] = k * _LN2_HI + (k * _LN2_LO + np.log(r_frac / p_frac))
        weighted = np.where(a > 0, a * terms, 0.0)
    hi, lo = _dd_sum(weighted)
    return hi + lo


def _softplus_parts(x: FloatArray) -> tuple[FloatArray, FloatArray]:
    """``(softplus(x), softplus(-x))``, each ``max(+-x, 0) + log1p(exp(-|x|))``: no cancellation."""
    with np.errstate(over="ignore", invalid="ignore"):
        tail = np.log1p(np.exp(-np.abs(x)))
        return np.maximum(x, 0.0) + tail, np.maximum(-x, 0.0) + tail


def sigmoid_losses(
    logits: FloatArray,
    targets: FloatArray,
    pos_weight: FloatArray | None = None,
    weights: FloatArray | None = None,
) -> FloatArray:
    """Element-wise ``-w (pw z log sigmoid(x) + (1 - z) log(1 - sigmoid(x)))``.

    Uses ``-log sigmoid(x) = softplus(-x)`` and ``-log(1 - sigmoid(x)) = softplus(x)``, both
    sums of non-negative terms; zero-weight terms are dropped before multiplying (no
    ``0 * inf``).
    """
    x = np.asarray(logits, dtype=np.float64)
    z = np.asarray(targets, dtype=np.float64)
    sp_pos, sp_neg = _softplus_parts(x)  # -log(1 - s), -log(s)
    positive_weight = z if pos_weight is None else z * np.asarray(pos_weight, dtype=np.float64)
    return _weighted_binary(positive_weight, 1.0 - z, sp_neg, sp_pos, weights)


def sigmoid_probability_losses(
    probabilities: FloatArray,
    targets: FloatArray,
    pos_weight: FloatArray | None = None,
    weights: FloatArray | None = None,
) -> FloatArray:
    """Element-wise ``-w (pw z log p + (1 - z) log1p(-p))`` for probability inputs."""
    p = np.asarray(probabilities, dtype=np.float64)
    z = np.asarray(targets, dtype=np.float64)
    with np.errstate(divide="ignore"):
        neg_log_p, neg_log_q = -np.log(p), -np.log1p(-p)
    positive_weight = z if pos_weight is None else z * np.asarray(pos_weight, dtype=np.float64)
    return _weighted_binary(positive_weight, 1.0 - z, neg_log_p, neg_log_q, weights)


def _weighted_binary(
    wp: FloatArray, wn: FloatArray, lp: FloatArray, ln: FloatArray, weights: FloatArray | None
) -> FloatArray:
    with np.errstate(invalid="ignore", over="ignore"):
        loss = np.where(wp > 0, wp * lp, 0.0) + np.where(wn > 0, wn * ln, 0.0)
        if weights is not None:
            w = np.broadcast_to(np.asarray(weights, dtype=np.float64), loss.shape)
            loss = np.where(w > 0, w * loss, 0.0)
    return loss


def reduce(per_example: FloatArray, reduction: str, denominator: float) -> float:
    """``sum`` or ``mean`` of non-negative per-example losses, summed in double-double."""
    values = np.asarray(per_example, dtype=np.float64).ravel()
    if not np.isfinite(values).all():
        total = float(np.sum(values))  # inf, or nan where an example is nan
    else:
        hi, lo = _dd_sum(values)
        total = float(hi + lo)
    return total / denominator if reduction == "mean" else total


def _softmax(parts: ShiftedLogSum) -> FloatArray:
    _, d_hi, d_lo, log_t = parts
    with np.errstate(invalid="ignore", over="ignore"):
        return np.exp(d_hi - log_t[:, None]) * (1.0 + d_lo)


def softmax_gradients(logits: FloatArray, coefficients: FloatArray,
                      parts: ShiftedLogSum | None = None) -> FloatArray:
    """d loss_i / d x_ij = A_i p_ij - a_ij (``A = sum_c a_c``), in float64.

    The row maximum's entry, where p is close to 1, is formed without cancellation as
    ``sum_{j != k} a_j + A expm1(-log1p(T1))``; elsewhere ``p <= 1/2``.
    """
    x = np.asarray(logits, dtype=np.float64)
    a = np.asarray(coefficients, dtype=np.float64)
    rows = np.arange(x.shape[0])
    top = np.argmax(x, axis=-1)
    parts = parts if parts is not None else _shifted_log_sum(x)
    total = a.sum(axis=-1)
    with np.errstate(invalid="ignore", over="ignore"):
        grad = total[:, None] * _softmax(parts) - a
        others = total - a[rows, top]
        grad[rows, top] = others + total * np.expm1(-parts[3])
    return grad


def softmax_index_gradients(logits: FloatArray, target: FloatArray, weight: FloatArray,
                            parts: ShiftedLogSum | None = None) -> FloatArray:
    """:func:`softmax_gradients` for integer labels: ``w_t (p - onehot(t))``, with the
    target's entry ``-w_t (1 - p_t)`` formed without cancellation when t is the maximum."""
    x = np.asarray(logits, dtype=np.float64)
    rows = np.arange(x.shape[0])
    top = np.argmax(x, axis=-1)
    parts = parts if parts is not None else _shifted_log_sum(x)
    w = np.asarray(weight, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        p = _softmax(parts)
        at_target = p[rows, target] - 1.0
        # 1 - p_t = T1 / (1 + T1) = -expm1(-log1p(T1)) when the target is the row maximum
        at_target = np.where(target == top, np.expm1(-parts[3]), at_target)
        p[rows, target] = at_target
        return w[:, None] * p


def _sigmoid(x: FloatArray) -> FloatArray:
    """1 / (1 + e^-x), taking e^x / (1 + e^x) for x < 0 so that neither side overflows."""
    with np.errstate(over="ignore"):
        e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def sigmoid_gradients(
    logits: FloatArray, targets: FloatArray, pos_weight: FloatArray | None = None,
    weights: FloatArray | None = None,
) -> FloatArray:
    """d loss / d x = w ((1 - z) sigmoid(x) - pw z sigmoid(-x)), both terms non-negative."""
    x = np.asarray(logits, dtype=np.float64)
    z = np.asarray(targets, dtype=np.float64)
    pw = 1.0 if pos_weight is None else np.asarray(pos_weight, dtype=np.float64)
    grad = (1.0 - z) * _sigmoid(x) - pw * z * _sigmoid(-x)
    return grad if weights is None else grad * np.asarray(weights, dtype=np.float64)
