"""The evaluator: runs pipelines in precisions over a case and measures them against the reference.

There is one way to run a pipeline (:mod:`xentcheck.execution`) and one reference
(:mod:`xentcheck.reference`); this module feeds both the same blocks of rows, in one pass
over the input, and turns what they produced into findings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np

from . import reference as ref
from .case import Case, softmax_coefficients, target_coefficients, valid_elements
from .comparison import (
    errors,
    framework_comparisons,
    loss_flags,
    mismatches,
)
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
    Finding,
    InputStats,
    MaskedInputs,
    ReferenceValue,
    ScenarioResult,
    Tolerance,
)
from .gradients import GradientStats as _GradientStats
from .gradients import gradient_first_bad as _gradient_first_bad
from .gradients import gradient_flags as _gradient_flags
from .input_stats import BlockStats, Extremes, block_stats
from .limits import pipeline_limit, prefetch_limits
from .misuse import check_case, merge_masked
from .pipelines import Block, Pipeline
from .precision import FloatArray, Precision
from .reference_split import split_row_reference
from .stages import StageEvent

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
    extremes: dict[str, Extremes] = field(default_factory=dict)  # per dtype, for headrooms
    gradients: list[_GradientStats] = field(default_factory=list)


@dataclass
class _BlockOutcome:
    """Everything measured on one block, before it is merged (in input order)."""

    reference: FloatArray
    rounded: dict[str, FloatArray]
    runs: list[BlockRun]
    gradients: list[_GradientStats]
    stats: BlockStats
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
    stats = block_stats(block, tuple(rounded_cases))
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
    stats = block_stats(block, tuple(rounded_cases))
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
    whole = any(p.whole_case for p in pipelines)
    for outcome in in_order(work, blocks(case, block_size(workers), release=False,
                                         whole=whole), workers):
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
    abs_e, rel_e, ulp_e, worst = errors(computed, target, run.precision)
    arith_rel = errors(computed, rounded, run.precision)[1]
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
        flags=loss_flags(computed, target, rounded, run.runner, tol),
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
    found = mismatches(findings, tolerances)
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
        mismatches=tuple(found),
        focus_index=focus,
        frameworks=tuple(framework_comparisons(findings, found, _reference_answer(
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
