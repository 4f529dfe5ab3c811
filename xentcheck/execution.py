"""Running a pipeline in a precision over a case, block by block: the one way it is done.

The evaluator (``run``), the sweeps and the limit bisection all execute pipelines through
:class:`PipelineRun`, so a formulation behaves identically whichever command asks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .arrays import release_pages
from .case import Case
from .pipelines import Block, Pipeline, reduce_losses
from .precision import FloatArray, Precision
from .stages import StageRunner

# Values per block: large enough that numpy's per-call overhead vanishes, small enough that
# a block and its temporaries (a dozen float64 copies) stay within a few hundred MiB.
BLOCK_ELEMENTS = 1 << 20


def blocks(case: Case, block_elements: int | None = None) -> Iterator[Block]:
    """The case's rows in consecutive blocks of about ``block_elements`` values."""
    size = BLOCK_ELEMENTS if block_elements is None else block_elements
    step = max(1, size // max(1, case.classes))
    for start in range(0, case.rows, step):
        stop = min(case.rows, start + step)
        block = Block(case, case.logits_rows(start, stop), case.labels_rows(start, stop), start)
        yield block
        # done with these rows: a memory-mapped input's pages need not stay resident
        release_pages(case.logits, block.logits)
        release_pages(case.labels, block.labels)


@dataclass
class Denominators:
    """Running counts from which every ``mean`` denominator follows."""

    class_counts: FloatArray
    counted: int = 0
    rows: int = 0

    def add(self, case: Case, block: Block) -> None:
        self.rows += len(block.labels)
        if case.spec.family == "sigmoid":
            self.counted += int(np.count_nonzero(block.valid_elements))
        elif case.label_kind == "index":
            keep = block.valid
            self.counted += int(np.count_nonzero(keep))
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
        self.pipeline = pipeline
        self.precision = precision
        self.runner = StageRunner(precision, pipeline.all_stages)
        # the backward pass visits the stages in reverse: its "first bad stage" is the first
        # one the gradient passes through that turns it bad
        self.gradient_runner = StageRunner(precision, tuple(reversed(pipeline.all_stages)))
        self._parts: list[FloatArray] = []
        self._fed: tuple[int, int] | None = None  # (start, rows) of the block last fed

    def feed(self, case: Case, block: Block) -> None:
        self.runner.bind(_watched_rows(case, block), block.start)
        self._parts.append(self.pipeline.per_example(self.runner, block))
        self._fed = (block.start, len(block.labels))

    def gradient(self, case: Case, block: Block, denominators: Denominators) -> FloatArray | None:
        """The block's gradient with respect to the logits, in D (None: not applicable).

        ``denominators`` must already hold the whole input's counts (the upstream gradient of
        a ``mean`` is one over its denominator).
        """
        weights = case.spec.class_weights
        if weights is not None:
            weights = self.precision.round(weights).astype(np.float64)
        upstream = upstream_gradient(case, denominators, weights)
        self.gradient_runner.bind(_watched_rows(case, block), block.start)
        # the forward values of this block, when it was just fed; else backward recomputes them
        fed = self._fed == (block.start, len(block.labels))
        saved = self.runner.saved if fed else {}
        return self.pipeline.backward(self.gradient_runner, block, upstream, saved)

    def finish(self, case: Case, denominators: Denominators) -> tuple[FloatArray, FloatArray]:
        """The reduced loss (the per-example array for ``none``) and the per-example losses."""
        per_example = np.concatenate(self._parts) if self._parts else np.zeros(0)
        weights = case.spec.class_weights
        if weights is not None:
            weights = self.precision.round(weights).astype(np.float64)
        loss = reduce_losses(
            self.runner, per_example, case.spec.reduction,
            denominators.mean_denominator(case, weights),
        )
        return loss, per_example


def _watched_rows(case: Case, block: Block) -> FloatArray:
    # Softmax rows that are ignored are not watched; sigmoid masks element by element.
    return block.valid if case.spec.family == "softmax" else np.ones(len(block.labels), bool)


def upstream_gradient(case: Case, denominators: Denominators,
                      weights: FloatArray | None) -> float:
    """d(loss) / d(per-example loss): one over the mean's denominator, else 1."""
    if case.spec.reduction != "mean":
        return 1.0
    return 1.0 / denominators.mean_denominator(case, weights)


def run_pipeline(
    pipeline: Pipeline, precision: Precision, case: Case
) -> tuple[FloatArray, FloatArray, StageRunner]:
    """Run one pipeline in one precision over a whole case: (loss, per-example, runner)."""
    run = PipelineRun(pipeline, precision)
    denominators = Denominators(np.zeros(case.classes))
    for block in blocks(case):
        run.feed(case, block)
        denominators.add(case, block)
    loss, per_example = run.finish(case, denominators)
    return loss, per_example, run.runner
