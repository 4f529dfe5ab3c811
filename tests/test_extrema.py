"""Maxima and minima of narrow float arrays through float32 (xentcheck.extrema): the same
values as numpy's own (slow) reductions in the array's dtype, NaN and signed zeros included."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest

from xentcheck import extrema

NARROW = [np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]


def every_pattern(dtype: Any) -> np.ndarray:
    """Every value of a 16- or 8-bit format, shuffled into rows of 64 (of 4 for 8 bits)."""
    bits = np.uint16 if np.dtype(dtype).itemsize == 2 else np.uint8
    values = np.arange(1 << (8 * np.dtype(dtype).itemsize), dtype=np.uint64).astype(bits)
    values = np.random.default_rng(3).permutation(values).view(dtype)
    return values.reshape(-1, 64 if np.dtype(dtype).itemsize == 2 else 4)


def same(ours: Any, numpys: Any) -> None:
    a, b = np.asarray(ours), np.asarray(numpys)
    assert a.dtype == b.dtype and a.shape == b.shape
    wide_a, wide_b = a.astype(np.float64), b.astype(np.float64)
    assert np.array_equal(wide_a, wide_b, equal_nan=True)
    numbers = ~np.isnan(wide_b)  # zeros keep their sign; a NaN's is free
    assert np.array_equal(np.signbit(wide_a[numbers]), np.signbit(wide_b[numbers]))


@pytest.mark.parametrize("dtype", NARROW)
def test_every_value_of_the_format(dtype: Any) -> None:
    rows = every_pattern(dtype)
    with np.errstate(invalid="ignore"):  # ml_dtypes' reductions warn on NaN
        for axis in (-1, 0):
            same(extrema.maximum(rows, axis=axis), np.max(rows, axis=axis))
            same(extrema.minimum(rows, axis=axis), np.min(rows, axis=axis))
        same(extrema.maximum(rows, axis=-1, keepdims=True), np.max(rows, -1, keepdims=True))
        # the NaN-free rows carry the answer: a NaN would hide the comparisons
        clean = rows[~np.isnan(rows.astype(np.float32)).any(axis=-1)]
        assert len(clean) > 10
        same(extrema.maximum(clean, axis=-1), np.max(clean, axis=-1))
        same(extrema.minimum(clean, axis=-1), np.min(clean, axis=-1))
        same(extrema.maximum(clean), np.max(clean))
        same(extrema.minimum(clean), np.min(clean))
        same(extrema.maximum(rows), np.max(rows))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_signed_zeros_and_masks(dtype: Any) -> None:
    x = np.array([[0.0, -0.0, -1.0], [-0.0, 0.0, -2.0], [-np.inf, -np.inf, -np.inf],
                  [3.0, -np.inf, 2.5]], dtype=dtype)
    for axis in (None, -1):
        same(extrema.maximum(x, axis=axis), np.max(x, axis=axis))
        same(extrema.minimum(x, axis=axis), np.min(x, axis=axis))
    masked = x == -np.inf
    same(extrema.minimum(x, axis=-1, where=~masked, initial=np.inf),
         np.min(x, axis=-1, where=~masked, initial=np.inf))
    same(extrema.minimum(x, where=~masked, initial=np.inf),
         np.min(x, where=~masked, initial=np.inf))


def test_whole_arrays_are_reduced_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    # the float32 copy of a large chunk is made a slice at a time; the NaN of a late slice
    # and the maximum of a middle one still come through
    monkeypatch.setattr(extrema, "_SLICE_VALUES", 7)
    x = np.linspace(-5, 5, 100).astype(ml_dtypes.bfloat16).reshape(10, 10)
    x[4, 4] = 40
    same(extrema.maximum(x), np.max(x))
    same(extrema.minimum(x), np.min(x))
    same(extrema.maximum(x, keepdims=True), np.max(x, keepdims=True))
    x[9, 8] = np.nan
    with np.errstate(invalid="ignore"):
        assert np.isnan(float(extrema.maximum(x))) and np.isnan(float(np.max(x)))


def test_wide_formats_and_empty_arrays_are_numpys() -> None:
    x = np.array([[1.5, -2.0], [np.nan, 0.0]])
    same(extrema.maximum(x, axis=-1), np.max(x, axis=-1))
    same(extrema.minimum(x.astype(np.float32), axis=0), np.min(x.astype(np.float32), axis=0))
    for dtype in (np.float64, ml_dtypes.bfloat16):
        with pytest.raises(ValueError, match="zero-size"):
            extrema.maximum(np.zeros(0, dtype=dtype))
