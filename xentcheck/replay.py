"""Replaying a pipeline over a row split across its classes: the passes, and the
signal a pass's row reduction raises when it has taken its chunk's part. The
:class:`~xentcheck.stages.StageRunner` runs each chunk through a :class:`ReplayCursor`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class PassComplete(Exception):
    """Raised by the reduction a pass collects: this chunk's part of it is taken (``step``
    folds it into the state of the chunks before, None at the first; ``finish`` turns the
    state of all chunks into the whole-row result), the rest of the pass over this chunk
    is not needed."""

    def __init__(self, step: Callable[[Any], Any], finish: Callable[[Any], Any]) -> None:
        super().__init__("a row reduction's part is taken")
        self.step, self.finish = step, finish


@dataclass
class Replay:
    """A row split across its classes, run chunk by chunk, in passes (see :class:`StageRunner`).

    Pass ``k`` runs the pipeline over each chunk up to its ``k``-th row reduction, which
    hands over the chunk's part (:class:`PassComplete`); the reductions before it return the
    whole-row results of the earlier passes (``results``). When a pass runs to its end on
    every chunk, every reduction is known and that pass computes (and watches) everything,
    chunk by chunk. Chunks of one pass are independent: they may run on several threads.
    """

    results: list[Any] = field(default_factory=list)


@dataclass
class ReplayCursor:
    """One chunk's way through a pass: which of the row's reductions comes next."""

    replay: Replay
    counter: int = 0
