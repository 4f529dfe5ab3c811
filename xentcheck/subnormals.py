"""Flush-to-zero: subnormals replaced by zeros of their sign, as a CPU computes with the
FTZ and DAZ flags set. A :class:`~xentcheck.stages.StageRunner` whose library computes
that way (XLA's CPU code) rounds through :func:`flush_subnormals`."""

from __future__ import annotations

from typing import Any

import numpy as np

from .precision import FloatArray

_EXPONENT_FIELDS: dict[str, tuple[Any, int]] = {
    "bfloat16": (np.uint16, 0x7F80),
    "float32": (np.uint32, 0x7F800000),
    "float64": (np.uint64, 0x7FF0000000000000),
}


def flush_subnormals(values: FloatArray) -> FloatArray:
    """``values`` with every subnormal replaced by a zero of its sign, as a CPU computes with
    flush-to-zero and denormals-are-zero set (XLA's CPU code does). float16 arrays are left
    alone: their subnormals are normal float32 numbers, where float16 arithmetic happens."""
    array = np.asarray(values)
    field = _EXPONENT_FIELDS.get(array.dtype.name)
    if field is None or not array.size:
        return values
    view, exponent = field
    sign = view(1) << view(8 * array.dtype.itemsize - 1)
    magnitude = array.view(view) & ~sign
    smallest_normal = view(exponent & -exponent)
    if magnitude.min() >= smallest_normal:  # the common case: no zero, no subnormal
        return values
    with np.errstate(over="ignore"):  # a scalar's wrap-around warns where an array's is silent
        magnitude = magnitude - view(1)  # zeros wrap around to the top: only subnormals stay below
    subnormal = magnitude < smallest_normal - view(1)
    if not subnormal.any():
        return values
    return np.where(subnormal, array.view(view) & sign, array.view(view)).view(array.dtype)
