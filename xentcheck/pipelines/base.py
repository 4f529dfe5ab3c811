"""The pieces every pipeline is built from: a block of rows, the Pipeline interface, and the
batch reduction every pipeline shares.

A pipeline turns a block of rows into per-example losses in the storage dtype by calling
named steps on a :class:`~xentcheck.stages.StageRunner`, which rounds and watches every step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np

from .. import extrema
from ..arrays import release_pages
from ..case import Case, softmax_coefficients, valid_elements, valid_rows
from ..precision import FloatArray, Precision
from ..stages import StageRunner

# Forward values a pipeline keeps for its backward pass, by name.
Saved = Mapping[str, FloatArray]


@dataclass(frozen=True)
class Block:
    """Rows ``start : start + len(logits)`` of a case, as 2-D arrays."""

    case: Case
    logits: FloatArray
    labels: FloatArray
    start: int = 0
    # a row split across its classes: the classes ``[c0, c1)`` these arrays hold
    columns: tuple[int, int] | None = None
    # a whole row too wide for one block: the width of its column chunks
    split: int | None = None

    def column_chunks(self) -> Iterator[Block]:
        """The block (one row, :attr:`split` set) as consecutive column chunks: views of
        ``split`` classes, the last one at least two wide (so that a per-class array is
        never mistaken for a per-row one)."""
        width = self.case.classes
        step = self.split or width
        starts = list(range(0, width, step))
        if len(starts) > 1 and width - starts[-1] < 2:
            starts.pop()
        for start, stop in zip(starts, [*starts[1:], width], strict=True):
            labels = self.labels if self.case.label_kind == "index" else self.labels[:, start:stop]
            chunk = Block(self.case, self.logits[:, start:stop], labels, self.start, (start, stop))
            yield chunk
            # a memory-mapped row's pages need not stay resident once a chunk is done (a
            # block of rounded copies holds no pages of the input)
            for given, view in ((self.case.logits, chunk.logits), (self.case.labels, labels)):
                if np.may_share_memory(given, view):
                    release_pages(given, view)

    def per_class(self, values: FloatArray) -> FloatArray:
        """Per-class ``values`` (class weights, pos_weight) for this block's classes."""
        values = np.asarray(values)
        if self.columns is None or values.ndim == 0 or values.shape[-1] != self.case.classes:
            return values
        return values[..., self.columns[0]:self.columns[1]]

    def softmax_coefficients(self) -> FloatArray:
        """The block's coefficients a[i, c] (:func:`~xentcheck.case.softmax_coefficients`)."""
        return softmax_coefficients(self.case, self.labels, self.columns)

    @cached_property
    def valid(self) -> FloatArray:
        """``(N,)``: rows that count."""
        return valid_rows(self.case, self.labels)

    @cached_property
    def valid_elements(self) -> FloatArray:
        """``(N, K)`` for sigmoid: targets that count."""
        return valid_elements(self.case, self.labels)

    @cached_property
    def target_mask(self) -> FloatArray:
        """``(N, C)``: True at each row's target class (integer labels). Built once per block:
        the textbook pipelines' forward and backward passes all ask for it."""
        mask = np.zeros(self.logits.shape, dtype=bool)
        start, stop = self.columns or (0, self.logits.shape[-1])
        rows = np.flatnonzero((self.target >= start) & (self.target < stop))
        mask[rows, self.target[rows] - start] = True
        return mask

    @cached_property
    def masked(self) -> FloatArray | None:
        """``(N, C)``: True at masked entries (``-inf`` logits, whose exp is an exact 0), or
        None where the block has none (one reduction in the input's own dtype)."""
        if not self.case.spec.from_logits:
            return None
        x = np.asarray(self.logits)
        if not x.size or not bool(extrema.minimum(x) == -np.inf):
            return None
        return np.asarray(x == -np.inf)

    def unmasked(self, positions: FloatArray) -> FloatArray:
        """``positions`` less the masked entries: the log of a masked entry's exact zero is
        an exact ``-inf``, not a pole that an earlier rounding hit."""
        return positions if self.masked is None else positions & ~self.masked

    @cached_property
    def target(self) -> FloatArray:
        """Integer labels with ignored rows pointed at class 0 (their losses are dropped)."""
        labels = np.asarray(self.labels).astype(np.int64)
        return np.where(self.valid, labels, 0)


class Pipeline(ABC):
    """One formulation of the loss.

    A row wider than a block (:func:`xentcheck.execution.blocks`) is run in column chunks
    (:meth:`Block.column_chunks`), in passes that replay the row's reductions
    (:class:`~xentcheck.replay.Replay`), so that every loss, event and gradient entry is
    the unsplit row's, bit for bit. That holds only if :meth:`per_example` and
    :meth:`backward` keep these rules (``tests/test_wide_rows.py`` and
    ``tests/test_wide_rows_masked.py`` run every registered pipeline split and whole):

    - every reduction over a row's classes goes through the runner: ``run.sum``,
      ``run.accumulate`` (an unrounded sum, watched with ``run.watch_reduction``),
      ``run.max``, ``run.argmax``, ``run.gather`` (and ``run.scatter`` for gather's
      backward), never ``np.sum``/``np.max``/``np.argmax``/``take_along_axis`` or a
      reduction inside a :meth:`~xentcheck.stages.StageRunner.fused` step's function
      (``tests/test_wide_rows_contract.py`` shows a fused kernel written this way);
      several reductions in a row (a log-sum-exp's max, then its sum) are several runner
      calls, made in the same order in every chunk, whatever the chunk's values;
    - forward values recomputed in :meth:`backward` come from ``run.unwatched(...)`` (it
      shares the chunk and the replayed reductions), never from a fresh ``StageRunner``;
    - per-class arrays (class weights, ``pos_weight``) are taken through
      ``block.per_class(...)`` and a softmax's coefficients through
      ``block.softmax_coefficients()`` (a chunk holds classes ``block.columns`` only);
      per-row values indexed by the target (``weights[block.target]``) use the whole
      array, and ``block.target_mask`` is the chunk's;
    - a step's branching may depend on per-row values (the same in every chunk) but not
      on a chunk's own values.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    from_logits: ClassVar[bool]
    formula: ClassVar[str]
    stages: ClassVar[tuple[str, ...]]
    # True for a pipeline that emulates what a library's loss computes (torch, jax, ...):
    # reports set its answers side by side with the other frameworks' and the truth
    framework: ClassVar[bool] = False
    # run when no pipeline is named; the others run when named (--pipeline, pipelines:)
    default: ClassVar[bool] = True
    # whether it keeps the replay contract below, so that a row wider than a block runs in
    # column chunks; one that does not runs such a row whole (right, memory not bounded)
    splittable: ClassVar[bool] = True
    # called once on the whole case (a user's loss function, in the case's own shape): an
    # input it runs on is one block, not streamed in blocks of rows
    whole_case: ClassVar[bool] = False
    # an opaque formulation (a user's function): its limits try every worst-case pattern,
    # nothing saying which one binds
    every_limit_pattern: ClassVar[bool] = False
    # whether xentcheck applies the case's loss options (temperature, soft-cap, z-loss)
    # around it; a user's function computes the whole loss from the inputs as given
    takes_options: ClassVar[bool] = True
    # a framework pipeline in the 8-bit formats: why it does not run there (the library's
    # float8 behaviour is not emulated; see :meth:`unsupported`)
    fp8_note: ClassVar[str] = "its library's float8 arithmetic is not emulated"

    def unsupported(self, precision: Precision) -> str | None:
        """Why this pipeline does not run in ``precision``, or None where it does.

        Every textbook formulation runs in every precision. A framework pipeline emulates a
        library bit for bit, verified against it; none is emulated in the 8-bit formats, so
        those pairs are left out (named explicitly, both, they are refused).
        """
        if self.framework and precision.is_fp8:
            return self.fp8_note
        return None

    @abstractmethod
    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        """Per-example losses in the storage dtype, zero at positions that do not count.

        Softmax: shape ``(N,)``; sigmoid: ``(N, K)``.
        """

    def backward(self, run: StageRunner, block: Block, upstream: float,
                 saved: Saved | None = None) -> FloatArray | None:
        """The gradient of the loss with respect to the inputs, ``(N, C)`` in D, computed as
        automatic differentiation of this formulation computes it; None where the
        formulation has no gradient to check (probability inputs). ``upstream`` is
        d(reduced loss) / d(per-example loss), a value of D; ``saved`` holds the forward
        values :meth:`per_example` kept for this block; missing ones are recomputed."""
        return None

    def reduce(self, run: StageRunner, per_example: FloatArray, reduction: str,
               denominator: float, case: Case | None = None) -> FloatArray:
        """The batch reduction of the per-example losses (the shared one by default; a
        framework pipeline overrides it with its library's own, e.g. a sum in D, which may
        need the whole ``case``: its labels, weights, or per-row parts the loss reduces
        separately)."""
        return reduce_losses(run, per_example, reduction, denominator)

    def reduction_gradient(self, precision: Precision, reduction: str,
                           denominator: float) -> float:
        """d(reduced loss) / d(per-example loss), a value of D, as this formulation's
        autodiff forms it (see :func:`xentcheck.backward.reduction_gradient`)."""
        from ..backward import reduction_gradient  # backward imports this module's types

        return reduction_gradient(precision, reduction, denominator)

    @property
    def all_stages(self) -> tuple[str, ...]:
        return (*self.stages, "reduce")


def reduce_losses(
    run: StageRunner, per_example: FloatArray, reduction: str, denominator: float
) -> FloatArray:
    """The batch reduction every pipeline shares: accumulate, divide for ``mean``, round to D.

    ``mean`` is one rounding of ``sum / denominator`` evaluated in the accumulate dtype, as
    ``torch.mean`` and ``nll_loss`` do for half tensors; ``sum`` rounds the sum to D (so a
    float16 sum of 100,000 ones is inf).
    """
    if reduction == "none":
        return per_example
    flat = np.asarray(per_example).reshape(-1)
    run.bind(np.ones(1, dtype=bool))
    total = run.accumulate(flat)
    if reduction == "mean":
        with np.errstate(all="ignore"):
            total = total / np.asarray(denominator, dtype=total.dtype)
    out = run.precision.round(total)
    run.watch_reduction("reduce", out, flat, unrounded=total)
    return out
