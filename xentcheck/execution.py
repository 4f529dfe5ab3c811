"""Running a pipeline in a precision over a case, block by block: the one way it is done.

The evaluator (``run``), the sweeps and the limit bisection all execute pipelines through
:class:`PipelineRun`, so a formulation behaves identically whichever command asks.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TypeVar

import numpy as np

from . import chunking
from .arrays import release_pages
from .case import Case
from .pipelines import Block, Pipeline, Saved
from .pipelines.options import quiet_transform, with_options
from .precision import FloatArray, Precision
from .replay import PassComplete, Replay, ReplayCursor
from .stages import StageEvent, StageRunner

# Values per block: large enough that numpy's per-call overhead vanishes, small enough that
# a block and its temporaries (a dozen float64 copies) stay within a few hundred MiB.
BLOCK_ELEMENTS = 1 << 20

Outcome = TypeVar("Outcome")


def split_width(case: Case, block_elements: int) -> int | None:
    """The width of the column chunks a row of ``case`` is run in: None when a row fits in a
    block, else a multiple of the summation chunk (:mod:`xentcheck.chunking`), so that the
    row's sums are the same split or whole."""
    if case.classes <= block_elements:
        return None
    size = chunking.SUM_CHUNK
    return max(size, block_elements // size * size)


def blocks(case: Case, block_elements: int | None = None, *,
           release: bool = True, whole: bool = False) -> Iterator[Block]:
    """The case's rows in consecutive blocks of about ``block_elements`` values; with
    ``whole``, all of them in one block, its rows whole (a pipeline called once on the whole
    case runs, :attr:`~xentcheck.pipelines.Pipeline.whole_case`).

    A row wider than that is a block of its own, run in column chunks of about that many
    values (:meth:`Block.column_chunks`), so the work and memory per step are bounded by
    values, not rows. With ``release``, a block's pages of a memory-mapped input are let go
    when the next block is asked for; a caller that keeps blocks longer passes False and
    calls :func:`release_block` itself.
    """
    size = BLOCK_ELEMENTS if block_elements is None else block_elements
    step = max(1, size // max(1, case.classes))
    split = split_width(case, size)
    if whole:
        step, split = max(1, case.rows), None
    for start in range(0, case.rows, step):
        stop = min(case.rows, start + step)
        block = Block(case, case.logits_rows(start, stop), case.labels_rows(start, stop), start,
                      split=split)
        yield block
        if release:
            release_block(block)


def release_block(block: Block) -> None:
    """Done with these rows: a memory-mapped input's pages need not stay resident."""
    release_pages(block.case.logits, block.logits)
    release_pages(block.case.labels, block.labels)


def worker_count() -> int:
    """Threads for the blocks: one per core this process may use (numpy releases the GIL
    in its loops), at most four, so that the blocks in flight stay few."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


def block_size(workers: int) -> int:
    """Values per block such that the blocks in flight hold no more values than three blocks
    of the default size (what two threads keep in flight): memory stays bounded however
    many cores there are."""
    in_flight = 1 if workers == 1 else workers + 1
    return max(1, min(BLOCK_ELEMENTS, 3 * BLOCK_ELEMENTS // in_flight))


def in_order(work: Callable[[Block], Outcome], items: Iterator[Block],
             workers: int) -> Iterator[Outcome]:
    """``work`` over the blocks on ``workers`` threads, yielded in input order; at most
    ``workers + 1`` blocks are in flight, which bounds memory whatever the input's size."""
    if workers == 1:
        yield from map(work, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[Outcome]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(work, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


@dataclass
class BlockRun:
    """What one pipeline in one precision did on one block, independent of other blocks:
    blocks can run on several threads and be absorbed in order (:meth:`PipelineRun.absorb`)."""

    per_example: FloatArray
    events: list[StageEvent]
    gradient: FloatArray | None = None
    gradient_events: list[StageEvent] = field(default_factory=list)


@dataclass
class Denominators:
    """Running counts from which every ``mean`` denominator follows."""

    class_counts: FloatArray
    counted: int = 0
    rows: int = 0

    def add(self, case: Case, block: Block) -> None:
        self.rows += len(block.labels)
        if case.spec.family == "sigmoid":
            self.counted += sum(int(np.count_nonzero(chunk.valid_elements))
                                for chunk in block.column_chunks())
        elif case.label_kind == "index":
            keep = block.valid
            self.counted += int(np.count_nonzero(keep))
            if case.spec.class_weights is not None:  # else the counts are not needed: a
                # C-long count per block is the largest array a row of millions of classes makes
                self.class_counts += np.bincount(block.target[keep], minlength=case.classes)

    def mean_denominator(self, case: Case, weights: FloatArray | None) -> float:
        """Sum of the counted labels' weights (softmax, integer labels), else the count."""
        if case.spec.family == "sigmoid":
            return float(self.counted)
        if case.label_kind != "index":
            return float(self.rows)
        if weights is None:
            return float(self.counted)
        return float(np.dot(self.class_counts, np.asarray(weights, dtype=np.float64)))


class PipelineRun:
    """One pipeline in one precision, fed block by block, then reduced."""

    def __init__(self, pipeline: Pipeline, precision: Precision) -> None:
        # every pipeline applies the cases' loss options (temperature, soft-cap, z-loss)
        self.pipeline = with_options(pipeline)
        pipeline = self.pipeline
        self.precision = precision
        self.runner = StageRunner(precision, pipeline.all_stages)
        # the backward pass visits the stages in reverse: its "first bad stage" is the first
        # one the gradient passes through that turns it bad
        self.gradient_runner = StageRunner(precision, tuple(reversed(pipeline.all_stages)))
        self._parts: list[FloatArray] = []
        # the events absorbed so far, replaced whole (threads read it while blocks run)
        self._known: frozenset[tuple[str, str]] = frozenset()
        self._known_backward: frozenset[tuple[str, str]] = frozenset()

    def feed(self, case: Case, block: Block) -> None:
        """Run the forward pass over the next block (blocks in order)."""
        self.absorb(self.run_block(case, block))

    def run_block(self, case: Case, block: Block, denominators: Denominators | None = None,
                  on_gradient: Callable[[Block, FloatArray], None] | None = None) -> BlockRun:
        """The forward pass over one block and, given the whole input's ``denominators``,
        the backward pass from the forward's own values. Touches no state of this run.

        ``on_gradient`` is handed the gradient (a split row's chunk by chunk, which are then
        not kept); without it the block's gradient is returned whole."""
        if block.split is not None and self.pipeline.splittable:
            return self._run_split(case, block, denominators, on_gradient)
        if block.split is not None:
            # a pipeline that cannot replay over column chunks runs the row whole (right,
            # but the row's temporaries are not bounded); its gradient is handed over in
            # the same chunks a split run would use
            outcome = self.run_block(case, replace(block, split=None), denominators)
            if on_gradient is not None and outcome.gradient is not None:
                for chunk in block.column_chunks():
                    start, stop = chunk.columns or (0, block.logits.shape[-1])
                    on_gradient(chunk, outcome.gradient[:, start:stop])
                outcome.gradient = None
            return outcome
        forward = StageRunner(self.precision, self.runner.stages, self._known)
        forward.bind(_watched_rows(case, block), block.start)
        outcome = BlockRun(self.pipeline.per_example(forward, block), forward.events)
        if denominators is not None:
            outcome.gradient, outcome.gradient_events = self._backward(
                case, block, denominators, forward.saved)
            if on_gradient is not None and outcome.gradient is not None:
                on_gradient(block, outcome.gradient)
                outcome.gradient = None
        return outcome

    def _run_split(self, case: Case, block: Block, denominators: Denominators | None,
                   on_gradient: Callable[[Block, FloatArray], None] | None) -> BlockRun:
        """:meth:`run_block` for a row run in column chunks: in passes (:class:`Replay`), so
        that every value, event and gradient is that of the whole row."""
        assert len(block.labels) == 1, "only a row wider than a block is split"
        chunks = list(block.column_chunks())
        # One thread: on a loaded two-core machine, chunks on two threads took 1.6x as long
        # (the blocks' threads already share the cores between rows).
        workers = 1
        forward = Replay()
        outputs: list[FloatArray] = []
        events = _replayed(
            chunks, forward, lambda chunk: self._chunk_runner(case, chunk, forward, False),
            lambda runner, chunk: self.pipeline.per_example(runner, chunk),
            lambda chunk, output: outputs.append(output), workers)
        if case.spec.family == "softmax":
            per_example = outputs[0]  # a row's loss: every chunk's final pass computes it
        else:
            per_example = np.concatenate(outputs, axis=-1)
        outcome = BlockRun(per_example, events)
        if denominators is None:
            return outcome
        upstream = self.upstream(case, denominators)
        backward = Replay()
        pieces: list[FloatArray] = []

        def differentiate(runner: StageRunner, chunk: Block) -> FloatArray | None:
            # the chunk's forward values (every forward reduction is known: no pass ends)
            values = self._chunk_runner(case, chunk, forward, False)
            values.watching = False
            self.pipeline.per_example(values, chunk)
            return self.pipeline.backward(runner, chunk, upstream, values.saved)

        def take(chunk: Block, gradient: FloatArray | None) -> None:
            if gradient is None:
                return
            if on_gradient is not None:
                on_gradient(chunk, gradient)
            else:
                pieces.append(gradient)

        outcome.gradient_events = _replayed(
            chunks, backward, lambda chunk: self._chunk_runner(case, chunk, backward, True),
            differentiate, take, workers)
        if pieces:
            outcome.gradient = np.concatenate(pieces, axis=-1)
        return outcome

    def _chunk_runner(self, case: Case, chunk: Block, replay: Replay,
                      backward: bool) -> StageRunner:
        runner = (StageRunner(self.precision, self.gradient_runner.stages, self._known_backward)
                  if backward else StageRunner(self.precision, self.runner.stages, self._known))
        # as :meth:`_backward`: the backward pass is watched in every row
        rows = np.ones(len(chunk.labels), dtype=bool) if backward else _watched_rows(case, chunk)
        return runner.bind(rows, chunk.start).enter(ReplayCursor(replay), chunk.columns or (0, 0))

    def absorb(self, outcome: BlockRun) -> None:
        """Take in a block's outcome; blocks must be absorbed in input order."""
        self._parts.append(outcome.per_example)
        self.runner.absorb(outcome.events)
        self.gradient_runner.absorb(outcome.gradient_events)
        if outcome.events:
            self._known = frozenset((e.stage, e.kind) for e in self.runner.events)
        if outcome.gradient_events:
            self._known_backward = frozenset(
                (e.stage, e.kind) for e in self.gradient_runner.events)

    def gradient(self, case: Case, block: Block, denominators: Denominators) -> FloatArray | None:
        """The block's gradient with respect to the logits, in D (None: not applicable), with
        the forward values recomputed.

        ``denominators`` must already hold the whole input's counts (the upstream gradient of
        a ``mean`` is one over its denominator).
        """
        if block.split is not None:  # a row run in column chunks: its gradient assembled
            outcome = self.run_block(case, block, denominators)
            self.gradient_runner.absorb(outcome.gradient_events)
            return outcome.gradient
        gradient, events = self._backward(case, block, denominators, {})
        self.gradient_runner.absorb(events)
        return gradient

    def upstream(self, case: Case, denominators: Denominators) -> float:
        """d(reduced loss) / d(per-example loss) in D, as autograd forms it."""
        weights = case.spec.class_weights
        if weights is not None:
            weights = self.precision.round(weights).astype(np.float64)
        return self.pipeline.reduction_gradient(self.precision, case.spec.reduction,
                                  denominators.mean_denominator(case, weights))

    def _backward(self, case: Case, block: Block, denominators: Denominators,
                  saved: Saved) -> tuple[FloatArray | None, list[StageEvent]]:
        runner = StageRunner(self.precision, self.gradient_runner.stages, self._known_backward)
        # the backward pass is watched in every row: an ignored row's loss counts nowhere,
        # but its gradient still reaches the weights (NaN from 0 / 0 in log's backward)
        runner.bind(np.ones(len(block.labels), dtype=bool), block.start)
        upstream = self.upstream(case, denominators)
        return self.pipeline.backward(runner, block, upstream, saved), runner.events

    def finish(self, case: Case, denominators: Denominators) -> tuple[FloatArray, FloatArray]:
        """The reduced loss (the per-example array for ``none``) and the per-example losses."""
        per_example = np.concatenate(self._parts) if self._parts else np.zeros(0)
        weights = case.spec.class_weights
        if weights is not None:
            weights = self.precision.round(weights).astype(np.float64)
        loss = self.pipeline.reduce(
            self.runner, per_example, case.spec.reduction,
            denominators.mean_denominator(case, weights), case=case,
        )
        return loss, per_example


def _replayed(chunks: list[Block], replay: Replay,
              runner_for: Callable[[Block], StageRunner],
              body: Callable[[StageRunner, Block], Outcome],
              take: Callable[[Block, Outcome], None], workers: int) -> list[StageEvent]:
    """Run ``body`` over a split row's chunks in passes until a pass needs no reduction
    collected; that pass's outputs go to ``take`` chunk by chunk, in order. Chunks run on
    ``workers`` threads and are folded in order. The final pass's events are merged as the
    whole row would have found them: of each (stage, kind), the one of the earliest watch,
    and of equal watches the earliest chunk (the lowest column)."""

    def run(chunk: Block) -> tuple[PassComplete | None, Outcome | None, StageRunner]:
        runner = runner_for(chunk)
        try:
            return None, body(runner, chunk), runner
        except PassComplete as collected:
            # its traceback would keep the chunk's intermediate arrays alive
            return collected.with_traceback(None), None, runner

    while True:
        found: dict[tuple[str, str], tuple[int, int, StageEvent]] = {}
        state: object = None
        finish: Callable[[object], object] | None = None
        final = 0
        outcomes = in_order(run, iter(chunks), workers)
        for number, (chunk, (collected, output, runner)) in enumerate(
                zip(chunks, outcomes, strict=True)):
            if collected is not None:
                state, finish = collected.step(state), collected.finish
                release_block(chunk)
                continue
            final += 1
            take(chunk, output)  # type: ignore[arg-type]  # the body returned it
            release_block(chunk)  # after ``take``, which may read the chunk again
            for event in runner.events:
                key = (event.stage, event.kind)
                order = (runner.event_calls[key], number)
                if key not in found or order < found[key][:2]:
                    found[key] = (*order, event)
        if finish is None:
            return [event for *_, event in sorted(found.values(), key=lambda f: f[:2])]
        if final:
            raise RuntimeError("a pipeline's reductions differ between a row's chunks")
        replay.results.append(finish(state))


def row_values(case: Case, precision: Precision, stages: tuple[str, ...],
               body: Callable[[StageRunner, Block], Outcome],
               block_elements: int | None = None) -> Iterator[Outcome]:
    """``body`` (per-row values of a block) over the case's blocks in order, recomputed on
    runners that do not watch: for a batch reduction that needs per-row parts the per-example
    losses do not keep. A row wider than a block runs in column chunks, replayed
    (:class:`Replay`): its values are the whole row's, and no step holds more than a chunk."""
    def runner_for(chunk: Block, replay: Replay | None = None) -> StageRunner:
        runner = StageRunner(precision, stages).bind(chunk.valid, chunk.start)
        runner.watching = False
        if replay is not None:
            runner.enter(ReplayCursor(replay), chunk.columns or (0, 0))
        return runner

    def transformed(runner: StageRunner, chunk: Block) -> Outcome:
        # the loss options' pre-steps first (temperature, soft-cap): the body recomputes
        # a formulation's values from the logits it would be handed
        return body(runner, quiet_transform(runner, chunk))

    for block in blocks(case, block_elements):
        if block.split is None:
            yield transformed(runner_for(block), block)
            continue
        outputs: list[Outcome] = []
        replay = Replay()
        _replayed(list(block.column_chunks()), replay,
                  partial(runner_for, replay=replay), transformed,
                  partial(_keep, outputs), 1)
        yield outputs[0]  # per-row values: every chunk's final pass computes them


def _keep(kept: list[Outcome], chunk: Block, output: Outcome) -> None:
    # a split row's final pass, chunk by chunk: its outputs, in order
    kept.append(output)


def _watched_rows(case: Case, block: Block) -> FloatArray:
    # Softmax rows that are ignored are not watched; sigmoid masks element by element.
    return block.valid if case.spec.family == "softmax" else np.ones(len(block.labels), bool)


def upstream_gradient(case: Case, denominators: Denominators,
                      weights: FloatArray | None) -> float:
    """d(loss) / d(per-example loss): one over the mean's denominator, else 1. With nothing
    counted (every row ignored) the mean is 0/0 and no example has a gradient to scale: 0."""
    if case.spec.reduction != "mean":
        return 1.0
    denominator = denominators.mean_denominator(case, weights)
    return 0.0 if denominator == 0 else 1.0 / denominator


def run_pipeline(
    pipeline: Pipeline, precision: Precision, case: Case
) -> tuple[FloatArray, FloatArray, StageRunner]:
    """Run one pipeline in one precision over a whole case: (loss, per-example, runner)."""
    run = PipelineRun(pipeline, precision)
    denominators = Denominators(np.zeros(case.classes))
    for block in blocks(case, whole=pipeline.whole_case):
        run.feed(case, block)
        denominators.add(case, block)
    loss, per_example = run.finish(case, denominators)
    return loss, per_example, run.runner


def run_with_gradient(
    pipeline: Pipeline, precision: Precision, case: Case, block_elements: int | None = None
) -> tuple[FloatArray, FloatArray, FloatArray | None]:
    """Run one pipeline in one precision over a whole case, forward and backward as the
    evaluator does (the backward pass from the forward's own values, block by block):
    (loss, per-example losses, gradient with respect to the logits in float64, or None
    where the pipeline has none)."""
    denominators = Denominators(np.zeros(case.classes))
    for block in blocks(case):
        denominators.add(case, block)
    run = PipelineRun(pipeline, precision)
    parts = []
    for block in blocks(case, block_elements, whole=pipeline.whole_case):
        outcome = run.run_block(case, block, denominators)
        run.absorb(outcome)
        if outcome.gradient is not None:
            parts.append(np.asarray(outcome.gradient, dtype=np.float64))
    loss, per_example = run.finish(case, denominators)
    return loss, per_example, np.concatenate(parts) if parts else None

