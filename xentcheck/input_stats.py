"""Input statistics: what a block of inputs looks like next to the pipelines' limits.

The extremes, the largest spread between a row's maximum and a logged class's logit, the
smallest logged logit (as given and rounded to each dtype, for the headrooms), whether rows
look like probability distributions, and the masked (``-inf``) entries; the same for a row
run in column chunks as for the row whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import extrema
from .chunking import chunk_sums, combine_chunk_sums, row_sum
from .findings import MaskedInputs
from .misuse import SUM_TOLERANCE, masked_inputs, merge_masked
from .pipelines import Block
from .precision import FloatArray, Precision


@dataclass(frozen=True)
class Extremes:
    """The input's extremes as a pipeline in D sees them (rounded to D, which is monotone:
    the rounded row maximum is the maximum of the rounded row), for the headrooms."""

    largest: float
    smallest: float
    spread: float | None  # row max minus a logged class's logit, largest over the rows
    # the smallest logit whose probability the formulation logs (softmax from logits)
    smallest_logged: float | None

    def merge(self, later: Extremes) -> Extremes:
        def most(a: float | None, b: float | None, pick: Callable[..., float]) -> float | None:
            return b if a is None else a if b is None else pick(a, b)

        return Extremes(max(self.largest, later.largest), min(self.smallest, later.smallest),
                         most(self.spread, later.spread, max),
                         most(self.smallest_logged, later.smallest_logged, min))


@dataclass(frozen=True)
class BlockStats:
    largest: float  # -inf where every entry is masked
    smallest: float  # the smallest unmasked entry; inf where every entry is masked
    spread: float | None  # row max minus a logged class's logit, largest over the block
    rows_sum_to_one: bool  # every value in [0, 1], every row summing to 1
    rounded: dict[str, Extremes] = field(default_factory=dict)  # per dtype name
    masked: MaskedInputs = field(default_factory=MaskedInputs)


def block_stats(block: Block, dtype_names: Sequence[str] = ()) -> BlockStats:
    """What the block's inputs look like: extremes, the largest spread, whether its rows
    look like probability distributions, its masked entries; and the extremes rounded to
    each named dtype.

    The spread and the smallest logged logit are over the classes whose log-probability a
    formulation takes: the target's with integer labels, every class's with one-hot or
    probability labels or label smoothing (``-sum(y * log p)`` logs every class, and
    ``0 * log 0`` is NaN). Masked entries (``-inf`` logits) are left out of all of them:
    their exp is an exact 0, so they bring a formulation no closer to its limits.
    """
    if block.split is not None:
        return _split_stats(block, dtype_names)
    x = np.asarray(block.logits)
    masked = block.masked
    top = extrema.maximum(x, axis=-1).astype(np.float64)  # no float64 copy of the block
    bottom = np.asarray(extrema.minimum(x, axis=-1) if masked is None
                        else extrema.minimum(x, axis=-1, where=~masked, initial=np.inf),
                        dtype=np.float64)
    largest, smallest = float(top.max()), float(bottom.min())
    distributions = masked is None and smallest >= 0 and largest <= 1 and bool(
        (np.abs(row_sum(x, dtype=np.float64) - 1.0) <= SUM_TOLERANCE).all())
    case = block.case
    lowest: FloatArray | None = None  # per counted row: the smallest logged logit
    counted = block.valid
    if case.spec.family == "softmax" and case.spec.from_logits:
        if case.label_kind == "index" and not case.spec.label_smoothing:
            target = x[np.arange(len(x)), block.target].astype(np.float64)
            if masked is not None:  # a masked target's loss is inf whatever the spread
                counted = counted & (target > -np.inf)
            lowest = target[counted]
        else:
            lowest = bottom[counted]
    spread = _extremes(top, bottom, lowest, counted, None).spread
    rounded = {name: _extremes(top, bottom, lowest, counted, Precision(name))
               for name in dtype_names}
    return BlockStats(largest, smallest, spread, distributions, rounded, masked_inputs(block))


def _extremes(top: FloatArray, bottom: FloatArray, lowest: FloatArray | None,
              valid: FloatArray, precision: Precision | None) -> Extremes:
    """Row maxima and minima, and the logged logits of the counted rows, reduced (rounded
    to D first, given a precision). A spread past float64's range (``[1e308, -1e308]``) is
    inf."""
    def rnd(values: FloatArray) -> FloatArray:
        if precision is None:
            return values
        out = np.asarray(precision.round(values), dtype=np.float64)
        if not precision.has_inf:
            # past float8_e4m3fn's range a value is NaN there (no infinity): as far beyond
            # every edge as an infinity would be
            out = np.where(np.isnan(out), np.copysign(np.inf, values), out)
        return out

    spread = logged = None
    if lowest is not None and lowest.size:
        top_r, lowest_r = rnd(top[valid]), rnd(lowest)
        with np.errstate(invalid="ignore", over="ignore"):
            gaps = top_r - lowest_r
        # inf - inf: both rounded past D's range; the pipeline's x - max is NaN there
        spread = float(np.where(np.isnan(gaps), np.inf, gaps).max())
        logged = float(lowest_r.min())
    return Extremes(float(rnd(top).max()), float(rnd(bottom).min()), spread, logged)


def _split_stats(block: Block, dtype_names: Sequence[str]) -> BlockStats:
    """:func:`block_stats` of a row run in column chunks: the same values, from the row's
    maximum, smallest unmasked logit and target logit merged chunk by chunk (maxima and
    minima merge exactly), reduced by the same :func:`_extremes`."""
    case = block.case
    spec = case.spec
    top, bottom, target_value = -np.inf, np.inf, np.nan
    any_masked = False
    for chunk in block.column_chunks():
        x = np.asarray(chunk.logits)
        masked = chunk.masked
        any_masked |= masked is not None
        top = max(top, float(extrema.maximum(x)))
        bottom = min(bottom, float(extrema.minimum(x) if masked is None
                                   else extrema.minimum(x, where=~masked, initial=np.inf)))
        if case.label_kind == "index" and spec.family == "softmax":
            inside, column = _chunk_column(chunk, int(block.target[0]))
            if inside:
                target_value = float(x[0, column])
    distributions = not any_masked and bottom >= 0 and top <= 1 and bool(
        abs(float(_split_row_sum(block)) - 1.0) <= SUM_TOLERANCE)
    tops, bottoms = np.array([top]), np.array([bottom])
    lowest: FloatArray | None = None
    counted = block.valid
    if spec.family == "softmax" and spec.from_logits:
        if case.label_kind == "index" and not spec.label_smoothing:
            counted = counted & (target_value > -np.inf)  # a masked target: inf loss anyway
            lowest = np.array([target_value])[counted]
        else:
            lowest = bottoms[counted]
    spread = _extremes(tops, bottoms, lowest, counted, None).spread
    rounded = {name: _extremes(tops, bottoms, lowest, counted, Precision(name))
               for name in dtype_names}
    return BlockStats(top, bottom, spread, distributions, rounded, _split_masked(block))


def _chunk_column(chunk: Block, column: int) -> tuple[bool, int]:
    """Whether a class of the whole row lies in the chunk, and its column there."""
    start, stop = chunk.columns or (0, chunk.logits.shape[-1])
    return start <= column < stop, column - start


def _split_masked(block: Block) -> MaskedInputs:
    """:func:`~xentcheck.misuse.masked_inputs` of a row run in column chunks (a softmax
    row's decisions need the whole row: whether every entry is masked)."""
    if block.case.spec.family == "sigmoid":
        found = MaskedInputs()
        for chunk in block.column_chunks():
            found = merge_masked(found, masked_inputs(chunk))  # positions in the row's columns
        return found
    entries, every, first_hit = 0, True, None
    for chunk in block.column_chunks():
        masked = chunk.masked
        if masked is None:
            every = False
            continue
        entries += int(np.count_nonzero(masked))
        every &= bool(masked.all())
        if first_hit is None:
            weighs = (chunk.target_mask if block.case.label_kind == "index"
                      and not block.case.spec.label_smoothing
                      else chunk.softmax_coefficients() > 0)
            hit = np.flatnonzero(masked[0] & weighs[0])
            if hit.size:
                first_hit = (block.start, (chunk.columns or (0, 0))[0] + int(hit[0]))
    if not entries:
        return MaskedInputs()
    valid = bool(block.valid[0])
    weighted = valid and not every and first_hit is not None
    whole = every and valid
    return MaskedInputs(entries, int(weighted), first_hit if weighted else None, int(whole),
                        block.start if whole else None, int(every and not valid))


def _split_row_sum(block: Block) -> float:
    parts = [chunk_sums(chunk.logits, np.float64) for chunk in block.column_chunks()]
    return float(combine_chunk_sums(np.concatenate(parts, axis=-1))[0])
