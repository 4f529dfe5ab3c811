"""Stage-by-stage execution of a pipeline in one precision, watching every stage.

A pipeline is written as a sequence of calls on a :class:`StageRunner`, each naming the
stage it belongs to. The runner evaluates the step the way the precision dictates (compute
in at least float32, round the result to D; reductions accumulate in the accumulate dtype)
and records the first place where the step *created* trouble from clean operands:

``overflow``
    finite operands, infinite result (exp past ln(max), a sum past max, a cast past max);
    in float8_e4m3fn, which has no infinity, a NaN result whose value before rounding to D
    was a number (past 448, or inf in float32): the format turns overflow into NaN;
``nan``
    non-NaN operands, NaN result (inf/inf, 0 * inf, inf - inf);
``log_of_zero`` / ``division_by_zero``
    a pole was hit: the operand was an exact zero (usually flushed by an earlier stage);
``underflow``
    at a position the pipeline marks *critical* (a value that will be logged or divided by,
    whose exact value is positive), the result is zero or subnormal while no operand was,
    and every operand was finite (``exp(-inf) = 0``, a masked logit's, is exact).

Trouble is only looked for at the positions that reach the loss (``where``; by default every
row that is not ignored), so the harmless underflow of exp for a non-target class or a NaN in
an ignored padding row is not reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import extrema
from .chunking import chunk_sums, combine_chunk_sums, row_sum
from .precision import AccumulateName, FloatArray, Operand, Precision
from .replay import PassComplete, ReplayCursor
from .subnormals import flush_subnormals

EVENT_KINDS = ("overflow", "nan", "underflow", "log_of_zero", "division_by_zero")

Mask = Any  # boolean array broadcastable to a stage's output, or None for "everywhere"


# Steps whose result is subnormal only where an operand is (flushed already, when flushing):
# no flush needed after them. log of a normal number is at least 2**-24 in magnitude.
_NO_NEW_SUBNORMALS = frozenset({np.negative, np.abs, np.maximum, np.log})


@dataclass(frozen=True)
class StageEvent:
    """The first position at which ``stage`` created ``kind`` (row index first); for a
    user's loss function, ``source`` is where the operation was called (``FILE:LINE``)."""

    stage: str
    kind: str
    index: tuple[int, ...]
    source: str | None = None


class StageRunner:
    """Evaluates one pipeline's steps in ``precision`` over a block of rows.

    Parameters
    ----------
    precision
        The storage and accumulate dtypes.
    stages
        The stage names the pipeline declared, in execution order.

    :meth:`bind` sets, for each block of rows, which rows count (False for ``ignore_index``
    rows) and the block's first row in the whole input, so that reported indices are in the
    input's own coordinates when the input streams through in blocks.

    :meth:`enter` points the runner at a column chunk ``[c0, c1)`` of a row split across its
    classes (a :class:`Replay`): the row reductions (``max``, ``argmax``, ``sum``,
    ``gather``) then fold chunk by chunk into whole-row results identical to the unsplit
    row's (sums are defined chunk-wise, :mod:`xentcheck.chunking`), ``scatter`` writes the
    chunk's part, and events at per-class positions get ``c0`` added to their column.
    """

    def __init__(self, precision: Precision, stages: Sequence[str],
                 known: frozenset[tuple[str, str]] = frozenset()) -> None:
        self.precision = precision
        self.stages = tuple(stages)
        # (stage, kind) pairs an earlier block already recorded: their first event is found,
        # so looking for them again here would be wasted work (they would lose to it)
        self.known = known
        self.valid_rows: FloatArray = np.ones(0, dtype=bool)
        self.row_offset = 0
        self.events: list[StageEvent] = []
        self._seen: set[tuple[str, str]] = set()
        # forward values a pipeline keeps for its backward pass, for the current block only
        self.saved: dict[str, FloatArray] = {}
        # critical positions by (critical, where) masks, for the current block only: a
        # pipeline passes the same masks to several steps
        self._critical: dict[tuple[int, int, tuple[int, ...]], tuple[Any, ...]] = {}
        # a split row's chunk: its replay and columns (None: whole rows)
        self.replay: ReplayCursor | None = None
        self.columns: tuple[int, int] | None = None
        self.watching = True
        # which watch (in call order) found each event: a split row's chunks are merged by it
        self.calls = 0
        self.event_calls: dict[tuple[str, str], int] = {}
        # results flushed to zero where subnormal in the compute dtype (a pipeline emulating a
        # library that computes with flush-to-zero sets this; see :func:`flush_subnormals`)
        self.flush_subnormals = False

    def enter(self, replay: ReplayCursor, columns: tuple[int, int]) -> StageRunner:
        """Run over the columns ``columns`` of a row split across its classes."""
        self.replay, self.columns = replay, columns
        return self

    def unwatched(self, stages: Sequence[str]) -> StageRunner:
        """A runner for recomputing values: same precision, rows and chunk, no events."""
        other = StageRunner(self.precision, stages).bind(self.valid_rows, self.row_offset)
        other.replay, other.columns, other.watching = self.replay, self.columns, False
        other.flush_subnormals = self.flush_subnormals
        return other

    def bind(self, valid_rows: FloatArray, row_offset: int = 0) -> StageRunner:
        """Point the runner at the next block of rows; events found so far are kept."""
        self.valid_rows = np.asarray(valid_rows, dtype=bool)
        self.row_offset = row_offset
        self.saved = {}
        self._critical = {}
        return self

    def absorb(self, events: Sequence[StageEvent]) -> None:
        """Take in the events another runner found on a later block (first ones win)."""
        for event in events:
            if (event.stage, event.kind) not in self._seen:
                self._seen.add((event.stage, event.kind))
                self.events.append(event)

    def note(self, event: StageEvent) -> None:
        """Record an event another watcher found: an operation of a user's loss function,
        which its framework's adapter watched (its stage is the op's name, not one the
        pipeline declared). The first of each (stage, kind) is kept; such events keep the
        order they were noted in (execution order) and come before declared stages'."""
        self.absorb([event])

    def save(self, name: str, value: FloatArray) -> FloatArray:
        """Keep a forward value of this block for the backward pass (as autograd does)."""
        self.saved[name] = value
        return value

    # -- rounding ---------------------------------------------------------------------------

    def _to_compute(self, x: Operand) -> FloatArray:
        return np.asarray(x).astype(self.precision.compute_dtype, copy=False)

    def _round(self, x: FloatArray, *, can_be_subnormal: bool = True) -> FloatArray:
        if self.flush_subnormals and can_be_subnormal and self.precision.name != "float16":
            # the result is flushed where it is subnormal in the compute dtype, before it is
            # rounded to D (bfloat16 has float32's range: no other source of its subnormals).
            # float16's subnormals are normal float32 numbers and stay; a float32 subnormal
            # rounds to a float16 zero anyway.
            return self.precision.round(flush_subnormals(np.asarray(x)))
        return self.precision.round(x)

    # -- watching ---------------------------------------------------------------------------

    def _where(self, shape: tuple[int, ...], where: Mask) -> FloatArray:
        mask: FloatArray
        if not shape:
            mask = np.asarray(True)
        else:
            rows = self.valid_rows.reshape((-1,) + (1,) * (len(shape) - 1))
            mask = np.broadcast_to(rows, shape)
        if where is not None:
            mask = mask & np.broadcast_to(np.asarray(where, dtype=bool), shape)
        return mask

    def _found(self, stage: str, *kinds: str | None) -> bool:
        """Whether every one of these events of ``stage`` is already known."""
        return all(kind is None or (stage, kind) in self._seen or (stage, kind) in self.known
                   for kind in kinds)

    def _record(self, stage: str, kind: str, mask: FloatArray) -> None:
        if (stage, kind) in self._seen or not mask.any():
            return
        first = np.unravel_index(int(np.argmax(mask.ravel())), mask.shape)
        self._record_index(stage, kind, tuple(int(i) for i in first), mask.shape)

    def _record_index(self, stage: str, kind: str, position: tuple[int, ...],
                      shape: tuple[int, ...]) -> None:
        """Keep the first event of each (stage, kind); the row becomes a whole-input row, and
        in a split row's chunk a per-class position becomes a whole-row column."""
        if (stage, kind) in self._seen:
            return
        index = (position[0] + self.row_offset, *position[1:]) if position else ()
        if (self.columns is not None and index
                and shape[-1] == self.columns[1] - self.columns[0]):
            index = (*index[:-1], index[-1] + self.columns[0])
        self._seen.add((stage, kind))
        self.event_calls[(stage, kind)] = self.calls
        self.events.append(StageEvent(stage, kind, index))

    def _watch(
        self,
        stage: str,
        out: FloatArray,
        operands: Sequence[Operand],
        *,
        where: Mask,
        critical: Mask = None,
        pole: str | None = None,
        pole_operand: Operand | None = None,
        reduced_axis: int | None = None,
        fresh_tiny: bool = False,
        operand_flags: tuple[FloatArray, FloatArray] | None = None,
        unrounded: Operand | None = None,
    ) -> None:
        """Record what this step created. ``reduced_axis``: the operand axis a sum removed;
        ``operand_flags``: a split row's (any operand non-finite, any NaN) per output value,
        merged over the chunks, in place of the operands; ``unrounded``: the result before
        its rounding to D (tells an overflow from an invalid operation where D has no
        infinity; 0.0 for a sum, which is a number wherever its terms are finite)."""
        if stage not in self.stages:
            raise ValueError(f"stage {stage!r} is not declared by the pipeline")
        self.calls += 1
        if not self.watching:
            return
        watch_underflow = (critical is not None and not self._found(stage, "underflow")
                           and bool(np.any(critical)))
        all_finite = self.precision.all_finite(out)
        if not watch_underflow and all_finite:
            return  # the common case costs one pass over the output
        if not all_finite and self._found(stage, "nan", "overflow", pole):
            all_finite = True  # nothing left to find here: skip the operands' passes
            if not watch_underflow:
                return

        def per_output(flags: FloatArray) -> FloatArray:
            # Bring an operand-shaped property to the output's shape.
            if reduced_axis is not None:
                flags = np.asarray(flags.any(axis=reduced_axis))
            return np.broadcast_to(flags, out.shape)

        if not all_finite:
            mask = self._where(out.shape, where)
            operand_nonfinite = np.zeros(out.shape, dtype=bool)
            operand_nan = np.zeros(out.shape, dtype=bool)
            precision = self.precision
            if operand_flags is not None:
                operand_nonfinite = np.broadcast_to(operand_flags[0], out.shape)
                operand_nan = np.broadcast_to(operand_flags[1], out.shape)
            for operand in operands:
                value = np.asarray(operand)
                operand_nonfinite = operand_nonfinite | per_output(~precision.isfinite(value))
                operand_nan = operand_nan | per_output(precision.isnan(value))
            new_nan = precision.isnan(out) & ~operand_nan & mask
            new_inf = precision.isinf(out) & ~operand_nonfinite & mask
            if not precision.has_inf and unrounded is not None:
                # D has no infinity: a number past its range, or an infinity, rounds to NaN.
                # From finite operands that is an overflow or a pole (log(0), 1/0), as inf
                # would be in another format, not an invalid operation such as 0/0.
                before = np.broadcast_to(np.asarray(unrounded), out.shape)
                beyond = new_nan & ~operand_nonfinite & ~np.isnan(before)
                new_nan = new_nan & ~beyond
                new_inf = new_inf | beyond
            self._record(stage, "nan", new_nan)
            if pole is not None and pole_operand is not None:
                at_pole = per_output(np.asarray(pole_operand) == 0)
                self._record(stage, pole, new_inf & at_pole)
                new_inf = new_inf & ~at_pole
            self._record(stage, "overflow", new_inf)

        if watch_underflow:
            positions = self._critical_positions(out.shape, critical, where)
            self._watch_underflow(stage, out, operands, positions, fresh_tiny)

    def _critical_positions(self, shape: tuple[int, ...], critical: Mask,
                            where: Mask) -> tuple[FloatArray, ...]:
        """Where ``critical`` holds among the watched positions, found once per block for
        each pair of masks (the masks are kept alongside, so their ids stay theirs)."""
        key = (id(critical), id(where), shape)
        cached = self._critical.get(key)
        if cached is None:
            watched = self._where(shape, where)
            found = np.nonzero(watched & np.broadcast_to(critical, shape))
            cached = self._critical[key] = (critical, where, found)
        positions: tuple[FloatArray, ...] = cached[2]
        return positions

    def _watch_underflow(
        self, stage: str, out: FloatArray, operands: Sequence[Operand],
        positions: tuple[FloatArray, ...], fresh_tiny: bool,
    ) -> None:
        # Critical positions are few (one target per row, typically): look only at those.
        if not positions[0].size:
            return
        tiny = np.abs(out[positions].astype(np.float64)) < self.precision.tiny
        for operand in operands:
            value = np.abs(np.broadcast_to(np.asarray(operand), out.shape)[positions]
                           .astype(np.float64))
            # An infinite operand makes a zero exact (exp(-inf), a masked logit's, or 1/inf):
            # only finite operands flushed to zero underflow.
            tiny &= value < np.inf
            if not fresh_tiny:
                # A zero that came in is not this step's doing; it was reported where it began.
                tiny &= value >= self.precision.tiny
        if tiny.any():
            first = int(np.argmax(tiny))  # np.nonzero lists positions in C order
            self._record_index(stage, "underflow", tuple(int(p[first]) for p in positions),
                               out.shape)

    # -- steps ------------------------------------------------------------------------------

    def cast(self, stage: str, x: FloatArray, *, critical: Mask = None) -> FloatArray:
        """Round an input to D; overflow past D's range and harmful flushes are recorded.

        ``critical`` marks inputs whose exact value is non-zero and matters (a target's
        probability): there, a result below D's smallest normal number is an underflow.
        """
        out = self._round(x)
        given = np.asarray(x).dtype
        if (critical is None and given.kind not in "iub"
                and np.can_cast(given, self.precision.dtype, "safe")):
            return out  # D holds every float exactly: no overflow, NaN or flush can arise
        self._watch(stage, out, [x], where=None, critical=critical, fresh_tiny=True,
                    unrounded=x)
        return out

    def _elementwise(
        self,
        stage: str,
        fn: Callable[..., FloatArray],
        *operands: Operand,
        where: Mask = None,
        critical: Mask = None,
        pole: str | None = None,
        pole_operand: Operand | None = None,
        blame: Sequence[Operand] | None = None,
    ) -> FloatArray:
        """``blame``: the operands whose inf/NaN excuses the result's (default: all). A
        backward step names only the incoming gradient, so a NaN that a forward value brings
        into the gradient is reported at the step where it enters."""
        with np.errstate(all="ignore"):  # the watch below reports what these warnings would
            exact = fn(*(self._to_compute(o) for o in operands))
            out = self._round(exact, can_be_subnormal=fn not in _NO_NEW_SUBNORMALS)
        self._watch(
            stage, out, operands if blame is None else blame, where=where, critical=critical,
            pole=pole, pole_operand=pole_operand, unrounded=exact,
        )
        return out

    def fused(self, stage: str, fn: Callable[..., FloatArray], *operands: Operand,
              round_result: bool = True, **kw: Any) -> FloatArray:
        """A fused kernel's step: ``fn`` of the operands evaluated in the compute dtype
        (float32 for 16-bit D, D itself otherwise) with no rounding to D inside it.

        The result is rounded to D once (``round_result``), as a kernel stores its output,
        or kept in the compute dtype, as a kernel keeps a value in registers for its next
        step (a float32 ``exp`` summed before anything is stored). Watched like any step.
        ``fn`` is elementwise (broadcasting allowed): a kernel's row reduction is a
        :meth:`sum`, :meth:`accumulate` or :meth:`max` of the kept compute-dtype values, so
        that a row split across its classes replays it (:class:`Replay`).
        """
        with np.errstate(all="ignore"):  # the watch below reports what these warnings would
            exact = fn(*(self._to_compute(o) for o in operands))
            out = self._round(exact) if round_result else np.asarray(
                exact, dtype=self.precision.compute_dtype)
            if self.flush_subnormals and not round_result:
                out = flush_subnormals(out)
        blame = kw.pop("blame", None)
        self._watch(stage, out, operands if blame is None else blame,
                    **{"where": None, "unrounded": exact, **kw})
        return out

    def exp(self, stage: str, x: Operand, **kw: Any) -> FloatArray:
        return self._elementwise(stage, np.exp, x, **kw)

    def log(self, stage: str, x: Operand, **kw: Any) -> FloatArray:
        return self._elementwise(stage, np.log, x, pole="log_of_zero", pole_operand=x, **kw)

    def tanh(self, stage: str, x: Operand, **kw: Any) -> FloatArray:
        return self._elementwise(stage, np.tanh, x, **kw)

    def log1p(self, stage: str, x: Operand, **kw: Any) -> FloatArray:
        return self._elementwise(stage, np.log1p, x, **kw)

    def add(self, stage: str, a: Operand, b: Operand, **kw: Any) -> FloatArray:
        return self._elementwise(stage, np.add, a, b, **kw)

    def subtract(self, stage: str, a: Operand, b: Operand, **kw: Any) -> FloatArray:
        return self._elementwise(stage, np.subtract, a, b, **kw)

    def multiply(self, stage: str, a: Operand, b: Operand, **kw: Any) -> FloatArray:
        return self._elementwise(stage, np.multiply, a, b, **kw)

    def divide(self, stage: str, a: Operand, b: Operand, **kw: Any) -> FloatArray:
        return self._elementwise(
            stage, np.divide, a, b, pole="division_by_zero", pole_operand=b, **kw
        )

    def maximum(self, stage: str, a: Operand, b: Operand, **kw: Any) -> FloatArray:
        return self._elementwise(stage, np.maximum, a, b, **kw)

    def clip(self, stage: str, x: FloatArray, low: float, high: float, **kw: Any) -> FloatArray:
        # The bounds are constants of the formulation, stored in D as a framework stores them.
        lo, hi = self._round(np.float64(low)), self._round(np.float64(high))
        return self._elementwise(stage, lambda v: np.clip(v, lo, hi), x, **kw)

    def negate(self, stage: str, x: Operand, **kw: Any) -> FloatArray:
        return self._elementwise(stage, np.negative, x, **kw)

    def abs(self, stage: str, x: Operand, **kw: Any) -> FloatArray:
        return self._elementwise(stage, np.abs, x, **kw)

    def _reduce(self, step: Callable[[Any], Any], finish: Callable[[Any], Any]) -> Any:
        """A row reduction of a split row: the whole-row result once a pass has collected it;
        in the pass collecting it, hand this chunk's part over (``step`` maps the state of
        the chunks before, None at the first, to the next) and end the pass over the chunk."""
        cursor = self.replay
        assert cursor is not None
        number = cursor.counter
        cursor.counter += 1
        if number < len(cursor.replay.results):
            return cursor.replay.results[number]
        raise PassComplete(step, finish)

    def _chunk_columns(self, index: FloatArray) -> tuple[FloatArray, FloatArray]:
        """For class indices of the whole row: which lie in this chunk, and their columns in
        it (clipped into range where they do not)."""
        assert self.columns is not None
        start, stop = self.columns
        index = np.asarray(index)
        inside = (index >= start) & (index < stop)
        return inside, np.clip(index - start, 0, stop - start - 1)

    def max(self, stage: str, x: FloatArray, *, axis: int = -1) -> FloatArray:
        """Row maximum, kept as a trailing axis of length one. Exact in any dtype."""
        if self.replay is None:
            return extrema.maximum(x, axis=axis, keepdims=True)
        part = extrema.maximum(x, axis=-1, keepdims=True)
        result: FloatArray = self._reduce(
            lambda state: part if state is None else np.maximum(state, part), lambda s: s)
        return result

    def argmax(self, stage: str, x: FloatArray) -> FloatArray:
        """``(N,)``: each row's first position of its maximum (of its first NaN, as
        ``np.argmax``). Exact."""
        if self.replay is None:
            return np.argmax(np.asarray(x), axis=-1)
        assert self.columns is not None
        values = np.asarray(x)
        at = np.argmax(values, axis=-1)
        part = (np.take_along_axis(values, at[:, None], axis=-1)[:, 0], at + self.columns[0])

        def step(state: Any) -> Any:
            if state is None:
                return part
            # a later chunk wins only with a strictly larger value, or the first NaN
            later = (part[0] > state[0]) | (np.isnan(part[0]) & ~np.isnan(state[0]))
            return np.where(later, part[0], state[0]), np.where(later, part[1], state[1])

        result: FloatArray = self._reduce(step, lambda s: s[1])
        return result

    def gather(self, stage: str, x: FloatArray, index: FloatArray) -> FloatArray:
        """``x[i, index[i]]`` for each row i. Exact."""
        if self.replay is None:
            return np.take_along_axis(x, np.asarray(index)[:, None], axis=-1)[:, 0]
        inside, column = self._chunk_columns(index)
        values = np.take_along_axis(np.asarray(x), column[:, None], axis=-1)[:, 0]
        result: FloatArray = self._reduce(
            lambda state: np.where(inside, values, values if state is None else state),
            lambda s: s)
        return result

    def scatter(self, stage: str, shape: tuple[int, ...], index: FloatArray,
                values: FloatArray) -> FloatArray:
        """Zeros of ``shape`` with ``values[i]`` at ``[i, index[i]]``: gather's backward."""
        out = np.zeros(shape, dtype=self.precision.storage_dtype)
        rounded = self._round(np.asarray(values))
        if self.replay is None:
            np.put_along_axis(out, np.asarray(index)[:, None], rounded[:, None], -1)
            return out
        inside, column = self._chunk_columns(index)
        rows = np.flatnonzero(inside)
        out[rows, column[rows]] = rounded[rows]
        return out

    def sum(self, stage: str, x: FloatArray, *, keepdims: bool = False,
            where: Mask = None, accumulate: AccumulateName | None = None) -> FloatArray:
        """Sum along the last axis: accumulate per the precision (or per ``accumulate``, for
        a library that always accumulates one way, whatever the precision asks), round to D."""
        if self.replay is None:
            # the precision's own policy through the plain call (a test may substitute it)
            out = self._round(self.accumulate(x, axis=-1) if accumulate is None
                              else self.accumulate(x, axis=-1, accumulate=accumulate))
            # where its terms are finite, a sum turns NaN only past D's range (a running sum
            # in D too): as if its value before rounding were a number
            self._watch(stage, out, [x], where=where, reduced_axis=-1, unrounded=0.0)
        else:
            out, nonfinite, nan = self._reduce(*self._split_sum(x, accumulate=accumulate))
            self._watch(stage, out, [], where=where, operand_flags=(nonfinite, nan),
                        unrounded=0.0)
        return out[..., None] if keepdims else out

    def _policy(self, accumulate: AccumulateName | None) -> Precision:
        # the precision whose accumulation a sum follows: the runner's, or D with another
        return self.precision if accumulate is None else Precision(self.precision.name,
                                                                   accumulate)

    def _split_sum(self, x: FloatArray, rounded: bool = True,
                   accumulate: AccumulateName | None = None) -> tuple[
            Callable[[Any], Any], Callable[[Any], Any]]:
        """The fold and finish of a split row's sum: the chunk sums (a running sum for a
        sequential accumulation) and whether any term was non-finite or NaN, by row; the
        total is rounded to D unless not ``rounded`` (:meth:`accumulate`)."""
        values = np.asarray(x)
        precision = self._policy(accumulate)
        nonfinite = (~precision.isfinite(values)).any(axis=-1)
        nan = precision.isnan(values).any(axis=-1)

        sums = None
        if not precision.sequential_sum:  # the chunk's part, taken where the chunk runs
            with np.errstate(all="ignore"):
                sums = chunk_sums(values.astype(precision.accumulate_dtype, copy=False))

        def step(state: Any) -> Any:
            if state is None:
                state = (None, np.zeros_like(nonfinite), np.zeros_like(nan))
            partial, seen_nonfinite, seen_nan = state
            if sums is None:  # a running sum goes on from the chunks before: in order
                total = self._sequential_sum(values, partial)
            else:
                total = sums if partial is None else np.concatenate([partial, sums], axis=-1)
            return total, seen_nonfinite | nonfinite, seen_nan | nan

        def finish(state: Any) -> Any:
            partial, seen_nonfinite, seen_nan = state
            if not precision.sequential_sum:
                with np.errstate(all="ignore"):
                    partial = combine_chunk_sums(partial)
            return self._round(partial) if rounded else partial, seen_nonfinite, seen_nan

        return step, finish

    def watch_reduction(self, stage: str, out: FloatArray, x: FloatArray,
                        unrounded: Operand | None = None) -> None:
        """Watch a reduction over the last axis whose result the caller computed (from
        ``unrounded``, when given: see :meth:`_watch`). In a split row's chunk, whether any
        term of the whole row was non-finite or NaN is replayed."""
        if self.replay is None:
            self._watch(stage, out, [x], where=None, reduced_axis=-1, unrounded=unrounded)
            return
        values = np.asarray(x)
        part = ((~self.precision.isfinite(values)).any(axis=-1),
                self.precision.isnan(values).any(axis=-1))
        nonfinite, nan = self._reduce(
            lambda state: part if state is None else (state[0] | part[0], state[1] | part[1]),
            lambda state: state)
        shape = np.shape(out)
        self._watch(stage, out, [], where=None,
                    operand_flags=(np.reshape(nonfinite, shape), np.reshape(nan, shape)),
                    unrounded=unrounded)

    def accumulate(self, x: FloatArray, *, axis: int = -1, keepdims: bool = False,
                   accumulate: AccumulateName | None = None) -> FloatArray:
        """The unrounded sum of ``x`` along ``axis`` as the precision accumulates it (or as
        ``accumulate`` says, in place of the precision's policy).

        Sums of more than :data:`~xentcheck.chunking.SUM_CHUNK` values are defined
        chunk-wise (:mod:`xentcheck.chunking`), so a row split across blocks sums the same;
        in a split row's chunk, a sum over the classes (the last axis) is replayed as
        :meth:`sum`'s is.
        """
        if self.replay is not None and np.ndim(x) and axis in (-1, np.ndim(x) - 1):
            total = self._reduce(*self._split_sum(x, rounded=False, accumulate=accumulate))[0]
            return total[..., None] if keepdims else total
        values = np.moveaxis(np.asarray(x), axis, -1)
        policy = self._policy(accumulate)
        with np.errstate(all="ignore"):
            if not policy.sequential_sum:
                acc = policy.accumulate_dtype
                total = row_sum(values.astype(acc, copy=False))
            else:
                total = self._sequential_sum(values, None)
        return np.expand_dims(total, axis) if keepdims else total

    def _sequential_sum(self, values: FloatArray, start: FloatArray | None) -> FloatArray:
        # A running sum in D over the last axis: each partial sum rounds to D, as a loop
        # accumulating in D does; ``start`` carries the running sum of earlier chunks.
        total = self._round(np.zeros(values.shape[:-1])) if start is None else start
        with np.errstate(all="ignore"):
            for k in range(values.shape[-1]):
                total = self._round(self._to_compute(total) + self._to_compute(values[..., k]))
        return total

    def select(self, stage: str, condition: FloatArray, a: Operand, b: Operand) -> FloatArray:
        """``where(condition, a, b)``; exact, used to zero out ignored positions."""
        return self._round(np.where(condition, a, b))

    def ordered_events(self) -> list[StageEvent]:
        """Events in pipeline order: by stage, then position, then kind (noted events first,
        in the order they were noted: :meth:`note`).

        The order does not depend on how the rows were split into blocks.
        """
        order = {name: i for i, name in enumerate(self.stages)}
        noted = {id(e): i for i, e in enumerate(self.events) if e.stage not in order}
        # noted events (a user function's ops, :meth:`note`) in the order they were noted,
        # before every declared stage
        return sorted(
            self.events, key=lambda e: (order.get(e.stage, -1), noted.get(id(e), 0),
                                        e.index, EVENT_KINDS.index(e.kind))
        )

    def first_event(self) -> StageEvent | None:
        """Where trouble began: the first event in pipeline order."""
        events = self.ordered_events()
        return events[0] if events else None
