"""Row sums whose value does not depend on how a row is split across its classes.

numpy's pairwise sum over a row follows a tree that depends on the row's length, so the sum
of a row's pieces merged afterwards generally differs from ``np.sum`` over the whole row in
the last bit. Every row reduction of the pipelines and of the reference is therefore
*defined* chunk-wise for rows wider than :data:`SUM_CHUNK` values: each ``SUM_CHUNK``-aligned
chunk is summed by numpy's pairwise sum, and the chunk sums are then summed pairwise, in
order. A row that is split into pieces (at multiples of ``SUM_CHUNK``) runs exactly the same
arithmetic, so its results are identical; a row of at most ``SUM_CHUNK`` values is summed
exactly as before. The error bound is that of a pairwise sum of pairwise sums: at most
``(log2(K) + log2(C / K) + 2) u`` times the sum of the magnitudes, i.e. the usual
``O(log2 C) u`` of a pairwise sum (N. J. Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., section 4.2).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike

from .precision import FloatArray

# Values per summation chunk: a power of two, so that chunks stay aligned with the blocks'
# column pieces (multiples of it).
SUM_CHUNK = 1 << 16


def chunk_sums(x: FloatArray, dtype: DTypeLike | None = None) -> FloatArray:
    """``(..., m)``: numpy's pairwise sum of each ``SUM_CHUNK``-aligned chunk of the last
    axis (the last chunk may be shorter), in ``x``'s own dtype (or ``dtype``, as
    ``np.sum``'s)."""
    x = np.asarray(x)
    width, size = x.shape[-1], SUM_CHUNK
    out = np.empty((*x.shape[:-1], -(-width // size)), dtype=dtype or x.dtype)
    for k, start in enumerate(range(0, width, size)):
        # a view per chunk: no copy of the rows, whatever their strides
        out[..., k] = np.sum(x[..., start:start + size], axis=-1, dtype=dtype)
    return out


def combine_chunk_sums(sums: FloatArray) -> FloatArray:
    """The row sums from the chunk sums of :func:`chunk_sums` (all of a row's, in order)."""
    return np.sum(np.ascontiguousarray(sums), axis=-1)


def row_sum(x: FloatArray, *, keepdims: bool = False, dtype: DTypeLike | None = None) -> FloatArray:
    """The sum of the last axis as defined above: ``np.sum`` up to ``SUM_CHUNK`` values,
    else the pairwise sum of the chunks' pairwise sums."""
    x = np.asarray(x)
    if x.shape[-1] <= SUM_CHUNK:
        return np.sum(x, axis=-1, keepdims=keepdims, dtype=dtype)
    total = combine_chunk_sums(chunk_sums(x, dtype))
    return total[..., None] if keepdims else total
