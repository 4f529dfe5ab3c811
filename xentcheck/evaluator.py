"""The evaluator: runs pipelines in precisions over a case and measures them against the reference.

There is one way to run a pipeline (:mod:`xentcheck.execution`) and one reference
(:mod:`xentcheck.reference`); this module feeds both the same blocks of rows, in one pass
over the input, and turns what they produced into findings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import combinations

import numpy as np

from . import reference as ref
from .case import Case, softmax_coefficients, target_coefficients, valid_elements
from .chunking import chunk_sums, combine_chunk_sums, row_sum
from .execution import (
    BlockRun,
    Denominators,
    PipelineRun,
    block_size,
    blocks,
    in_order,
    release_block,
    upstream_gradient,
    worker_count,
)
from .findings import (
    FLAGS,
    Finding,
    FrameworkAnswer,
    FrameworkComparison,
    InputStats,
    MaskedInputs,
    Mismatch,
    ReferenceValue,
    ScenarioResult,
    Tolerance,
)
from .gradients import GradientStats as _GradientStats
from .gradients import gradient_first_bad as _gradient_first_bad
from .gradients import gradient_flags as _gradient_flags
from .limits import pipeline_limit, prefetch_limits
from .misuse import SUM_TOLERANCE, check_case, masked_inputs, merge_masked
from .pipelines import Block, Pipeline
from .precision import FloatArray, Precision
from .reference_split import split_row_reference
from .stages import StageEvent, StageRunner

# Called with (rows done, rows in all) after each block.
Progress = Callable[[int, int], None]


# -- the reference ---------------------------------------------------------------------------


def reference_per_example(block: Block) -> FloatArray:
    """Reference losses of one block: ``(N,)`` for softmax, ``(N, K)`` for sigmoid."""
    return reference_block(block, gradient=False)[0]


def _sparse_labels(block: Block) -> bool:
    spec = block.case.spec
    return block.case.label_kind == "index" and not spec.label_smoothing


def reference_block(block: Block, *, gradient: bool,
                    gradient_scale: float = 1.0) -> tuple[FloatArray, FloatArray | None]:
    """The block's reference losses and, with ``gradient``, the reference gradient of the
    per-example losses with respect to the logits (``(N, C)``; None for probability
    inputs), times ``gradient_scale`` (the upstream gradient of the reduction). Both come
    from the same intermediates, computed once."""
    case = block.case
    spec = case.spec
    if spec.family == "sigmoid":
        counted = valid_elements(case, block.labels)
        loss_fn = ref.sigmoid_losses if spec.from_logits else ref.sigmoid_probability_losses
        pos = None if spec.pos_weight is None else block.per_class(spec.pos_weight)
        weights = None if spec.class_weights is None else block.per_class(spec.class_weights)
        losses = loss_fn(block.logits, block.labels, pos, weights)
        grad = None
        if gradient and spec.from_logits:
            grad = np.where(counted, ref.sigmoid_gradients(
                block.logits, block.labels, pos, weights), 0.0)
            grad *= gradient_scale
        return np.where(counted, losses, 0.0), grad
    if not spec.from_logits:
        coef = softmax_coefficients(case, block.labels)
        return ref.softmax_probability_losses(block.logits, coef), None
    parts = ref.shifted_log_sum(block.logits)
    if _sparse_labels(block):
        target_weight = target_coefficients(case, block.labels)
        losses = ref.softmax_index_losses(block.logits, block.target, target_weight, parts)
        grad = ref.softmax_index_gradients(block.logits, block.target,
                                           target_weight * gradient_scale,
                                           parts) if gradient else None
        return losses, grad
    coef = softmax_coefficients(case, block.labels)
    losses = ref.softmax_losses(block.logits, coef, parts)
    if not gradient:
        return losses, None
    grad = ref.softmax_gradients(block.logits, coef, parts)
    grad *= gradient_scale
    return losses, grad


def rounded_block(block: Block, precision: Precision, rounded_case: Case) -> Block:
    """The block with its float inputs rounded to D (as a pipeline in D first does)."""
    labels = block.labels
    if block.case.label_kind != "index":
        labels = precision.round(labels).astype(np.float64)
    logits = precision.round(block.logits).astype(np.float64)
    return replace(block, case=rounded_case, logits=logits, labels=labels)


def _held_exactly(block: Block, precision: Precision, rounded_case: Case) -> bool:
    """Whether D holds the block's inputs by their dtypes alone (float32 logits in float32
    or float64, say), so rounding them cannot change them; the weights are compared."""
    def fits(values: FloatArray) -> bool:
        given = np.asarray(values).dtype
        return given.kind not in "iub" and np.can_cast(given, precision.dtype, "safe")

    spec, rounded = block.case.spec, rounded_case.spec
    return (
        fits(block.logits)
        and (block.case.label_kind == "index" or fits(block.labels))
        and _same_optional(spec.class_weights, rounded.class_weights)
        and _same_optional(spec.pos_weight, rounded.pos_weight)
    )


def _same_inputs(block: Block, rounded: Block) -> bool:
    """Whether rounding to D left every input of the block unchanged."""
    case, other = block.case.spec, rounded.case.spec
    return (
        np.array_equal(block.logits, rounded.logits)
        and np.array_equal(block.labels, rounded.labels)
        and _same_optional(case.class_weights, other.class_weights)
        and _same_optional(case.pos_weight, other.pos_weight)
    )


def _same_optional(a: FloatArray | None, b: FloatArray | None) -> bool:
    return (a is None and b is None) or (
        a is not None and b is not None and np.array_equal(a, b)
    )


def _rounded_case(case: Case, precision: Precision) -> Case:
    def rnd(values: FloatArray | None) -> FloatArray | None:
        return None if values is None else precision.round(values).astype(np.float64)

    spec = replace(
        case.spec, class_weights=rnd(case.spec.class_weights), pos_weight=rnd(case.spec.pos_weight)
    )
    return replace(case, spec=spec)


def _reduce_reference(case: Case, per_example: FloatArray, denominator: float) -> float | None:
    if case.spec.reduction == "none":
        return None
    return ref.reduce(per_example, case.spec.reduction, denominator)


# -- measuring -------------------------------------------------------------------------------


def elementwise_errors(
    computed: FloatArray, truth: FloatArray, precision: Precision
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Absolute, relative and ulp errors (ulps of D at the truth), value by value.

    Equal infinities count as exact, and so does a NaN where the truth is NaN (a row whose
    every logit is masked: softmax is 0/0 in exact arithmetic too); NaN where either side
    alone makes the error undefined.
    """
    c = np.asarray(computed, dtype=np.float64).ravel()
    t = np.asarray(truth, dtype=np.float64).ravel()
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        same = (c == t) | (np.isnan(c) & np.isnan(t))  # covers equal infinities
        abs_err = np.where(same, 0.0, np.abs(c - t))
        rel_err = np.where(same, 0.0, abs_err / np.abs(t))
        ulp_err = np.where(same, 0.0, abs_err / precision.ulp(t))
    return abs_err, rel_err, ulp_err


def _errors(
    computed: FloatArray, truth: FloatArray, precision: Precision
) -> tuple[float, float, float, int | None]:
    """Largest absolute, relative and ulp errors over the values, and where the worst is.

    A NaN anywhere makes every error NaN (and marks where it is).
    """
    abs_err, rel_err, ulp_err = elementwise_errors(computed, truth, precision)
    if abs_err.size == 0:
        return 0.0, 0.0, 0.0, None
    if np.isnan(abs_err).any():
        worst = int(np.argmax(np.isnan(abs_err)))
        return float("nan"), float("nan"), float("nan"), worst
    worst = int(np.argmax(ulp_err))
    return float(abs_err.max()), float(rel_err.max()), float(ulp_err.max()), worst


def _beyond(computed: FloatArray, truth: FloatArray, tolerance: Tolerance) -> FloatArray:
    """Element-wise: farther from the truth than the tolerance allows (NaN is beyond)."""
    c = np.asarray(computed, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        ok = (c == t) | (np.abs(c - t) <= tolerance.abs + tolerance.rel * np.abs(t))
    return ~ok


def _flags(
    computed: FloatArray,
    target: FloatArray,
    rounded: FloatArray,
    runner: StageRunner,
    tolerance: Tolerance,
) -> tuple[str, ...]:
    """The flags of one finding (docs/json-report.md), judged value by value.

    ``precision_loss`` compares with the loss of the inputs rounded to D (the arithmetic's
    own error) wherever that is finite; ``input_rounding`` compares that loss with the
    reference of the inputs as given.
    """
    values = np.asarray(computed, dtype=np.float64)
    kinds = {e.kind for e in runner.events}
    rounded_finite = np.isfinite(rounded)
    raised = {
        "nan": bool(np.isnan(values).any()),
        "inf": bool(np.isinf(values).any()),
        "overflow": "overflow" in kinds,
        "underflow": "underflow" in kinds,
        "precision_loss": bool(
            (rounded_finite & np.isfinite(values) & _beyond(values, rounded, tolerance)).any()
        ),
        "input_rounding": bool(
            (np.isfinite(target) & (~rounded_finite | _beyond(rounded, target, tolerance))).any()
        ),
    }
    return tuple(flag for flag in FLAGS if raised[flag])


def _mismatches(findings: Sequence[Finding], tolerances: Mapping[str, Tolerance]) -> list[Mismatch]:
    """Pipelines of one precision that disagree: finiteness, or values beyond tolerance."""
    out: list[Mismatch] = []
    by_dtype: dict[str, list[Finding]] = {}
    for f in findings:
        by_dtype.setdefault(f.dtype, []).append(f)
    for dtype, group in by_dtype.items():
        tol = tolerances[dtype]
        for a, b in combinations(group, 2):
            va, vb = _values(a), _values(b)
            fa, fb = np.isfinite(va), np.isfinite(vb)
            if (fa != fb).any():
                i = int(np.argmax(fa != fb))
                out.append(Mismatch(dtype, (a.pipeline, b.pipeline), "finiteness",
                                    (float(va[i]), float(vb[i])), float("inf"),
                                    _flat_example(a, i)))
                continue
            with np.errstate(invalid="ignore"):
                both = fa & fb
                diff = np.where(both, np.abs(va - vb), 0.0)
                allowed = tol.abs + tol.rel * np.maximum(np.abs(va), np.abs(vb))
            bad = both & (diff > allowed)
            if bad.any():
                i = int(np.argmax(np.where(bad, diff, -1.0)))
                out.append(Mismatch(dtype, (a.pipeline, b.pipeline), "value",
                                    (float(va[i]), float(vb[i])), float(diff[i]),
                                    _flat_example(a, i)))
    return out


def _framework_comparisons(findings: Sequence[Finding], mismatches: Sequence[Mismatch],
                           reference: float | None,
                           focus: tuple[int, ...] | None) -> list[FrameworkComparison]:
    """Per dtype, each framework pipeline's answer: whether it agrees with the reference
    (finite where the reference is, no flag of a wrong loss), and which other frameworks it
    has a mismatch with (the pairwise mismatches above, restricted to frameworks)."""
    out = []
    dtypes = list(dict.fromkeys(f.dtype for f in findings if f.framework))
    for dtype in dtypes:
        group = [f for f in findings if f.framework and f.dtype == dtype]
        apart = {frozenset(m.pipelines) for m in mismatches if m.dtype == dtype}
        answers = tuple(
            FrameworkAnswer(
                pipeline=f.pipeline,
                loss=_answer(f, focus),
                agrees_with_reference=_within(f),
                differs_from=tuple(g.pipeline for g in group
                                   if frozenset((f.pipeline, g.pipeline)) in apart),
            )
            for f in group
        )
        out.append(FrameworkComparison(dtype, reference, answers))
    return out


def _within(finding: Finding) -> bool:
    """Whether a finding's loss is the reference's within its tolerance (equal infinities,
    and NaN where the reference is NaN, count as equal: their error is 0)."""
    error, tol = finding.abs_error, finding.tolerance
    return bool(np.isfinite(error)) and (error <= tol.abs or finding.rel_error <= tol.rel)


def _answer(finding: Finding, focus: tuple[int, ...] | None) -> float:
    if finding.loss is not None:
        return finding.loss
    assert finding.per_example is not None
    values = np.asarray(finding.per_example, dtype=np.float64)
    return float(values[focus] if focus is not None else values.ravel()[0])


def _flat_example(finding: Finding, flat: int) -> tuple[int, ...] | None:
    """Where a mismatch is, in the per-example losses' own shape (None: one reduced loss),
    so that a report can name the example whose values it quotes."""
    if finding.per_example is None:
        return None
    shape = np.shape(finding.per_example)
    return tuple(int(i) for i in np.unravel_index(flat, shape)) if shape else ()


def _focus_example(case: Case, findings: Sequence[Finding],
                   truth: _Truth) -> tuple[int, ...] | None:
    """For ``reduction: none``: the counted example where the pipelines are farthest from the
    reference (largest relative error over every finding; NaN, and a finite value where the
    reference is 0 or infinite, count as infinitely far), the first of equals. A table shows
    every pipeline's loss at this one example, so that its rows can be compared."""
    if truth.counted is None or not truth.counted.any():
        return None
    target = truth.values
    farthest = np.zeros(target.size)
    for finding in findings:
        computed = np.asarray(finding.per_example, dtype=np.float64).ravel()[truth.counted]
        with np.errstate(invalid="ignore", divide="ignore"):
            relative = np.where(computed == target, 0.0,
                                np.abs(computed - target) / np.abs(target))
        farthest = np.maximum(farthest, np.where(np.isnan(relative), np.inf, relative))
    return _example_index(case, int(np.flatnonzero(truth.counted)[int(np.argmax(farthest))]))


def _values(finding: Finding) -> FloatArray:
    if finding.loss is not None:
        return np.array([finding.loss])
    assert finding.per_example is not None
    return np.asarray(finding.per_example, dtype=np.float64).ravel()


# -- input statistics ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Extremes:
    """The input's extremes as a pipeline in D sees them (rounded to D, which is monotone:
    the rounded row maximum is the maximum of the rounded row), for the headrooms."""

    largest: float
    smallest: float
    spread: float | None  # row max minus a logged class's logit, largest over the rows
    # the smallest logit whose probability the formulation logs (softmax from logits)
    smallest_logged: float | None

    def merge(self, later: _Extremes) -> _Extremes:
        def most(a: float | None, b: float | None, pick: Callable[..., float]) -> float | None:
            return b if a is None else a if b is None else pick(a, b)

        return _Extremes(max(self.largest, later.largest), min(self.smallest, later.smallest),
                         most(self.spread, later.spread, max),
                         most(self.smallest_logged, later.smallest_logged, min))


@dataclass(frozen=True)
class _BlockStats:
    largest: float  # -inf where every entry is masked
    smallest: float  # the smallest unmasked entry; inf where every entry is masked
    spread: float | None  # row max minus a logged class's logit, largest over the block
    rows_sum_to_one: bool  # every value in [0, 1], every row summing to 1
    rounded: dict[str, _Extremes] = field(default_factory=dict)  # per dtype name
    masked: MaskedInputs = field(default_factory=MaskedInputs)


def _block_stats(block: Block, dtype_names: Sequence[str] = ()) -> _BlockStats:
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
    top = x.max(axis=-1).astype(np.float64)  # in the input's own dtype: no float64 copy
    bottom = np.asarray(x.min(axis=-1) if masked is None
                        else np.min(x, axis=-1, where=~masked, initial=np.inf),
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
    return _BlockStats(largest, smallest, spread, distributions, rounded, masked_inputs(block))


def _extremes(top: FloatArray, bottom: FloatArray, lowest: FloatArray | None,
              valid: FloatArray, precision: Precision | None) -> _Extremes:
    """Row maxima and minima, and the logged logits of the counted rows, reduced (rounded
    to D first, given a precision). A spread past float64's range (``[1e308, -1e308]``) is
    inf."""
    def rnd(values: FloatArray) -> FloatArray:
        if precision is None:
            return values
        return np.asarray(precision.round(values), dtype=np.float64)

    spread = logged = None
    if lowest is not None and lowest.size:
        top_r, lowest_r = rnd(top[valid]), rnd(lowest)
        with np.errstate(invalid="ignore", over="ignore"):
            gaps = top_r - lowest_r
        # inf - inf: both rounded past D's range; the pipeline's x - max is NaN there
        spread = float(np.where(np.isnan(gaps), np.inf, gaps).max())
        logged = float(lowest_r.min())
    return _Extremes(float(rnd(top).max()), float(rnd(bottom).min()), spread, logged)


def _split_stats(block: Block, dtype_names: Sequence[str]) -> _BlockStats:
    """:func:`_block_stats` of a row run in column chunks: the same values, from the row's
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
        top = max(top, float(x.max()))
        bottom = min(bottom, float(x.min() if masked is None
                                   else np.min(x, where=~masked, initial=np.inf)))
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
    return _BlockStats(top, bottom, spread, distributions, rounded, _split_masked(block))


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


# -- the whole evaluation --------------------------------------------------------------------


@dataclass
class _Pass:
    """What one pass over the input's blocks collected."""

    runs: list[PipelineRun]
    denominators: Denominators
    reference: list[FloatArray] = field(default_factory=list)
    rounded: dict[str, list[FloatArray]] = field(default_factory=dict)
    max_logit: float = -np.inf
    min_logit: float = np.inf
    max_spread: float | None = None
    rows_sum_to_one: bool = True
    masked: MaskedInputs = field(default_factory=MaskedInputs)
    extremes: dict[str, _Extremes] = field(default_factory=dict)  # per dtype, for headrooms
    gradients: list[_GradientStats] = field(default_factory=list)


@dataclass
class _BlockOutcome:
    """Everything measured on one block, before it is merged (in input order)."""

    reference: FloatArray
    rounded: dict[str, FloatArray]
    runs: list[BlockRun]
    gradients: list[_GradientStats]
    stats: _BlockStats
    rows_done: int


def _measure_block(case: Case, block: Block, runs: Sequence[PipelineRun],
                   denominators: Denominators, rounded_cases: Mapping[str, Case],
                   upstream: float) -> _BlockOutcome:
    """The reference and every run on one block, with the gradients measured and dropped."""
    if block.split is not None:
        return _measure_split(case, block, runs, denominators, rounded_cases, upstream)
    given, rounded, reference_gradient = _references(block, rounded_cases, upstream)
    outcomes, gradients = [], []
    for run in runs:
        outcome = run.run_block(case, block, denominators)
        measured = _GradientStats()
        if outcome.gradient is not None and reference_gradient is not None:
            measured.add(block, outcome.gradient, reference_gradient, run.precision)
        outcome.gradient = None  # measured: a block's gradients are not kept
        outcomes.append(outcome)
        gradients.append(measured)
    stats = _block_stats(block, tuple(rounded_cases))
    release_block(block)
    return _BlockOutcome(given, rounded, outcomes, gradients, stats,
                         block.start + len(block.labels))


def _measure_split(case: Case, block: Block, runs: Sequence[PipelineRun],
                   denominators: Denominators, rounded_cases: Mapping[str, Case],
                   upstream: float) -> _BlockOutcome:
    """:func:`_measure_block` for a row run in column chunks: each run's gradient is
    measured chunk by chunk against the reference's chunk, computed alongside."""
    given, reference_gradient = split_row_reference(block, upstream)
    rounded = {}
    for name, rounded_case in rounded_cases.items():
        precision = Precision(name)
        if _held_exactly(block, precision, rounded_case) or all(
                _same_inputs(chunk, rounded_block(chunk, precision, rounded_case))
                for chunk in block.column_chunks()):
            rounded[name] = given
            continue
        with np.errstate(all="ignore"):  # rounding may overflow; that is what is measured
            rounded[name] = split_row_reference(  # rounded chunk by chunk
                block, 1.0, partial(rounded_block, precision=precision,
                                    rounded_case=rounded_case))[0]
    outcomes, gradients = [], []
    for run in runs:
        measured = _GradientStats()

        def take(chunk: Block, gradient: FloatArray, measured: _GradientStats = measured,
                 precision: Precision = run.precision) -> None:
            expected = reference_gradient(chunk)
            if expected is not None:
                measured.add(chunk, gradient, expected, precision)

        outcomes.append(run.run_block(case, block, denominators, on_gradient=take))
        measured.close_rows()
        gradients.append(measured)
    stats = _block_stats(block, tuple(rounded_cases))
    release_block(block)
    return _BlockOutcome(given, rounded, outcomes, gradients, stats,
                         block.start + len(block.labels))


def _single_pass(case: Case, precisions: Sequence[Precision], pipelines: Sequence[Pipeline],
                 dtype_names: Sequence[str], progress: Progress | None) -> _Pass:
    """Feed every block once to the reference, the rounded references and every run.

    Blocks are measured on several threads, each block by one thread from start to end
    (reference, forward and backward passes, gradient statistics), and merged in input
    order, so the result is the same as one thread's.
    """
    rounded_cases = {name: _rounded_case(case, Precision(name)) for name in dtype_names}
    collected = _Pass(
        runs=[PipelineRun(pipe, prec) for prec in precisions for pipe in pipelines],
        denominators=Denominators(np.zeros(case.classes)),
        rounded={name: [] for name in dtype_names},
    )
    # The gradient of a mean needs its denominator before the first block: count the
    # labels first (a pass over the labels only; the logits are not read).
    for block in blocks(case):
        collected.denominators.add(case, block)
    upstream = upstream_gradient(case, collected.denominators, case.spec.class_weights)
    collected.gradients = [_GradientStats() for _ in collected.runs]

    def work(block: Block) -> _BlockOutcome:
        return _measure_block(case, block, collected.runs, collected.denominators,
                              rounded_cases, upstream)

    workers = worker_count()
    for outcome in in_order(work, blocks(case, block_size(workers), release=False), workers):
        for run, run_outcome in zip(collected.runs, outcome.runs, strict=True):
            run.absorb(run_outcome)
        for merged, measured in zip(collected.gradients, outcome.gradients, strict=True):
            merged.merge(measured)
        stats = outcome.stats
        collected.max_logit = max(collected.max_logit, stats.largest)
        collected.min_logit = min(collected.min_logit, stats.smallest)
        collected.rows_sum_to_one &= stats.rows_sum_to_one
        collected.masked = merge_masked(collected.masked, stats.masked)
        if stats.spread is not None:
            collected.max_spread = max(stats.spread, collected.max_spread or stats.spread)
        for name, extremes in stats.rounded.items():
            seen = collected.extremes.get(name)
            collected.extremes[name] = extremes if seen is None else seen.merge(extremes)
        collected.reference.append(outcome.reference)
        for name, values in outcome.rounded.items():
            collected.rounded[name].append(values)
        if progress is not None:
            progress(outcome.rows_done, case.rows)
    return collected


def _references(
    block: Block, rounded_cases: Mapping[str, Case], upstream: float
) -> tuple[FloatArray, dict[str, FloatArray], FloatArray | None]:
    """The block's reference losses, as given and with the inputs rounded to each dtype,
    and the reference gradient of the inputs as given (of the reduced loss)."""
    given, gradient = reference_block(block, gradient=True, gradient_scale=upstream)
    rounded = {}
    for name, rounded_case in rounded_cases.items():
        if _held_exactly(block, Precision(name), rounded_case):
            rounded[name] = given  # D's format holds every input value: nothing to round
            continue
        rb = rounded_block(block, Precision(name), rounded_case)
        if _same_inputs(block, rb):
            rounded[name] = given  # D holds these inputs exactly
            continue
        with np.errstate(all="ignore"):  # rounding may overflow; that is what is measured
            rounded[name] = reference_per_example(rb)
    return given, rounded, gradient


@dataclass(frozen=True)
class _Truth:
    """The reference values a finding is compared with: scalar loss, or counted examples."""

    loss: float | None
    values: FloatArray
    rounded_loss: dict[str, float | None]
    rounded_values: dict[str, FloatArray]
    counted: FloatArray | None  # flat mask of counted examples, for reduction "none"


def _truth(case: Case, collected: _Pass, dtype_names: Sequence[str]) -> tuple[_Truth, FloatArray]:
    per_example = np.concatenate(collected.reference)
    den = collected.denominators
    loss = _reduce_reference(case, per_example, den.mean_denominator(case, case.spec.class_weights))
    counted = _counted_mask(case, per_example) if loss is None else None
    rounded_loss: dict[str, float | None] = {}
    rounded_values: dict[str, FloatArray] = {}
    for name in dtype_names:
        per = np.concatenate(collected.rounded[name])
        weights = _rounded_case(case, Precision(name)).spec.class_weights
        with np.errstate(all="ignore"):
            rounded_loss[name] = _reduce_reference(case, per, den.mean_denominator(case, weights))
        rounded_values[name] = _scalar_or_counted(rounded_loss[name], per, counted)
    truth = _Truth(loss, _scalar_or_counted(loss, per_example, counted), rounded_loss,
                   rounded_values, counted)
    return truth, per_example


def _scalar_or_counted(loss: float | None, per_example: FloatArray,
                       counted: FloatArray | None) -> FloatArray:
    if loss is not None:
        return np.array([loss])
    return np.asarray(per_example).ravel()[counted]


def _headroom(limit: float | None, value: float | None) -> float | None:
    return None if limit is None or value is None else limit - value


def _finding(case: Case, run: PipelineRun, collected: _Pass, truth: _Truth,
             tol: Tolerance, gradient: _GradientStats) -> Finding:
    loss, per_example = run.finish(case, collected.denominators)
    name = run.precision.name
    computed = _scalar_or_counted(None if truth.loss is None else float(loss), per_example,
                                  truth.counted)
    target, rounded = truth.values, truth.rounded_values[name]
    abs_e, rel_e, ulp_e, worst = _errors(computed, target, run.precision)
    arith_rel = _errors(computed, rounded, run.precision)[1]
    limit = pipeline_limit(run.pipeline, run.precision, case.classes,
                           float(case.spec.label_smoothing))
    # The input as D holds it: the largest logit against the upper edge; from below,
    # sigmoid's smallest x, and for softmax the smallest logit whose probability is logged
    # (its exp must not vanish).
    seen = collected.extremes[name]
    smallest_input = seen.smallest if case.spec.family == "sigmoid" else seen.smallest_logged
    worst_index = None
    if truth.counted is not None and worst is not None:
        worst_index = _example_index(case, int(np.flatnonzero(truth.counted)[worst]))
    return Finding(
        framework=run.pipeline.framework,
        pipeline=run.pipeline.name,
        dtype=name,
        accumulate=run.precision.accumulate_label,
        loss=None if truth.loss is None else float(loss),
        per_example=None if truth.loss is not None else per_example.reshape(case.example_shape),
        abs_error=abs_e,
        rel_error=rel_e,
        ulp_error=ulp_e,
        arithmetic_rel_error=arith_rel,
        flags=_flags(computed, target, rounded, run.runner, tol),
        first_bad=_located(case, run.runner.first_event()),
        events=tuple(e for e in (_located(case, e) for e in run.runner.ordered_events()) if e),
        limit=limit,
        tolerance=tol,
        worst_index=worst_index,
        logit_headroom=_headroom(limit.largest_safe_logit, seen.largest),
        spread_headroom=_headroom(limit.largest_safe_spread, seen.spread),
        lower_logit_headroom=(None if limit.smallest_safe_logit is None or smallest_input is None
                              else smallest_input - limit.smallest_safe_logit),
        grad_error=gradient.error(),
        grad_row_errors=np.concatenate(gradient.rows) if gradient.rows else None,
        grad_flags=_gradient_flags(gradient, tol),
        grad_first_bad=_located(case, _gradient_first_bad(case, run, collected.denominators,
                                                          gradient)),
    )


def evaluate(
    case: Case,
    precisions: Sequence[Precision],
    pipelines: Sequence[Pipeline],
    tolerances: Mapping[str, Tolerance] | None = None,
    progress: Progress | None = None,
) -> ScenarioResult:
    """Run every (pipeline, precision) pair on the case and measure it against the reference.

    Parameters
    ----------
    case
        The loss problem.
    precisions
        Storage dtypes (with their accumulate policy) to evaluate in.
    pipelines
        Formulations applicable to the case's family and input kind.
    tolerances
        Per dtype name; a dtype missing here gets its default
        (:meth:`Precision.default_rel_tolerance`).
    progress
        Called after each block with (rows done, rows in all), for a progress display.

    Returns
    -------
    ScenarioResult
        The reference, one finding per (pipeline, precision), and the mismatches.
    """
    tolerances = dict(tolerances or {})
    for p in precisions:
        tolerances.setdefault(p.name, Tolerance(rel=p.default_rel_tolerance()))
    dtype_names = list(dict.fromkeys(p.name for p in precisions))
    collected = _single_pass(case, precisions, pipelines, dtype_names, progress)
    truth, ref_per_example = _truth(case, collected, dtype_names)
    prefetch_limits([(run.pipeline, run.precision) for run in collected.runs], case.classes,
                    float(case.spec.label_smoothing))
    findings = [
        _finding(case, run, collected, truth, tolerances[run.precision.name], gradient)
        for run, gradient in zip(collected.runs, collected.gradients, strict=True)
    ]
    reference = ReferenceValue(
        loss=truth.loss,
        per_example=None if truth.loss is not None else ref_per_example.reshape(case.example_shape),
        rounded=truth.rounded_loss,
        rounded_counted=None if truth.loss is not None else truth.rounded_values,
    )
    # Masked entries are left out of the extremes; with nothing else, the largest logit is
    # -inf and the largest magnitude of an unmasked one is that of none, 0.
    unmasked = collected.min_logit <= collected.max_logit
    stats = InputStats(
        input_dtype=str(case.logits.dtype),
        max_abs_logit=(max(abs(collected.max_logit), abs(collected.min_logit)) if unmasked
                       else 0.0),
        max_logit=collected.max_logit,
        max_spread=collected.max_spread,
        min_logit=collected.min_logit if unmasked else -np.inf,
        rows_sum_to_one=collected.rows_sum_to_one and case.classes > 1,
        masked=collected.masked,
    )
    mismatches = _mismatches(findings, tolerances)
    focus = _focus_example(case, findings, truth)
    return ScenarioResult(
        name=case.name,
        source=case.source,
        description=case.description,
        family=case.spec.family,
        from_logits=case.spec.from_logits,
        label_kind=case.label_kind,
        shape=case.shape,
        classes=case.classes,
        reduction=case.spec.reduction,
        stats=stats,
        reference=reference,
        findings=tuple(findings),
        mismatches=tuple(mismatches),
        focus_index=focus,
        frameworks=tuple(_framework_comparisons(findings, mismatches, _reference_answer(
            reference, focus), focus)),
        warnings=check_case(case, stats),
        class_weights=None if case.spec.class_weights is None
        else tuple(float(w) for w in np.ravel(case.spec.class_weights)),
    )


def _reference_answer(reference: ReferenceValue,
                      focus: tuple[int, ...] | None) -> float | None:
    """The reference loss the framework answers are set against: the reduced loss, or the
    loss at the focus example for reduction "none"."""
    if reference.loss is not None or reference.per_example is None or focus is None:
        return reference.loss
    return float(np.asarray(reference.per_example, dtype=np.float64)[focus])


def _counted_mask(case: Case, per_example: FloatArray) -> FloatArray:
    """For ``reduction: none``: the flat positions that count (not ``ignore_index``)."""
    if case.spec.family == "sigmoid":
        return np.asarray(valid_elements(case, case.labels_rows())).ravel()
    if case.label_kind == "index" and case.spec.ignore_index is not None:
        return np.asarray(case.labels_rows()) != case.spec.ignore_index
    return np.ones(per_example.size, dtype=bool)


def _example_index(case: Case, flat: int) -> tuple[int, ...]:
    """A flat per-example position in the shape of the per-example losses."""
    shape = case.example_shape
    return tuple(int(i) for i in np.unravel_index(flat, shape)) if shape else ()


def _located(case: Case, event: StageEvent | None) -> StageEvent | None:
    """A stage event with its row number turned into the input's own leading coordinates."""
    if event is None or not event.index:
        return event
    row, *rest = event.index
    leading = case.unravel_row(row)
    if case.logits.ndim == 1 and case.spec.family == "sigmoid":
        rest = []  # a 1-D sigmoid input was viewed as (N, 1): the column is not a coordinate
    return replace(event, index=(*leading, *rest))
