"""Precision: the storage dtype a pipeline computes in, and how its reductions accumulate.

The model is eager PyTorch on half tensors: inputs are rounded to the storage dtype D,
every elementwise step computes in at least float32 and rounds its result to D, and a
reduction accumulates in the accumulate dtype before rounding its result to D.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import ml_dtypes
import numpy as np
import numpy.typing as npt

from .errors import UsageError

FloatArray = npt.NDArray[Any]
# An operand of a pipeline step: an array, or a constant of the formulation such as 1.0.
Operand = FloatArray | float

STORAGE_DTYPES: dict[str, np.dtype[Any]] = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES: tuple[str, ...] = tuple(STORAGE_DTYPES)
# The dtypes run when none is named: the 8-bit formats run when named.
DEFAULT_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")
# All exponent bits set means inf or NaN.
_EXPONENT_MASKS = {"float16": 0x7C00, "bfloat16": 0x7F80}

_HALF_MIN_NORMAL = np.float32(2.0**-14)
_HALF_OVERFLOW = np.float32(65520.0)  # float16's largest, 65504, plus half an ulp
_HALF_GRID = np.float32(0.5)  # its float32 spacing, 2**-24, is float16's subnormal spacing


def _round_to_half(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """float32 values rounded to the nearest float16 number (ties to even), in float32.

    Normal results: adding ``0xFFF`` plus the lowest kept bit to the bit pattern and clearing
    the 13 dropped bits rounds the significand to 11 bits, ties to even, a carry moving into
    the exponent. Below float16's smallest normal number the spacing is fixed at ``2**-24``:
    ``(|x| + 0.5) - 0.5`` rounds to it in float32 arithmetic (exact subtraction, Sterbenz).
    From 65520 on (and NaN) the result is ``inf`` (NaN). Identical to
    ``x.astype(float16).astype(float32)`` on every float32 input, NaN payloads aside.
    """
    bits = x.view(np.uint32)
    rounded = (bits >> np.uint32(13)) & np.uint32(1)
    rounded += np.uint32(0xFFF)
    rounded += bits
    rounded &= np.uint32(0xFFFFE000)
    out = rounded.view(np.float32)
    magnitude = np.abs(x)
    beyond = ~(magnitude < _HALF_OVERFLOW)  # NaN included
    subnormal = magnitude < _HALF_MIN_NORMAL
    # Both fixes are written through ``where=``: no gathers, however many values need them
    # (all of a row's probabilities are float16-subnormal beyond 16,384 classes).
    if subnormal.any():
        magnitude += _HALF_GRID  # every value; only the subnormal ones are kept below
        magnitude -= _HALF_GRID
        np.copysign(magnitude, x, out=out, where=subnormal)
    if beyond.any():
        np.multiply(x, np.float32(np.inf), out=out, where=beyond)  # +-inf; NaN stays NaN
    return out


def _float64_to_odd_float32(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """float64 values rounded to float32 *to odd*: exact values stay; any other value becomes
    whichever of its two float32 neighbours has an odd last significand bit.

    Rounding to odd into a format with at least two more significand bits than the target,
    then to nearest even into the target, is one correct rounding of the original (Boldo and
    Melquiond, "Emulation of FMA and correctly rounded sums: proved algorithms using rounding
    to odd", IEEE Trans. Computers 57(4), 462-471, 2008). float32 carries 24 bits where
    bfloat16 has 8, at every exponent bfloat16 has (subnormals included: the two formats
    share their exponent range), and 4 (float8_e4m3fn) or 3 (float8_e5m2) bits at exponents
    well inside float32's normal range. ``astype`` rounds to nearest; an inexact result with an
    even last bit is moved one step towards ``x`` (float32 bit patterns of one sign are
    consecutive integers, so that step lands on the odd neighbour, across binades too). A
    value beyond float32's range becomes its largest finite number (odd, and far beyond
    the narrower formats' overflow thresholds), so it still overflows in the second rounding.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        nearest = x.astype(np.float32)
        inexact = nearest.astype(np.float64) != x
        inexact &= ~np.isnan(x)
    bits = nearest.view(np.uint32).copy()
    even = (bits & np.uint32(1)) == 0
    step = inexact & even
    if step.any():
        towards_larger = np.abs(x) > np.abs(nearest.astype(np.float64))
        bits[step & towards_larger] += np.uint32(1)
        bits[step & ~towards_larger] -= np.uint32(1)
    return bits.view(np.float32)


def _integers_to_odd_float64(x: FloatArray) -> npt.NDArray[np.float64]:
    """Integers as float64, rounded to odd beyond 2**53 (exact below): ``x = hi + lo`` with
    ``lo`` the low 32 bits, both exact in float64; their sum is rounded to nearest and
    its rounding error, found by TwoSum, decides the step to the odd neighbour."""
    wide = x.astype(np.int64 if x.dtype.kind == "i" else np.uint64, copy=False)
    low_bits = wide & wide.dtype.type(0xFFFFFFFF)
    high = (wide - low_bits).astype(np.float64)  # at most 32 significant bits: exact
    low = low_bits.astype(np.float64)
    total = high + low
    b_virtual = total - high
    error = (high - (total - b_virtual)) + (low - b_virtual)  # Knuth's TwoSum: exact
    bits = total.view(np.uint64).copy()
    step = (error != 0) & ((bits & np.uint64(1)) == 0)
    if step.any():
        towards_larger = (error > 0) == (total > 0)
        bits[step & towards_larger] += np.uint64(1)
        bits[step & ~towards_larger] -= np.uint64(1)
    return bits.view(np.float64)


AccumulateName = Literal["default", "same", "float32", "float64"]
ACCUMULATE_CHOICES: tuple[str, ...] = ("default", "same", "float32", "float64")

# Default tolerance: a relative error of this many machine epsilons of D (8 to 16 units in
# the last place, depending on where in its binade the loss falls). That admits the handful
# of roundings a well-conditioned formulation makes, plus the slow growth of a pairwise sum,
# and flags a formulation that lost more than three or four of D's bits.
DEFAULT_TOLERANCE_EPS = 8.0
# The 8-bit formats carry 3 (e4m3fn) or 2 (e5m2) stored bits: 8 eps would be a relative error
# of 1 or 2, which passes anything. 2 eps (0.25 and 0.5) admits the final rounding of the
# loss (up to eps / 2) and the rounding of the log-sum-exp it is computed from (stable's loss
# of [1, 2, 3], label 0, in e4m3fn is 2.5 for 2.4076: 0.3 eps; bench/fp8_errors.py measures
# at most 0.85 eps on well-conditioned rows), and flags a result that kept no correct bit.
FP8_TOLERANCE_EPS = 2.0


@dataclass(frozen=True)
class Precision:
    """Storage dtype ``name`` with reductions accumulating per ``accumulate``.

    ``accumulate`` is ``"default"`` (float32 for 16-bit storage, D itself otherwise, both
    summed pairwise as numpy and PyTorch's CPU kernels do), ``"float32"``/``"float64"``
    (pairwise in that dtype), or ``"same"`` (a plain running sum in D, the worst case, where a
    bfloat16 sum of ones stalls at 256).
    """

    name: str
    accumulate: AccumulateName = "default"

    def __post_init__(self) -> None:
        if self.name not in STORAGE_DTYPES:
            raise UsageError(
                f"unknown dtype {self.name!r}; choose from {', '.join(DTYPE_NAMES)}"
            )
        if self.accumulate not in ACCUMULATE_CHOICES:
            raise UsageError(
                f"unknown accumulate dtype {self.accumulate!r}; "
                f"choose from {', '.join(ACCUMULATE_CHOICES)}"
            )

    @property
    def dtype(self) -> np.dtype[Any]:
        return STORAGE_DTYPES[self.name]

    @property
    def storage_dtype(self) -> np.dtype[Any]:
        """The dtype arrays of D's values are held in.

        float16 values are held in float32 arrays: numpy converts float16 one value at a time
        (about 3 ns a value each way, every step paying both), while rounding within float32
        (:func:`_round_to_half`) is vectorised and checked against numpy's conversion on all
        2**32 float32 inputs. Every other format is held in its own dtype.
        """
        return np.dtype(np.float32) if self.name == "float16" else self.dtype

    @property
    def is_16bit(self) -> bool:
        return self.dtype.itemsize == 2

    @property
    def is_fp8(self) -> bool:
        """One of the 8-bit formats (``float8_e4m3fn``, ``float8_e5m2``)."""
        return self.dtype.itemsize == 1

    @property
    def is_narrow(self) -> bool:
        """Narrower than float32: computed in float32, rounded to D step by step."""
        return self.dtype.itemsize <= 2

    @property
    def has_inf(self) -> bool:
        """Whether D has infinities. float8_e4m3fn has none: its all-ones pattern is NaN
        and everything that rounds past its largest number, 448, becomes NaN (infinities
        included), so its overflow gives NaN."""
        return self.name != "float8_e4m3fn"

    @property
    def compute_dtype(self) -> np.dtype[Any]:
        """Where elementwise steps are evaluated before rounding to D.

        float32 carries more than twice the significand of float16, bfloat16 and the 8-bit
        formats plus two bits, so a basic operation evaluated there and rounded to D is
        correctly rounded (Figueroa, "When is double rounding innocuous?", SIGNUM Newsletter
        30(3), 1995: p' >= 2p + 2 suffices for +, -, *, / and sqrt).
        """
        return np.dtype(np.float32) if self.is_narrow else self.dtype

    @property
    def sequential_sum(self) -> bool:
        return self.accumulate == "same"

    @property
    def accumulate_dtype(self) -> np.dtype[Any]:
        if self.accumulate in ("float32", "float64"):
            return np.dtype(self.accumulate)
        if self.accumulate == "default":
            return self.compute_dtype
        return self.compute_dtype  # "same": each partial sum is rounded to D explicitly

    @property
    def accumulate_label(self) -> str:
        """The accumulate dtype as reported (``same`` is reported as D's own name)."""
        if self.accumulate == "same":
            return self.name
        return str(self.accumulate_dtype)

    @cached_property
    def _finfo(self) -> Any:
        return ml_dtypes.finfo(self.dtype)  # type: ignore[no-untyped-call]

    @property
    def max(self) -> float:
        return float(self._finfo.max)

    @property
    def tiny(self) -> float:
        """Smallest positive normal number."""
        return float(self._finfo.tiny)

    @property
    def smallest_subnormal(self) -> float:
        return float(self._finfo.smallest_subnormal)

    @property
    def eps(self) -> float:
        return float(self._finfo.eps)

    @property
    def mantissa_bits(self) -> int:
        """Explicitly stored significand bits (10 for float16, 7 for bfloat16)."""
        return int(self._finfo.nmant)

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal number (-14 for float16)."""
        return int(self._finfo.minexp)

    def default_rel_tolerance(self) -> float:
        """8 eps of D; for the 8-bit formats 2 eps (see :data:`FP8_TOLERANCE_EPS`)."""
        return (FP8_TOLERANCE_EPS if self.is_fp8 else DEFAULT_TOLERANCE_EPS) * self.eps

    def all_finite(self, values: FloatArray) -> bool:
        """Whether every value (an array in D) is finite.

        For 16-bit formats the exponent bits are tested directly: an order of magnitude
        faster than ``np.isfinite``, which converts each half-precision value first.
        """
        array = np.asarray(values)
        if array.dtype == self.dtype and self.is_16bit:
            mask = _EXPONENT_MASKS[self.name]
            return bool(array.size == 0 or (array.view(np.uint16) & mask).max() < mask)
        return bool(np.isfinite(array).all())

    # Element-wise tests. numpy converts each half-precision value to float32 before testing
    # it; for arrays in a 16-bit D the bits are tested directly (12x faster for float16).

    def _bits(self, values: Operand) -> npt.NDArray[np.uint16] | None:
        array = np.asarray(values)
        if self.is_16bit and array.dtype == self.dtype:
            return array.view(np.uint16) & np.uint16(0x7FFF)  # magnitude bits
        return None

    def isfinite(self, values: Operand) -> FloatArray:
        bits = self._bits(values)
        return np.isfinite(values) if bits is None else bits < _EXPONENT_MASKS[self.name]

    def isnan(self, values: Operand) -> FloatArray:
        bits = self._bits(values)
        return np.isnan(values) if bits is None else bits > _EXPONENT_MASKS[self.name]

    def isinf(self, values: Operand) -> FloatArray:
        bits = self._bits(values)
        return np.isinf(values) if bits is None else bits == _EXPONENT_MASKS[self.name]

    def iszero(self, values: Operand) -> FloatArray:
        bits = self._bits(values)
        return np.equal(values, 0) if bits is None else bits == 0

    def round(self, values: FloatArray) -> FloatArray:
        """Round to D once, correctly, from the values' own dtype (to nearest, ties to even;
        values from D's largest plus half an ulp on become ±inf; NaN stays NaN), held in
        :attr:`storage_dtype`.

        Conversions that would round twice are avoided: ml_dtypes (0.6) and PyTorch (2.13)
        take float64 to bfloat16 through float32, so ``1 + 2**-8 + 2**-40`` lands on the tie
        ``1 + 2**-8`` and then on 1.0 instead of 1.0078125; ml_dtypes does the same for the
        8-bit formats (``1 + 2**-4 + 2**-40`` becomes 1.0 in float8_e4m3fn, not 1.125).
        Here float64 reaches bfloat16 and the 8-bit formats through float32 rounded to odd
        (:func:`_float64_to_odd_float32`: float32 has at least two more bits than each, over
        their whole range); integers reach a narrower format through float64 rounded to odd
        (exact below 2**53). numpy's float64 to float16 conversion rounds once, from the
        bits; float32, float16, bfloat16 and the 8-bit formats fit in float32 exactly, so
        their conversions round once too.

        float8_e4m3fn has no infinity: a value past 448 plus half an ulp (464, a tie, rounds
        to the even 448), and ±inf, become NaN. float8_e5m2 rounds to ±inf from 61440
        (57344 plus half an ulp) on, as the IEEE formats do.
        """
        array = np.asarray(values)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            if array.dtype.kind in "iu" and self.dtype != np.float64:
                array = _integers_to_odd_float64(array)
            if (self.name == "bfloat16" or self.is_fp8) and array.dtype == np.float64:
                array = _float64_to_odd_float32(array)
            if self.storage_dtype == self.dtype:
                return array.astype(self.dtype, copy=False)
            if array.dtype == np.float32 and array.ndim:
                return _round_to_half(array)
            # any other dtype: numpy's own conversion, one rounding (float64 -> float32 ->
            # float16 would round twice)
            return array.astype(self.dtype).astype(self.storage_dtype)

    def ulp(self, values: FloatArray) -> FloatArray:
        """The spacing of D at ``|values|``, in float64 (D's smallest subnormal at 0).

        For x in [2**e, 2**(e+1)) the spacing is 2**(e - mantissa_bits); below the smallest
        normal it is the subnormal spacing 2**(min_exponent - mantissa_bits).
        """
        magnitude = np.abs(np.asarray(values, dtype=np.float64))
        with np.errstate(divide="ignore", invalid="ignore"):
            _, exponent = np.frexp(magnitude)  # magnitude = f * 2**exponent, f in [0.5, 1)
        binade = np.where(
            magnitude > 0, np.maximum(exponent.astype(np.int64) - 1, self.min_exponent),
            self.min_exponent,
        )
        spacing = np.ldexp(1.0, binade - self.mantissa_bits)
        return np.where(np.isfinite(magnitude), spacing, np.inf)


def precisions_for(
    dtypes: list[str] | tuple[str, ...], accumulate: str = "default"
) -> list[Precision]:
    """One Precision per dtype name, all with the same accumulate policy."""
    return [Precision(name, accumulate) for name in dtypes]  # type: ignore[arg-type]
