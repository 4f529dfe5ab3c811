"""The gradient's measurement: a run's gradient against the reference gradient, its flags,
and where it went bad.

The error is normwise, ``max |g - g_ref| / max |g_ref|`` over the counted entries; where
the reference gradient is identically zero (one class; every row ignored) it is the
absolute error ``max |g|``, judged against the absolute tolerance. An entry that is NaN
makes the error NaN, an infinite one inf; ``precision_loss`` is raised exactly when a
finite error passes its tolerance, and every ``nan``, ``inf`` or ``zeroed`` flag has a
stage (:func:`gradient_first_bad`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .backward import trace_entry
from .case import Case
from .execution import Denominators, PipelineRun
from .findings import GRAD_FLAGS, Tolerance
from .pipelines import Block
from .precision import FloatArray, Precision
from .stages import StageEvent


@dataclass
class GradientStats:
    """A run's gradient against the reference gradient, gathered block by block.

    The error is normwise, ``max |g - g_ref| / max |g_ref|``; where the reference gradient
    is identically zero (one class; every row ignored) it is the absolute error
    ``max |g|`` instead, judged against the absolute tolerance, so an exact 0 has error 0.
    An entry that is NaN makes the error NaN, an infinite one (and no NaN) inf.
    """

    largest_error: float = 0.0
    largest_reference: float = 0.0
    nan: bool = False
    inf: bool = False
    zeroed: tuple[int, int] | None = None  # first entry flushed to 0 that should not be
    nonfinite: tuple[int, int] | None = None  # first NaN or infinite entry
    seen: bool = False
    # per row: max |g - g_ref| / max |g_ref| (the absolute error where the row's reference
    # is 0; NaN where the row's gradient is not finite)
    rows: list[FloatArray] = field(default_factory=list)
    # a split row's running row maxima of |g - g_ref| and |g_ref|, until close_rows
    pending: tuple[FloatArray, FloatArray] | None = None

    def add(self, block: Block, gradient: FloatArray, reference: FloatArray,
            precision: Precision) -> None:
        """Take in a block's gradient, or a split row's chunk (chunks in order, then
        :meth:`close_rows`): positions are in the whole input's rows and columns."""
        self.seen = True
        first_column = block.columns[0] if block.columns is not None else 0
        # Every row counts here, ignored ones included: their true gradient is 0, and a NaN
        # that autograd puts there (0 / 0 in log's backward) reaches the weights all the same.
        computed = np.asarray(gradient).reshape(reference.shape)  # in D: no float64 copy
        with np.errstate(invalid="ignore"):
            # |g - g_ref| in float64 (numpy widens D in the loop); NaN where g is NaN or
            # inf - inf. Reused in place: these are the block's largest temporaries.
            error = np.subtract(computed, reference, dtype=np.float64)
            np.abs(error, out=error)
        row_error = error.max(axis=-1)  # NaN propagates: a row with a NaN entry is NaN
        del error
        row_reference = np.maximum(reference.max(axis=-1), -reference.min(axis=-1))
        bad_rows = ~np.isfinite(row_error)
        if bad_rows.any():
            first_row = int(np.argmax(bad_rows))
            bad = np.asarray(computed[bad_rows], dtype=np.float64)
            self.nan |= bool(np.isnan(bad).any())
            self.inf |= bool(np.isinf(bad).any())
            if self.nonfinite is None:
                column = int(np.argmax(~np.isfinite(bad[0])))
                self.nonfinite = (block.start + first_row, first_column + column)
        if self.zeroed is None:
            # entries flushed to 0 whose true value is a normal number of D; the comparison
            # with 0 runs in D, and the reference is looked at only where it holds
            flushed = np.flatnonzero(precision.iszero(computed))
            if flushed.size:
                harmed = np.abs(reference.ravel()[flushed]) >= precision.tiny
                if harmed.any():
                    row, col = np.unravel_index(int(flushed[np.argmax(harmed)]),
                                                reference.shape)
                    self.zeroed = (block.start + int(row), first_column + int(col))
        if self.pending is not None:  # maxima merge exactly; NaN propagates
            row_error = np.maximum(self.pending[0], row_error)
            row_reference = np.maximum(self.pending[1], row_reference)
        self.pending = (row_error, row_reference)
        if block.columns is None:
            self.close_rows()

    def close_rows(self) -> None:
        """The rows taken in are complete: their errors count."""
        if self.pending is None:
            return
        row_error, row_reference = self.pending
        self.pending = None
        bad_rows = ~np.isfinite(row_error)
        finite_rows = row_error[~bad_rows]
        if finite_rows.size:
            self.largest_error = max(self.largest_error, float(finite_rows.max()))
        self.largest_reference = max(self.largest_reference, float(row_reference.max()))
        with np.errstate(invalid="ignore", divide="ignore"):
            relative = np.where(row_reference == 0, row_error, row_error / row_reference)
        self.rows.append(np.where(bad_rows, np.nan, relative))

    def merge(self, later: GradientStats) -> None:
        """Take in the statistics of a later block."""
        self.seen |= later.seen
        self.largest_error = max(self.largest_error, later.largest_error)
        self.largest_reference = max(self.largest_reference, later.largest_reference)
        self.nan |= later.nan
        self.inf |= later.inf
        self.zeroed = self.zeroed if self.zeroed is not None else later.zeroed
        self.nonfinite = self.nonfinite if self.nonfinite is not None else later.nonfinite
        self.rows.extend(later.rows)

    @property
    def absolute(self) -> bool:
        """Whether the error is absolute (the reference gradient is identically zero)."""
        return self.largest_reference == 0

    def error(self) -> float | None:
        """The gradient's error (None: no gradient was checked); see the class docstring."""
        if not self.seen:
            return None
        if self.nan:
            return float("nan")
        if self.inf:
            return float("inf")
        if self.absolute:
            return self.largest_error
        return self.largest_error / self.largest_reference

    def beyond(self, tol: Tolerance) -> bool:
        """Whether a finite error is beyond the tolerance (absolute or relative, as kind)."""
        error = self.error()
        if error is None or not np.isfinite(error):
            return False
        return bool(error > (tol.abs if self.absolute else tol.rel))

    def first_bad_entry(self) -> tuple[int, int] | None:
        """The entry to trace when no backward step was seen to go bad: the first non-finite
        one, else the first flushed one."""
        return self.nonfinite if self.nonfinite is not None else self.zeroed


def gradient_flags(stats: GradientStats, tol: Tolerance) -> tuple[str, ...]:
    raised = {
        "nan": stats.nan,
        "inf": stats.inf,
        "zeroed": stats.zeroed is not None,
        "precision_loss": stats.beyond(tol),
    }
    return tuple(flag for flag in GRAD_FLAGS if raised[flag])


def gradient_first_bad(case: Case, run: PipelineRun, denominators: Denominators,
                        stats: GradientStats) -> StageEvent | None:
    """Where the gradient went bad: the backward runner's first event, or, where it saw
    none (a flush to zero is not watched for), the first step that turned the first bad
    entry bad, found by re-running that entry's row alone."""
    event = run.gradient_runner.first_event()
    entry = stats.first_bad_entry()
    if event is not None or entry is None:
        return event
    row, column = entry
    block = Block(case, case.logits_rows(row, row + 1), case.labels_rows(row, row + 1), row)
    return trace_entry(run.pipeline, run.precision, block, column,
                       run.upstream(case, denominators))
