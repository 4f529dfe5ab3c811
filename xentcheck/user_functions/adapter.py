"""The contract between xentcheck and one framework's way of running a user's loss function.

An :class:`Adapter` calls the user's function on inputs already rounded to the storage dtype D,
watches every operation the framework executes (forward and, where asked, backward), and hands
back plain numpy data: the losses, the gradient from the framework's own autodiff, and the
operations that first went bad, each located in the user's source. Everything after that
(errors against the reference, flags, reports) is the evaluator's, as for any pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..precision import FloatArray

# A user's loss: ``fn(logits, labels)`` in the framework's own array type.
LossFunction = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class OpEvent:
    """An operation that created trouble from clean operands.

    ``op`` names the operation as the framework does (``aten::exp``, ``exp``); ``kind`` is
    one of :data:`xentcheck.stages.EVENT_KINDS`; ``index`` the first offending position in
    the operation's output; ``source`` the ``FILE:LINE`` of the innermost frame in the user's
    file (None where the framework does not say), FILE being ``user_file`` as given to
    :meth:`Adapter.call` (``str(user_file)``: the pipeline shows it as the user wrote it).
    ``shape`` is the shape of the operation's output: where it starts with the inputs'
    leading shape, the index is a position in the input and is reported as one (None, or
    another shape: the position is not reported)."""

    op: str
    kind: str
    index: tuple[int, ...]
    source: str | None
    shape: tuple[int, ...] | None = None


@dataclass
class CallResult:
    """What one call of the user's function gave, as numpy data.

    ``losses`` holds values of D in a float64 array: the per-example losses (the logits'
    leading shape) or a 0-d array where the function reduces itself. ``gradient`` is
    d(loss)/d(logits) in D (float64 array of the logits' shape), None where not asked for
    or where the framework cannot differentiate. Events are in execution order; the first
    is the first bad operation."""

    losses: FloatArray
    events: list[OpEvent] = field(default_factory=list)
    gradient: FloatArray | None = None
    gradient_events: list[OpEvent] = field(default_factory=list)


class Adapter(Protocol):
    """One framework's way of calling, watching and differentiating a user's loss."""

    #: ``numpy``, ``torch`` or ``jax``
    framework: str

    def call(
        self,
        fn: LossFunction,
        logits: np.ndarray[Any, Any],
        labels: np.ndarray[Any, Any],
        *,
        user_file: Path | None,
        upstream: float | None,
    ) -> CallResult:
        """Call ``fn`` on ``logits`` (an array of D: numpy float16/32/64 or an ml_dtypes
        bfloat16/fp8 array, the case's own shape) and ``labels`` (int64 class ids, or float
        targets in D), watching every operation; frames in ``user_file`` locate the events.

        ``upstream``: None for no gradient; else the backward pass runs from
        ``d(reduced loss)/d(losses)`` equal to ``upstream`` at every per-example loss (1 for
        a function that returns a scalar) through the framework's autodiff.

        A function that raises, returns something other than a floating array of the
        framework (a value of another framework, an integer array), or a shape other than
        the leading shape, the logits' own shape (a sigmoid loss: one loss per element) or
        a scalar raises :class:`xentcheck.errors.InputError` with one
        line naming what went wrong (for a raise: the exception's type, message and the
        user's ``FILE:LINE``)."""
        ...
