"""Maxima and minima of arrays in narrow float formats, at the speed of float32's.

numpy reduces float16 and ml_dtypes' formats (bfloat16, fp8) one value at a time through
their scalar comparisons: a bfloat16 ``max`` costs about 4 ns a value against 0.15 for
float32, and about 0.5 through a float32 copy (``bench/bench_lm.py`` prints all three;
float16's is slower still). Every value of these formats is a float32 number, so the
reduction is done on a float32 copy and its result taken back to the array's dtype,
exactly: the same values, NaN propagating as numpy's own reduction propagates it (a zero
result, whose sign depends on the order the comparisons are made in, is left to numpy's
own reduction). A language model's bfloat16 logits go through several such reductions per
block (the input's checks and extremes, the row maxima of the shifted formulations), which
is why this exists.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .precision import FloatArray

# Values per float32 copy: a bounded temporary (4 MiB) whatever the array's size.
_SLICE_VALUES = 1 << 20


def _narrow(array: FloatArray) -> bool:
    """A floating format narrower than float32 (float16, bfloat16, fp8)."""
    dtype = array.dtype
    return dtype.itemsize < 4 and (dtype.kind == "f" or dtype.type.__module__ == "ml_dtypes")


def _reduce(function: Any, values: Any, axis: int | None, keepdims: bool,
            **where: Any) -> FloatArray:
    array = np.asarray(values)
    if not _narrow(array):
        return np.asarray(function(array, axis=axis, keepdims=keepdims, **where))
    with np.errstate(over="ignore"):  # a where= initial of +-inf is exact in every format
        if axis is None and not where:
            # the whole array, in slices: the float32 copy stays small; NaN propagates
            # through the combination as through numpy's own reduction
            flat = array.reshape(-1)
            if not flat.size:
                return np.asarray(function(flat))  # numpy's own error for an empty array
            parts = [function(flat[i:i + _SLICE_VALUES].astype(np.float32))
                     for i in range(0, flat.size, _SLICE_VALUES)]
            reduced = np.asarray(function(np.asarray(parts, dtype=np.float32)))
            if keepdims:
                reduced = reduced.reshape((1,) * array.ndim)
        else:
            reduced = np.asarray(function(array.astype(np.float32), axis=axis,
                                          keepdims=keepdims, **where))
    if (reduced == 0).any():
        # +0 and -0 tie: numpy's loop in the array's dtype keeps the first it meets, the
        # vectorised float32 one may keep the other. A zero extreme is rare in logits (a row
        # maximum of exactly 0): numpy's own reduction decides it, the slow way.
        return np.asarray(function(array, axis=axis, keepdims=keepdims, **where))
    return reduced.astype(array.dtype)


def maximum(values: Any, axis: int | None = None, *, keepdims: bool = False) -> FloatArray:
    """``np.max(values, axis, keepdims=keepdims)``, in ``values``' dtype, the same result."""
    return _reduce(np.max, values, axis, keepdims)


def minimum(values: Any, axis: int | None = None, *, keepdims: bool = False,
            where: Any = None, initial: float | None = None) -> FloatArray:
    """``np.min(values, axis, keepdims=keepdims[, where=where, initial=initial])``, in
    ``values``' dtype, the same result."""
    masked = {} if where is None else {"where": where, "initial": initial}
    return _reduce(np.min, values, axis, keepdims, **masked)
