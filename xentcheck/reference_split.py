"""The reference over a row too wide for one block, column chunk by column chunk.

The same arithmetic as :mod:`xentcheck.reference`, in passes over the row's chunks (each a
multiple of the summation chunk wide, :mod:`xentcheck.chunking`): the row's maximum, then
the differences and the largest term, then the sums. Every row reduction of the reference
is defined chunk-wise, so the values are identical to the whole row's, with the same proven
accuracy; only one chunk's temporaries are held at a time.

A chunk source is a callable returning, on each call, the row's chunks in order as
``(first column, values, coefficients)``: values ``(1, w)``; the coefficients ``a`` of
:func:`~xentcheck.case.softmax_coefficients` for those columns, or None for integer labels
(whose target and weight are given).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np

from .case import target_coefficients
from .chunking import chunk_sums, combine_chunk_sums
from .pipelines import Block
from .precision import FloatArray
from .reference import (
    _EXACT_BINADE_GAP,
    _NARROW_SIGNIFICAND,
    _dd_chunk_pairs,
    _dd_combine,
    _extracted_parts,
    _extracted_total,
    _log1p_dd,
    _nonnegative_total,
    _significand_bits,
    _two_sum,
    log1p_ratio,
    sigmoid_gradients,
    sigmoid_losses,
    sigmoid_probability_losses,
)

Chunk = tuple[int, FloatArray, FloatArray | None]
Chunks = Callable[[], Iterable[Chunk]]


def _first_maximum(chunks: Chunks) -> tuple[int, FloatArray]:
    """The row's first maximum (first NaN, as ``np.argmax``): its column and value."""
    best_at, best = 0, None
    for start, x, _ in chunks():
        at = int(np.argmax(x[0]))
        value = x[0, at]
        if best is None or value > best or (np.isnan(value) and not np.isnan(best)):
            best_at, best = start + at, value
    assert best is not None, "a row has at least one class"
    return best_at, best


def _concat(parts: list[FloatArray]) -> FloatArray:
    return np.concatenate(parts, axis=-1)


@dataclass(frozen=True)
class SplitSoftmax:
    """A wide row's softmax reference: what :class:`~xentcheck.reference.ShiftedLogSum`
    holds, less the per-class arrays, which :meth:`chunk_terms` recomputes for a chunk."""

    top: int
    m: float
    exact: bool  # every difference x - m exact in float64: no low parts
    carried: bool  # some difference was not: the terms carry first-order corrections
    t_hi: FloatArray
    log_t: FloatArray
    losses: FloatArray
    total_a: FloatArray | None  # dense coefficients: their sum, and their value at the top
    a_top: FloatArray | None

    def chunk_terms(self, start: int, x: FloatArray) -> tuple[FloatArray, FloatArray | None,
                                                              FloatArray]:
        """``d_hi``, ``d_lo`` and the terms of a chunk, exactly as the whole row has them."""
        return _chunk_terms(start, x, self.m, self.top, self.exact, self.carried)

    def gradient(self, start: int, x: FloatArray, coefficients: FloatArray | None,
                 target: FloatArray, weight: FloatArray) -> FloatArray:
        """The reference gradient's chunk (see :func:`~xentcheck.reference.softmax_gradients`
        and :func:`~xentcheck.reference.softmax_index_gradients`)."""
        _, _, terms = self.chunk_terms(start, x)
        at_top = start <= self.top < start + x.shape[1]
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            scale = 1.0 / (1.0 + self.t_hi)
            p = terms * scale[:, None]
            if at_top:
                p[0, self.top - start] = scale[0]
            if coefficients is None:
                column = int(target[0]) - start
                if 0 <= column < x.shape[1]:
                    p[0, column] = (np.expm1(-self.log_t[0]) if int(target[0]) == self.top
                                    else p[0, column] - 1.0)
                w = np.asarray(weight, dtype=np.float64)
                p *= w[:, None]
                p[w == 0] = 0.0  # as the whole row: ignored, or every entry masked (NaN p)
                return p
            assert self.total_a is not None and self.a_top is not None
            a = np.asarray(coefficients, dtype=np.float64)
            p *= self.total_a[:, None]
            p -= a
            if at_top:
                others = self.total_a - self.a_top
                p[0, self.top - start] = (others + self.total_a * np.expm1(-self.log_t))[0]
            p[self.total_a == 0] = 0.0  # as the whole row: no weight, gradient 0
            return p


def _chunk_terms(start: int, x: FloatArray, m: float, top: int, exact: bool,
                 carried: bool) -> tuple[FloatArray, FloatArray | None, FloatArray]:
    with np.errstate(invalid="ignore", over="ignore"):
        d_lo: FloatArray | None = None
        if exact:
            d_hi = np.subtract(x, np.float64(m), dtype=np.float64)
        else:
            d_hi, d_lo = _two_sum(np.asarray(x, dtype=np.float64), np.full((1, 1), -m))
            d_lo[~np.isfinite(d_hi)] = 0.0
        terms = np.exp(d_hi)
        if start <= top < start + x.shape[1]:
            terms[0, top - start] = 0.0
        if carried and d_lo is not None:
            terms += terms * d_lo
    return d_hi, d_lo, terms


def _row_exact(chunks: Chunks) -> bool:
    """:func:`~xentcheck.reference._differences_exact` for the whole row, chunk by chunk:
    no non-zero finite magnitude more than ``2**27`` below the largest finite one; ``-inf``
    (a masked entry) minus a finite maximum is ``-inf`` exactly, while ``+inf`` or NaN
    take the general path."""
    largest, smallest = 0.0, np.inf
    for _, x, _ in chunks():
        if _significand_bits(x.dtype) > _NARROW_SIGNIFICAND:
            return False
        magnitude = np.abs(x).astype(np.float32, copy=False)
        finite = np.isfinite(magnitude)
        if not finite.all() and (np.isnan(magnitude).any()
                                 or bool(np.any(~finite & (np.asarray(x) > 0)))):
            return False
        largest = max(largest, float(np.max(magnitude, where=finite, initial=0.0)))
        nonzero = magnitude[finite & (magnitude > 0)]
        if nonzero.size:
            smallest = min(smallest, float(nonzero.min()))
    return not smallest < largest * 2.0**-_EXACT_BINADE_GAP


def split_softmax(chunks: Chunks, classes: int, target: FloatArray | None = None,
                  weight: FloatArray | None = None) -> SplitSoftmax:
    """The reference loss of one wide row of logits, as
    :func:`~xentcheck.reference.softmax_losses` (dense coefficients from the chunks) or
    :func:`~xentcheck.reference.softmax_index_losses` (``target`` and ``weight``, ``(1,)``)
    computes it for the whole row."""
    top, top_value = _first_maximum(chunks)
    m = float(np.float64(top_value))
    exact = _row_exact(chunks)
    carried, largest_term = False, np.zeros(1)
    gap_hi, gap_lo = np.zeros(1), np.zeros(1)
    for start, x, _ in chunks():
        d_hi, d_lo, terms = _chunk_terms(start, x, m, top, exact, carried=False)
        carried |= d_lo is not None and bool(d_lo.any())
        largest_term = np.maximum(largest_term, terms.max(axis=-1))
        if target is not None and start <= int(target[0]) < start + x.shape[1]:
            gap_hi = -d_hi[:, int(target[0]) - start]
            gap_lo = np.zeros(1) if d_lo is None else -d_lo[:, int(target[0]) - start]
    high_sum, low_sums, term_pairs = np.zeros(1), [], []
    dense_pairs, a_sums, a_top = [], [], None
    for start, x, a in chunks():
        d_hi, d_lo, terms = _chunk_terms(start, x, m, top, exact, carried=False)
        with np.errstate(invalid="ignore", over="ignore"):
            if carried:
                assert d_lo is not None
                term_pairs.append(_dd_chunk_pairs(terms, terms * d_lo))
            else:
                high, low = _extracted_parts(terms, largest_term, classes)
                high_sum = high_sum + high
                low_sums.append(low)
            if a is not None:
                a = np.asarray(a, dtype=np.float64)
                weighted = a > 0
                dense_pairs.append(_dd_chunk_pairs(
                    np.where(weighted, a * -d_hi, 0.0),
                    None if d_lo is None or not carried else np.where(weighted, a * -d_lo, 0.0)))
                a_sums.append(chunk_sums(a))
                if start <= top < start + x.shape[1]:
                    a_top = a[:, top - start]
    with np.errstate(invalid="ignore", over="ignore"):
        if carried:
            t_hi, t_lo = _dd_combine(_concat([p[0] for p in term_pairs]),
                                     _concat([p[1] for p in term_pairs]))
        else:
            t_hi, t_lo = _extracted_total(high_sum, _concat(low_sums))
        log_t = _log1p_dd(t_hi, t_lo)
        total_a = None
        if target is not None:
            assert weight is not None
            w = np.asarray(weight, dtype=np.float64)
            losses = np.where(w > 0, w * gap_hi + (w * gap_lo + w * log_t), 0.0)
        else:
            s_hi, s_lo = _dd_combine(_concat([p[0] for p in dense_pairs]),
                                     _concat([p[1] for p in dense_pairs]))
            total_a = combine_chunk_sums(_concat(a_sums))
            losses = _nonnegative_total(s_hi, s_lo, total_a * log_t)
    return SplitSoftmax(top, m, exact, carried, t_hi, log_t, losses, total_a, a_top)


def split_probability_losses(chunks: Chunks) -> FloatArray:
    """:func:`~xentcheck.reference.softmax_probability_losses` of one wide row."""
    top, _ = _first_maximum(chunks)
    total, rest, weighted = [], [], []
    for start, x, _ in chunks():
        p = np.asarray(x, dtype=np.float64)
        total.append(_dd_chunk_pairs(p, None))
        if start <= top < start + p.shape[1]:
            p = p.copy()
            p[0, top - start] = 0.0
        rest.append(_dd_chunk_pairs(p, None))
    total_hi, total_lo = _dd_combine(_concat([t[0] for t in total]),
                                     _concat([t[1] for t in total]))
    rest_hi, rest_lo = _dd_combine(_concat([r[0] for r in rest]), _concat([r[1] for r in rest]))
    for start, x, a in chunks():
        p = np.asarray(x, dtype=np.float64)
        coefficients = np.asarray(a, dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            r_hi, r_lo = _two_sum(total_hi[:, None], -p)
            remainder = r_hi + (r_lo + total_lo[:, None])
            if start <= top < start + p.shape[1]:
                remainder[0, top - start] = (rest_hi + rest_lo)[0]
            terms = log1p_ratio(remainder, p)
            weighted.append(_dd_chunk_pairs(
                np.where(coefficients > 0, coefficients * terms, 0.0), None))
    hi, lo = _dd_combine(_concat([w[0] for w in weighted]), _concat([w[1] for w in weighted]))
    result: FloatArray = hi + lo
    return result


# -- blocks ------------------------------------------------------------------------------------


def split_row_reference(block: Block, gradient_scale: float,
                        prepare: Callable[[Block], Block] | None = None) -> tuple[
        FloatArray, Callable[[Block], FloatArray | None]]:
    """A row run in column chunks (a block of one row, ``split`` set): its reference losses
    and a function giving the reference gradient of the loss times ``gradient_scale`` for a
    chunk (None where there is none), each identical to
    :func:`xentcheck.evaluator.reference_block`'s for the row whole. ``prepare`` maps each
    chunk before use (to round its inputs to a dtype, one chunk at a time); the losses are
    then those of the prepared chunks (its case, with its class weights, is theirs)."""
    assert len(block.labels) == 1, "only a row wider than a block is split"
    if block.case.spec.has_options and block.case.spec.from_logits:
        return _whole_row_with_options(block, gradient_scale, prepare)

    def prepared() -> Iterator[Block]:
        for chunk in block.column_chunks():
            yield chunk if prepare is None else prepare(chunk)

    first = next(prepared())
    case = first.case
    spec = case.spec
    if spec.family == "sigmoid":
        parts = [_sigmoid_losses(chunk) for chunk in prepared()]
        return np.concatenate(parts, axis=-1), _sigmoid_gradient_chunk(gradient_scale)
    # integer labels without smoothing: the target and its weight (probabilities: every a_c)
    sparse = case.label_kind == "index" and not spec.label_smoothing and spec.from_logits

    def chunks() -> Iterator[Chunk]:
        for chunk in prepared():
            start = chunk.columns[0] if chunk.columns is not None else 0
            yield start, chunk.logits, None if sparse else chunk.softmax_coefficients()

    if not spec.from_logits:
        return split_probability_losses(chunks), lambda chunk: None
    target = first.target
    weight = target_coefficients(case, first.labels)
    row = split_softmax(chunks, case.classes, target if sparse else None,
                        weight if sparse else None)
    return row.losses, _softmax_gradient_chunk(row, target, weight, sparse, gradient_scale)


def _whole_row_with_options(block: Block, gradient_scale: float,
                            prepare: Callable[[Block], Block] | None) -> tuple[
        FloatArray, Callable[[Block], FloatArray | None]]:
    """With loss options the reference takes the row whole (its transformed logits as
    double-double pairs: a dozen float64 copies of one row), and hands the gradient out
    chunk by chunk."""
    from .evaluator import reference_block  # the evaluator imports this module

    whole = replace(block, split=None)
    if prepare is not None:
        whole = prepare(whole)
    losses, grad = reference_block(whole, gradient=prepare is None,
                                   gradient_scale=gradient_scale)

    def gradient(chunk: Block) -> FloatArray | None:
        if grad is None:
            return None
        start, stop = chunk.columns or (0, grad.shape[-1])
        return grad[:, start:stop]

    return losses, gradient


def _softmax_gradient_chunk(row: SplitSoftmax, target: FloatArray, weight: FloatArray,
                            sparse: bool, scale: float) -> Callable[[Block], FloatArray | None]:
    def gradient(chunk: Block) -> FloatArray | None:
        start = chunk.columns[0] if chunk.columns is not None else 0
        if sparse:
            return row.gradient(start, chunk.logits, None, target, weight * scale)
        grad = row.gradient(start, chunk.logits, chunk.softmax_coefficients(), target, weight)
        grad *= scale
        return grad
    return gradient


def _sigmoid_gradient_chunk(scale: float) -> Callable[[Block], FloatArray | None]:
    def gradient(chunk: Block) -> FloatArray | None:
        spec = chunk.case.spec
        if not spec.from_logits:
            return None
        pos = None if spec.pos_weight is None else chunk.per_class(spec.pos_weight)
        weights = None if spec.class_weights is None else chunk.per_class(spec.class_weights)
        grad = np.where(chunk.valid_elements, sigmoid_gradients(
            chunk.logits, chunk.labels, pos, weights), 0.0)
        grad *= scale
        return grad
    return gradient


def _sigmoid_losses(chunk: Block) -> FloatArray:
    spec = chunk.case.spec
    loss_fn = sigmoid_losses if spec.from_logits else sigmoid_probability_losses
    pos = None if spec.pos_weight is None else chunk.per_class(spec.pos_weight)
    weights = None if spec.class_weights is None else chunk.per_class(spec.class_weights)
    losses = loss_fn(chunk.logits, chunk.labels, pos, weights)
    return np.where(chunk.valid_elements, losses, 0.0)
