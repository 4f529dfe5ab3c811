"""A user's loss function as one more pipeline: the evaluator, limits and sweeps run it as
they run every formulation, and reports, JSON, CI formats and expectations take its results
unchanged (their ``pipeline`` is the SPEC as given).

How a call fits the evaluator:

- The function sees the inputs rounded to D in the case's own shape (``(batch, seq,
  vocab)`` stays so): it is called once on the whole case (:attr:`Pipeline.whole_case`), so
  an input with a user function runs as one block, not streamed in row blocks.
- It returns per-example losses (the leading shape; sigmoid: the logits' shape), which are
  reduced as every pipeline's are (:func:`~xentcheck.pipelines.reduce_losses`), or a
  scalar, its own reduction, compared with the reference reduced with the case's
  ``reduction``. Where per-example losses are needed from a function that returns a scalar
  (``reduction: none``, limits, sweeps) it is called once per example, on a batch of one.
- Its stages are the framework's operations as they run: each event names the op
  (``exp``, ``aten::exp``), where it first went bad (in the input's coordinates where the
  op's output has the input's leading shape), and ``FILE:LINE`` in the user's file as the
  user wrote it.
- Its gradient, where the framework gives one, is that of the reduced loss with respect to
  the logits, its backward pass seeded with d(reduced loss)/d(per-example loss) as the
  case's reduction forms it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import cache
from typing import Any, ClassVar

import numpy as np

from ..case import Case
from ..errors import InputError
from ..pipelines import Block, Pipeline, Saved, reduce_losses
from ..precision import FloatArray, Precision
from ..stages import StageEvent, StageRunner
from . import adapter_for
from .adapter import Adapter, CallResult, OpEvent
from .loading import UserFunction

# One call of a user's function at a time, whichever thread asks (the evaluator measures
# blocks, and finds limits, on several): neither the user's code nor a framework's global
# switches (autograd's anomaly mode) are assumed safe to run concurrently.
_CALLS = threading.Lock()


class UserPipeline(Pipeline):
    """A user's function, run through its framework's :class:`Adapter`. One subclass per
    (function, family, input kind, rank) is made by :func:`user_pipeline`, which sets the
    class attributes every pipeline has."""

    stages: ClassVar[tuple[str, ...]] = ()  # the framework's ops, named as they run
    framework = True  # set side by side with the frameworks' answers; no closed-form limits
    default = False
    splittable = False
    whole_case = True
    every_limit_pattern = True
    takes_options = False  # the function is the whole loss: options are its own to apply

    def unsupported(self, precision: Precision) -> str | None:
        """None: a user's function runs in every dtype, the 8-bit ones included (numpy takes
        ml_dtypes' float8 arrays; what the function does with them is its finding)."""
        return None

    def __init__(self, function: UserFunction, adapter: Adapter, rank: int) -> None:
        self.function = function
        self.adapter = adapter
        # the number of axes of the logits the function is given (a batch of rows from a
        # limit search or a sweep is framed to it: (rows, 1, ..., C))
        self.rank = rank
        # whether the function returns a scalar, by the shape of the inputs it was given
        self._scalar: dict[tuple[int, ...], bool] = {}

    # -- calling --------------------------------------------------------------------------

    def _inputs(self, precision: Precision,
                block: Block) -> tuple[Any, Any, tuple[int, ...], tuple[int, ...]]:
        """The block's inputs rounded to D in D's own dtype, framed in the case's shape
        (a part of the case: a batch of its rows), the shape of their losses, and the
        leading axes the case's rows flatten."""
        case = block.case
        framed = self._framed_shape(case, len(block.labels))
        with np.errstate(all="ignore"):  # rounding may overflow: the function sees inf
            logits = precision.round(block.logits).astype(precision.dtype).reshape(framed)
            if case.label_kind == "index":
                labels = np.asarray(block.labels).astype(np.int64).reshape(framed[:-1])
            else:
                labels = precision.round(block.labels).astype(precision.dtype).reshape(framed)
        if case.spec.family == "softmax":
            return logits, labels, framed[:-1], framed[:-1]
        return logits, labels, framed, framed if len(framed) == 1 else framed[:-1]

    def _framed_shape(self, case: Case, rows: int) -> tuple[int, ...]:
        """The shape the function is called with: the case's own for all its rows; else
        ``rows`` rows as a batch, with the function's rank (other leading axes of length
        one; a 1-D sigmoid's elements in a row)."""
        if rows == case.rows and case.logits.ndim == self.rank:
            return case.shape
        if self.rank == 1:
            return (case.classes,) if case.spec.family == "softmax" else (rows * case.classes,)
        return (rows, *(1,) * (self.rank - 2), case.classes)

    def _one_call(self, block: Block) -> bool:
        """Whether one call can take the block's rows (a 1-D softmax function takes one)."""
        return not (self.rank == 1 and block.case.spec.family == "softmax"
                    and len(block.labels) > 1)

    def _call(self, logits: Any, labels: Any, upstream: float | None) -> CallResult:
        try:
            with _CALLS:
                return self.adapter.call(self.function.function, logits, labels,
                                         user_file=self.function.file, upstream=upstream)
        except InputError as exc:
            message, file = exc.message, self.function.file
            if file is not None:  # the user's file as they wrote it
                message = message.replace(f"{file}:", f"{self.function.shown}:")
            cause = exc.cause or exc.__cause__  # the user's exception, for --traceback
            raise InputError(message, source=self.function.spec, cause=cause) from cause

    def _losses(self, result: CallResult, expected: tuple[int, ...]) -> FloatArray | None:
        """The per-example losses, or None where the function returned a scalar."""
        losses = np.asarray(result.losses, dtype=np.float64)
        if losses.ndim == 0 and expected != ():
            return None
        if losses.shape != expected:
            raise InputError(f"returned losses of shape {list(losses.shape)}; expected "
                             f"{list(expected)} (one per example) or a scalar",
                             source=self.function.spec)
        return losses

    def _note(self, run: StageRunner, events: list[OpEvent], leading: tuple[int, ...],
              row_offset: int) -> None:
        for event in events:
            run.note(StageEvent(event.op, event.kind,
                                _row_first(event, leading, row_offset), self._source(event)))

    def _source(self, event: OpEvent) -> str | None:
        """``FILE:LINE`` with FILE as the user wrote it in SPEC."""
        source, file = event.source, self.function.file
        if source is None or file is None:
            return source
        path, _, line = source.rpartition(":")
        return f"{self.function.shown}:{line}" if path == str(file) else source

    # -- the pipeline ---------------------------------------------------------------------

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        if not self._one_call(block):
            return self._one_by_one(run, block)
        logits, labels, expected, leading = self._inputs(run.precision, block)
        result = self._call(logits, labels, None)
        losses = self._losses(result, expected)
        self._scalar[block.case.shape] = losses is None
        if losses is not None:
            self._note(run, result.events, leading, block.start)
            return _rows(block, losses)
        if block.case.spec.reduction != "none" and len(block.labels) == block.case.rows:
            # its own reduction: :meth:`reduce` returns it; no per-example losses to show
            self._note(run, result.events, leading, block.start)
            return np.full(block.case.rows, np.nan)
        return self._one_by_one(run, block)

    def _one_by_one(self, run: StageRunner, block: Block) -> FloatArray:
        """Per-example losses of a function that returns a scalar: one call per example,
        on a batch of one."""
        parts = []
        for one in _examples(block):
            logits, labels, expected, leading = self._inputs(run.precision, one)
            result = self._call(logits, labels, None)
            if np.ndim(result.losses) != 0:
                raise InputError("returned a scalar for the whole case but not for a batch "
                                 "of one example", source=self.function.spec)
            self._note(run, result.events, leading, one.start)
            parts.append(np.full(expected or (1,), float(result.losses)).reshape(-1))
        return _rows(block, np.concatenate(parts))

    def backward(self, run: StageRunner, block: Block, upstream: float,
                 saved: Saved | None = None) -> FloatArray | None:
        case = block.case
        if not case.spec.from_logits:
            return None  # probability inputs: no gradient to check, as for every pipeline
        if not self._one_call(block) or (self._scalar.get(case.shape) and (
                case.spec.reduction == "none" or len(block.labels) != case.rows)):
            return self._backward_one_by_one(run, block, upstream)
        logits, labels, _, leading = self._inputs(run.precision, block)
        result = self._call(logits, labels, upstream)
        if result.gradient is None:
            return None
        self._note(run, result.gradient_events, leading, block.start)
        return np.asarray(result.gradient, dtype=np.float64).reshape(block.logits.shape)

    def _backward_one_by_one(self, run: StageRunner, block: Block,
                             upstream: float) -> FloatArray | None:
        parts = []
        for one in _examples(block):
            logits, labels, _, leading = self._inputs(run.precision, one)
            result = self._call(logits, labels, upstream)
            if result.gradient is None:
                return None
            self._note(run, result.gradient_events, leading, one.start)
            parts.append(np.asarray(result.gradient, dtype=np.float64).reshape(1, -1))
        return np.concatenate(parts).reshape(block.logits.shape)

    def reduce(self, run: StageRunner, per_example: FloatArray, reduction: str,
               denominator: float, case: Case | None = None) -> FloatArray:
        if reduction == "none" or case is None or not self._scalar.get(case.shape):
            return reduce_losses(run, per_example, reduction, denominator)
        # the function reduces itself: its answer on the whole case (events were noted
        # by the forward pass, which made the same call)
        whole = Block(case, case.logits_rows(), case.labels_rows())
        logits, labels, _, _ = self._inputs(run.precision, whole)
        return np.asarray(self._call(logits, labels, None).losses, dtype=np.float64)


def _examples(block: Block) -> Iterator[Block]:
    """The block's rows as blocks of one example each (a function that returns a scalar is
    called on each, where per-example values are needed)."""
    for row in range(len(block.labels)):
        yield Block(block.case, block.logits[row:row + 1], block.labels[row:row + 1],
                    block.start + row)


def _rows(block: Block, losses: FloatArray) -> FloatArray:
    """Losses in the evaluator's row layout: ``(N,)`` softmax, ``(N, K)`` sigmoid."""
    if block.case.spec.family == "softmax":
        return losses.reshape(len(block.labels))
    return losses.reshape(block.logits.shape)


def _row_first(event: OpEvent, leading: tuple[int, ...], row_offset: int) -> tuple[int, ...]:
    """An op's index as the evaluator's events hold it: the row (of the flattened leading
    axes) first, then the op's own further axes, where the op's output has the call's
    leading shape (an input-shaped or per-example array); else ``()`` (no position in the
    input's coordinates: a batch sum, a transposed array)."""
    shape = event.shape
    if shape is None or tuple(shape[:len(leading)]) != leading or not event.index:
        return ()
    head, rest = event.index[:len(leading)], event.index[len(leading):]
    row = int(np.ravel_multi_index(head, leading)) if leading else 0
    return (row + row_offset, *rest)


@cache
def user_pipeline(function: UserFunction, family: str, from_logits: bool,
                  rank: int = 2) -> Pipeline:
    """The pipeline that runs ``function`` on cases of ``family`` whose logits have ``rank``
    axes (one object per function and kind of case, so that the limits found on it are
    cached like any pipeline's; their rows reach it framed to that rank)."""
    adapter = adapter_for(function.framework)
    attributes = {
        "name": function.spec,
        "family": family,
        "from_logits": from_logits,
        "formula": f"{function.spec} ({function.framework})",
    }
    cls = type(f"UserPipeline_{family}", (UserPipeline,), attributes)
    pipeline: Pipeline = cls(function, adapter, rank)
    return pipeline
