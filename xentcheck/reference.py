"""The reference: each loss computed in float64 to within a few units in the last place.

Pipelines are judged against this, float64 pipelines included, so it cannot simply be the
``stable`` formulation evaluated in float64: that one loses every digit when the loss is
tiny (logits ``[0, -40]``, target 0: the loss is 4.248e-18 and ``z - log(sum(exp(z)))``
gives 0) and cancels when large logits nearly tie. The formulas below are rearranged so
that every term is non-negative (no cancellation), the differences of logits are exact
(in float64 where it provably holds them, else as double-double pairs by Dekker's TwoSum),
and the sums are carried to far below an ulp (ExtractScalar for the softmax sum,
double-double otherwise), so the only errors left are a few correctly-rounded or libm
operations.
Tests check them against mpmath at 50 significant digits.

References
----------
.. [1] P. Blanchard, D. J. Higham, N. J. Higham, "Accurately computing the log-sum-exp and
   softmax functions", IMA J. Numer. Anal. 41(4), 2311-2330, 2021.
.. [2] T. J. Dekker, "A floating-point technique for extending the available precision",
   Numer. Math. 18, 224-242, 1971.
.. [3] T. Ogita, S. M. Rump, S. Oishi, "Accurate sum and dot product", SIAM J. Sci. Comput.
   26(6), 1955-1988, 2005.
.. [4] S. M. Rump, T. Ogita, S. Oishi, "Accurate floating-point summation part I: faithful
   rounding", SIAM J. Sci. Comput. 31(1), 189-224, 2008 (ExtractScalar, Lemma 3.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from . import chunking
from .chunking import chunk_sums, combine_chunk_sums, row_sum
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
    Rows wider than the summation chunk (:mod:`xentcheck.chunking`) are summed chunk by
    chunk and the chunks' pairs summed by the same tree, so that a row split at multiples of
    the chunk sums identically (:func:`_dd_chunk_pairs`, :func:`_dd_combine`); each level
    keeps the ``2**-100`` order of the bound.
    """
    if np.shape(hi)[-1] <= chunking.SUM_CHUNK:
        return _dd_tree(hi, lo)
    return _dd_combine(*_dd_chunk_pairs(hi, lo))


def _dd_chunk_pairs(hi: FloatArray, lo: FloatArray | None) -> tuple[FloatArray, FloatArray]:
    """``(..., m)`` pairs: the double-double sum of each summation chunk of the last axis."""
    hi, size = np.asarray(hi), chunking.SUM_CHUNK
    parts = [_dd_tree(hi[..., start:start + size],
                      None if lo is None else np.asarray(lo)[..., start:start + size])
             for start in range(0, hi.shape[-1], size)]
    return (np.stack([p[0] for p in parts], axis=-1) if parts else np.zeros((*hi.shape[:-1], 0)),
            np.stack([p[1] for p in parts], axis=-1) if parts else np.zeros((*hi.shape[:-1], 0)))


def _dd_combine(sums: FloatArray, errors: FloatArray) -> tuple[FloatArray, FloatArray]:
    """The row sums from all of a row's chunk pairs (:func:`_dd_chunk_pairs`), in order."""
    return _dd_tree(np.ascontiguousarray(sums), np.ascontiguousarray(errors))


def _dd_tree(hi: FloatArray, lo: FloatArray | None = None) -> tuple[FloatArray, FloatArray]:
    """:func:`_dd_sum`'s tree over the whole last axis."""
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


# Inputs whose significands have at most this many bits (float32, float16, bfloat16) have
# float64 differences that are exact whenever the operands' binades are within 28 of each
# other: a - b is then a multiple of ulp(b) below 2**(e_a + 2), at most 53 bits.
_NARROW_SIGNIFICAND = 24
_EXACT_BINADE_GAP = 27


def _differences_exact(x: FloatArray) -> bool:
    """Whether ``x_ij - x_ik`` is exact in float64 for every pair in a row of the block.

    True for a narrow input (at most 24 significand bits) whose non-zero magnitudes all lie
    within ``2**27`` of the largest: no two operands' binades are then more than 28 apart.
    This spares the reference Dekker's TwoSum (five more passes over the block) in the usual
    case; any other block takes it.
    """
    if _significand_bits(x.dtype) > _NARROW_SIGNIFICAND or x.size == 0:
        return False
    magnitude = np.abs(x).astype(np.float32, copy=False)  # exact: a narrow dtype fits float32
    largest = float(magnitude.max())
    if not np.isfinite(largest):
        # -inf (a masked entry) minus a finite maximum is -inf exactly; +inf or NaN (inputs
        # rounded past a dtype's range) take the general path
        finite = np.isfinite(magnitude)
        if np.isnan(largest) or bool(np.any(~finite & (np.asarray(x) > 0))):
            return False
        largest = float(np.max(magnitude, where=finite, initial=0.0))
    small = magnitude < np.float32(largest * 2.0**-_EXACT_BINADE_GAP)
    return not small.any() or not np.count_nonzero(magnitude[small])


def _significand_bits(dtype: np.dtype) -> int:
    try:
        return int(ml_dtypes.finfo(dtype).nmant) + 1  # type: ignore[no-untyped-call]
    except (TypeError, ValueError):
        return 64  # not a floating-point dtype: no claim


def _sum_terms_of_one_sign(terms: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Row sums of non-negative ``terms`` as ``hi + lo``, to ``2**(2k - 104)`` relative
    (``2**k >= C``), far below an ulp of ``hi`` for any realistic class count.

    Each row is split at ``sigma = 2**(k+1) mu`` (``mu`` the power of two just above the
    row's largest term) into high parts ``q = fl((sigma + t) - sigma)`` and low parts
    ``r = t - q``, both exact (Rump, Ogita and Oishi's ExtractScalar [4]). Every ``q`` is a
    multiple of ``ulp(sigma)`` and their sum stays below ``sigma / 2``, so it is exact in any
    order; each ``r`` is below ``ulp(sigma) / 2``, so the plain sum of the ``C`` low parts
    errs by at most ``C**2 2**-105 sigma``. Four vector passes, where a double-double tree
    needs log2(C) rounds of strided TwoSums. A NaN term makes its row's sum NaN.
    """
    high_sum, low_sums = _extracted_parts(terms, terms.max(axis=-1), terms.shape[-1])
    return _extracted_total(high_sum, low_sums)


def _extracted_parts(terms: FloatArray, largest: FloatArray,
                     n: int) -> tuple[FloatArray, FloatArray]:
    """ExtractScalar on (a column chunk of) rows of ``n`` terms whose largest is ``largest``:
    the exact sum of the high parts and the chunk sums of the low parts
    (:func:`~xentcheck.chunking.chunk_sums`). Chunks' parts merge exactly and in order."""
    k = max(n - 1, 1).bit_length()  # 2**k >= n
    with np.errstate(invalid="ignore"):
        _, exponent = np.frexp(largest)  # largest < 2**exponent (0 and NaN give exponent 0)
        sigma = np.ldexp(1.0, exponent + k + 1)[:, None]
        high = terms + sigma
        high -= sigma
        high_sum = high.sum(axis=-1)  # exact in any order (see above)
        low = np.subtract(terms, high, out=high)  # the high parts are summed: reuse
        return high_sum, chunk_sums(low)


def _extracted_total(high_sum: FloatArray, low_sums: FloatArray) -> tuple[FloatArray, FloatArray]:
    with np.errstate(invalid="ignore"):
        return _two_sum(high_sum, combine_chunk_sums(low_sums))


@dataclass(frozen=True)
class ShiftedLogSum:
    """What the softmax losses and gradients of a block of logits share, computed once.

    With ``m = x[k] = max x`` (``k = top``, the row's first maximum): ``x - m = d_hi + d_lo``
    exactly (``d_lo`` is None when every difference is exact); ``terms`` holds
    ``exp(x_j - m)`` with the maximum's own entry set to 0; ``T1 = sum(terms)`` is carried
    as ``t_hi`` plus a correction folded into ``log_t = log1p(T1)``.
    """

    top: FloatArray
    d_hi: FloatArray
    d_lo: FloatArray | None
    terms: FloatArray
    t_hi: FloatArray
    log_t: FloatArray


def shifted_log_sum(logits: FloatArray, low: FloatArray | None = None) -> ShiftedLogSum:
    """The shared intermediates of a block of logits (any float dtype; rows with ``inf``
    give NaN or ``inf`` downstream). With ``low``, the logits are the double-double pairs
    ``logits + low`` (the loss options' transformed logits, :mod:`.reference_options`)."""
    x = np.asarray(logits)
    rows = np.arange(x.shape[0])
    top = np.argmax(x, axis=-1)  # exact in the input's own dtype: no float64 copy needed
    m = x[rows, top].astype(np.float64)[:, None]
    with np.errstate(invalid="ignore", over="ignore"):
        d_lo: FloatArray | None = None
        if low is not None:
            # (x + low) - (m + m_low): the high parts' difference exactly, plus the low
            # parts' (each far below an ulp of the high parts), renormalised
            d_hi, d_lo = _two_sum(np.asarray(x, dtype=np.float64), -m)
            d_lo += np.asarray(low) - np.asarray(low)[rows, top][:, None]
            d_hi, d_lo = d_hi + d_lo, d_lo - ((d_hi + d_lo) - d_hi)
            d_lo[~np.isfinite(d_hi)] = 0.0
        elif _differences_exact(x):
            d_hi = np.subtract(x, m, dtype=np.float64)  # one pass, exact (see above)
        else:
            d_hi, d_lo = _two_sum(np.asarray(x, dtype=np.float64), -m)  # d <= 0
            d_lo[~np.isfinite(d_hi)] = 0.0
            if not d_lo.any():
                d_lo = None
        terms = np.exp(d_hi)
        terms[rows, top] = 0.0  # T1 leaves out one maximal term: exp(0) = 1 is log1p's "1 +"
        if d_lo is None:
            t_hi, t_lo = _sum_terms_of_one_sign(terms)
        else:
            # Row by row (a row's value must not depend on the other rows of its block, nor
            # on how it is split): rows whose differences are all exact are summed as above.
            t_hi, t_lo = np.empty(len(terms)), np.empty(len(terms))
            carried = d_lo.any(axis=-1)
            if not carried.all():
                t_hi[~carried], t_lo[~carried] = _sum_terms_of_one_sign(terms[~carried])
            # exp(d_hi + d_lo) = exp(d_hi) (1 + d_lo): first order suffices, |d_lo| <= 2**-53 |d|
            terms_lo = terms[carried] * d_lo[carried]
            t_hi[carried], t_lo[carried] = _dd_sum(terms[carried], terms_lo)
            terms[carried] += terms_lo
    return ShiftedLogSum(top, d_hi, d_lo, terms, t_hi, _log1p_dd(t_hi, t_lo))


def softmax_losses(logits: FloatArray, coefficients: FloatArray,
                   parts: ShiftedLogSum | None = None) -> FloatArray:
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
    differences ``m - x_c`` are exact (double-double pairs where float64 cannot hold them);
    ``exp(d_hi + d_lo)`` is taken as ``exp(d_hi) (1 + d_lo)``; ``T1`` is summed to far below
    an ulp; ``log1p`` keeps the small-loss case accurate ([1], section 2).
    Rows containing ``inf`` (inputs rounded past a dtype's range) give ``nan`` or ``inf``.
    """
    a = np.asarray(coefficients, dtype=np.float64)
    parts = parts if parts is not None else shifted_log_sum(logits)
    with np.errstate(invalid="ignore"):
        weighted = a > 0
        s_hi, s_lo = _dd_sum(np.where(weighted, a * -parts.d_hi, 0.0),
                             None if parts.d_lo is None
                             else np.where(weighted, a * -parts.d_lo, 0.0))
        total_a = row_sum(a)
        return _nonnegative_total(s_hi, s_lo, total_a * parts.log_t)


def softmax_index_losses(logits: FloatArray, target: FloatArray, weight: FloatArray,
                         parts: ShiftedLogSum | None = None) -> FloatArray:
    """:func:`softmax_losses` for integer labels without smoothing: ``a`` is ``weight`` at
    ``target`` and 0 elsewhere, so the first sum is one term per row (no dense pass)."""
    parts = parts if parts is not None else shifted_log_sum(logits)
    rows = np.arange(parts.d_hi.shape[0])
    w = np.asarray(weight, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        gap_hi = -parts.d_hi[rows, target]
        gap_lo = 0.0 if parts.d_lo is None else -parts.d_lo[rows, target]
        return np.where(w > 0, w * gap_hi + (w * gap_lo + w * parts.log_t), 0.0)



def log1p_ratio(remainder: FloatArray, p: FloatArray) -> FloatArray:
    """``log1p(remainder / p)``, also where the ratio overflows: there p is far below the
    remainder, so both are split into significand and exponent and the logarithm of the
    ratio is formed without overflow and without cancellation."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        ratio = remainder / p
        terms = np.log1p(ratio)
        huge = np.isinf(ratio) & (p > 0) & np.isfinite(remainder)
        if huge.any():
            r_frac, r_exp = np.frexp(remainder[huge])
            p_frac, p_exp = np.frexp(p[huge])
            k = (r_exp - p_exp).astype(np.float64)
            terms[huge] = k * _LN2_HI + (k * _LN2_LO + np.log(r_frac / p_frac))
    return np.asarray(terms)

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
        terms = log1p_ratio(remainder, p)
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
    if reduction != "mean":
        return total
    return total / denominator if denominator else float("nan")  # nothing counted: 0/0


def _softmax(parts: ShiftedLogSum) -> FloatArray:
    """``p_j = exp(x_j - m) / (1 + T1)``: the exponentials already taken for the loss, scaled.

    Reusing them costs one multiplication per entry instead of a second ``exp``, and is more
    accurate than ``exp(x_j - lse)``, whose rounded argument errs by up to ``|x_j - lse| u``.
    """
    rows = np.arange(parts.terms.shape[0])
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        scale = 1.0 / (1.0 + parts.t_hi)
        p = parts.terms * scale[:, None]
        p[rows, parts.top] = scale  # the maximum's own term, exp(0) = 1
    return p


def softmax_gradients(logits: FloatArray, coefficients: FloatArray,
                      parts: ShiftedLogSum | None = None) -> FloatArray:
    """d loss_i / d x_ij = A_i p_ij - a_ij (``A = sum_c a_c``), in float64.

    The row maximum's entry, where p is close to 1, is formed without cancellation as
    ``sum_{j != k} a_j + A expm1(-log1p(T1))``; elsewhere ``p <= 1/2``.
    """
    a = np.asarray(coefficients, dtype=np.float64)
    parts = parts if parts is not None else shifted_log_sum(logits)
    rows, top = np.arange(a.shape[0]), parts.top
    total = row_sum(a)
    with np.errstate(invalid="ignore", over="ignore"):
        grad = _softmax(parts)
        grad *= total[:, None]
        grad -= a
        others = total - a[rows, top]
        grad[rows, top] = others + total * np.expm1(-parts.log_t)
    # a row without weight (ignored) has gradient 0, also where every entry is masked (NaN p)
    grad[total == 0] = 0.0
    return grad


def softmax_index_gradients(logits: FloatArray, target: FloatArray, weight: FloatArray,
                            parts: ShiftedLogSum | None = None) -> FloatArray:
    """:func:`softmax_gradients` for integer labels: ``w_t (p - onehot(t))``, with the
    target's entry ``-w_t (1 - p_t)`` formed without cancellation when t is the maximum."""
    parts = parts if parts is not None else shifted_log_sum(logits)
    rows, top = np.arange(parts.terms.shape[0]), parts.top
    w = np.asarray(weight, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        p = _softmax(parts)
        at_target = p[rows, target] - 1.0
        # 1 - p_t = T1 / (1 + T1) = -expm1(-log1p(T1)) when the target is the row maximum
        at_target = np.where(target == top, np.expm1(-parts.log_t), at_target)
        p[rows, target] = at_target
        p *= w[:, None]
        p[w == 0] = 0.0  # an ignored row, also one whose every entry is masked (NaN p)
        return p


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
