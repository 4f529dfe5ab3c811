"""D's values as an ordered integer line, for searching them: adjacent keys are adjacent
values of D, so a bisection over keys visits every value a pipeline can be given."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .precision import FloatArray, Precision

_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class ValueLine:
    """D's values as an ordered integer line: key k >= 0 is the value whose bit pattern is
    k, key -k is its negation. Adjacent keys are adjacent values of D (+0 and -0 are one).
    Keys run up to D's largest finite number's: the patterns above it are inf and NaN (in
    float8_e4m3fn, the one above 448, 0x7F, is NaN: the format has no infinity)."""

    def __init__(self, precision: Precision) -> None:
        self.precision = precision
        self.unsigned = _UNSIGNED[precision.dtype.itemsize]
        self.sign_bit = 1 << (8 * precision.dtype.itemsize - 1)
        self.top = self._key(precision.max)

    def _key(self, value: float) -> int:
        bits = int(np.array(value, dtype=np.float64).astype(self.precision.dtype)
                   .view(self.unsigned))
        return -(bits & ~self.sign_bit) if bits & self.sign_bit else bits

    def values(self, keys: Sequence[int]) -> FloatArray:
        k = np.asarray(keys, dtype=np.int64)
        magnitude = np.abs(k).astype(self.unsigned).view(self.precision.dtype)
        return np.where(k < 0, -1.0, 1.0) * magnitude.astype(np.float64)

    def value(self, key: int) -> float:
        return float(self.values([key])[0])

    def key_below(self, x: float) -> int:
        """The key of the largest value of D at most ``x`` (clipped to D's finite range)."""
        if x >= self.precision.max:
            return self.top
        if x <= -self.precision.max:
            return -self.top
        key = self._key(x)
        return key - 1 if self.value(key) > x else key

    def key_above(self, x: float) -> int:
        """The key of the smallest value of D at least ``x`` (clipped)."""
        return -self.key_below(-x)
