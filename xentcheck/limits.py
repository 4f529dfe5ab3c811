"""Limits: how far the logits, and the gap below the largest, may go before a pipeline breaks.

For a pipeline, a precision and a class count C:

largest safe logit
    the largest L (a value of D) such that the worst input with every logit at most L still
    gives a finite loss. For softmax the worst case is all C logits equal to L (the sum of
    C exponentials is largest); for sigmoid it is x = +L (targets 0 and 1). Naive softmax
    in float32 breaks just above ln(FLT_MAX) - ln C, which is negative once the sum of C
    ones overflows the format (float16, C >= 65520).
smallest safe logit
    the smallest such L from below, where a formulation has a lower edge: naive softmax
    with all C logits equal to L gives 0/0 once exp(L) rounds to 0; naive sigmoid at
    x = -L overflows exp(-x). A formulation without one has D's most negative number.
largest safe spread
    softmax only: the largest S such that a logit S below the other C - 1 logits (all equal,
    the worst case) still has a non-zero probability, so the loss stays finite. The others
    are at 0 and, for naive softmax (which does not shift, so the level matters), also at
    the level where the target's exp rounds worst
    (:func:`xentcheck.limit_closed_forms.worst_target`).

Where the worst-case pattern breaks at every magnitude (the float16 sum of 128,256 equal
terms is inf whatever they are), the edge is absent: None, with ``no_safe_logit`` or
``no_safe_spread`` set on the :class:`Limit`.

Every edge is found on the pipeline itself, over the representable values of D laid out
on an ordered integer line (negative values included), so it includes every rounding the
pipeline makes: the value returned is safe and the next value of D beyond it is not. The
search starts from the closed form (a few candidates around it, one batched evaluation),
widens geometrically only if the edge is not there, and bisects what is left; without a
closed form it bisects the whole line. A value equal to D's largest finite number (or its
negation) means the pipeline does not break within the format's own range. The closed forms
are in :mod:`xentcheck.limit_closed_forms`, D's key line in :mod:`xentcheck.value_line`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .case import NO_OPTIONS, Case, LossOptions, LossSpec
from .findings import Limit
from .limit_closed_forms import closed_form_limit, ln_overflow, spread_closed_form, worst_target
from .pipelines import Pipeline
from .precision import FloatArray, Precision
from .value_line import ValueLine

# Candidates evaluated per search step, at most: ~5 bits of the answer per bisection step.
# Each candidate is a row of C logits, so for large C fewer per step cost less in all (plain
# bisection, one row per step, evaluates the fewest values overall).
_MAX_CANDIDATES = 32
_VALUES_PER_STEP = 1 << 18
# Rows of C logits the threads of :func:`prefetch_limits` evaluate at once, at most.
_VALUES_IN_FLIGHT = 1 << 23
# Evenly spaced keys tried when nothing else gave a safe value (spaced evenly on the key
# line, i.e. about evenly in the exponent).
_GRID = 9

KeyTest = Callable[[list[int]], FloatArray]


def _search(test: KeyTest, lo_end: int, hi_end: int, per_step: int, *,
            hint_high: int | None, hint_low: int | None, want_low: bool,
            expect_none: bool = False) -> tuple[int, int] | None:
    """The first and last safe keys of the interval of safe keys in ``[lo_end, hi_end]``.

    ``test`` says which keys are safe; the safe keys are assumed to form one interval. The
    hints (keys where the closed form puts the last safe value from above / the first
    from below) are tried first with their neighbours; ``expect_none``: the closed form
    says no key is safe, which the keys tried then confirm. Returns None where no key tried
    is safe. Without ``want_low`` the low end returned is ``lo_end`` (the caller knows
    nothing below matters).
    """
    known: dict[int, bool] = {}

    def probe(keys: Sequence[int]) -> None:
        new = sorted({k for k in keys if lo_end <= k <= hi_end and k not in known})
        for start in range(0, len(new), per_step):  # at most per_step rows at once
            batch = new[start:start + per_step]
            known.update(zip(batch, (bool(s) for s in test(batch)), strict=True))

    def grid() -> list[int]:
        return sorted({lo_end, hi_end, *(int(k) for k in np.linspace(lo_end, hi_end, _GRID)),
                       *([0] if lo_end < 0 < hi_end else [])})

    hinted: set[int] = set()
    if expect_none:
        # Confirm on the pipeline: at both ends and at 0 (with lo_end 0, as for a spread,
        # the safest value: nothing above it is safe if it is not).
        probe([lo_end, 0, hi_end] if lo_end < 0 else [lo_end])
        if not any(known.values()):
            return None
    else:
        if hint_high is not None:
            hinted |= {hint_high, hint_high + 1}
        if want_low and hint_low is not None:
            hinted |= {hint_low - 1, hint_low}
        hinted = {k for k in hinted if lo_end <= k <= hi_end}
        probe(sorted(hinted))
    if not any(known.values()) and hint_high is not None and not expect_none:
        # the edge is below the hint: walk down from it, doubling the step
        step, key = 2, hint_high
        while not any(known.values()) and key > lo_end:
            key = max(lo_end, key - step)
            probe([key])
            step *= 2
    if not any(known.values()):
        probe(grid())
    safe_keys = [k for k, s in known.items() if s]
    if not safe_keys:
        return None
    start = min(safe_keys)
    high = _edge(test, known, start, hi_end, 1, per_step, hinted)
    low = _edge(test, known, start, lo_end, -1, per_step, hinted) if want_low else lo_end
    return low, high


def _edge(test: KeyTest, known: dict[int, bool], start: int, end: int, direction: int,
          per_step: int, hinted: set[int]) -> int:
    """From a safe key ``start`` toward ``end`` (up for ``direction`` 1, down for -1): the
    last safe key before the first unsafe one (``end`` itself if it is safe). Keys beyond
    ``end`` count as unsafe."""
    # the bracket from what is known: ``safe`` is safe, ``unsafe`` is not, nothing known
    # between them
    safe, unsafe = start, end + direction
    for key in sorted(known, reverse=direction < 0):
        if (key - start) * direction <= 0:
            continue
        if not known[key]:
            unsafe = key
            break
        safe = key
    # Gallop from a bracket end the closed form put us next to, toward the other end.
    anchor = "safe" if safe in hinted and unsafe not in hinted else (
        "unsafe" if unsafe in hinted and safe not in hinted else None)
    stride = 2
    while abs(unsafe - safe) > 1:
        gap = abs(unsafe - safe)
        if anchor is not None:
            offsets = [stride << i for i in range(per_step) if stride << i < gap] or [gap - 1]
            if anchor == "safe":
                keys = [safe + direction * o for o in offsets]
            else:
                keys = [unsafe - direction * o for o in reversed(offsets)]
            stride <<= per_step
        else:
            keys = sorted({safe + direction * (gap * i // (per_step + 1))
                           for i in range(1, per_step + 1)} - {safe, unsafe},
                          reverse=direction < 0) or [safe + direction * (gap // 2)]
        results = [bool(s) for s in test(keys)]
        known.update(zip(keys, results, strict=True))
        if (anchor == "safe" and not all(results)) or (anchor == "unsafe" and any(results)):
            anchor = None  # the edge is bracketed: bisect what is left
        for key, ok in zip(keys, results, strict=True):  # keys run from safe toward unsafe
            if not ok:
                unsafe = key
                break
            safe = key
    return safe


def _finite_rows(pipeline: Pipeline, precision: Precision, logits: FloatArray,
                 labels: FloatArray, label_kind: str, label_smoothing: float = 0.0,
                 options: LossOptions = NO_OPTIONS) -> FloatArray:
    from .execution import run_pipeline  # execution imports pipelines, as this module does

    case = Case(
        name="limit",
        logits=logits,
        labels=labels,
        label_kind=label_kind,  # type: ignore[arg-type]
        spec=LossSpec(family=pipeline.family, reduction="none",  # type: ignore[arg-type]
                      label_smoothing=label_smoothing,
                      **options.spec_fields(pipeline.family)),  # type: ignore[arg-type]
    )
    _, per_example, _ = run_pipeline(pipeline, precision, case)
    finite = np.isfinite(np.asarray(per_example, dtype=np.float64))
    return np.asarray(finite.reshape(len(logits), -1).all(axis=-1))


@lru_cache(maxsize=256)
def pipeline_limit(pipeline: Pipeline, precision: Precision, classes: int,
                   label_smoothing: float = 0.0, options: LossOptions = NO_OPTIONS) -> Limit:
    """Edges of ``pipeline`` in ``precision`` for ``classes`` classes (with
    ``label_smoothing``, for softmax, and the loss ``options``), found on the pipeline;
    cached.

    Each edge is a value of D where the worst-case input is finite, the next value of D
    beyond it is not (see the module docstring for the patterns).
    """
    return find_limit(pipeline, precision, classes, label_smoothing, options=options)


def prefetch_limits(pairs: Sequence[tuple[Pipeline, Precision]], classes: int,
                    label_smoothing: float = 0.0, options: LossOptions = NO_OPTIONS) -> None:
    """Find the limits of several (pipeline, precision) pairs on threads, into the cache of
    :func:`pipeline_limit`: for many classes each one evaluates a few whole rows of C
    logits, and numpy releases the GIL in its loops."""
    from .execution import worker_count

    # each thread holds a few rows of C logits and the pipeline's intermediates
    workers = min(worker_count(), len(pairs), max(1, _VALUES_IN_FLIGHT // max(1, classes)))
    if workers < 2:
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(lambda pair: pipeline_limit(*pair, classes, label_smoothing, options),
                          pairs):
            pass


def find_limit(pipeline: Pipeline, precision: Precision, classes: int,
               label_smoothing: float = 0.0, *, from_closed_form: bool = True,
               options: LossOptions = NO_OPTIONS) -> Limit:
    """:func:`pipeline_limit`, uncached; without ``from_closed_form`` the search bisects
    D's whole line instead of starting next to the closed form (the same edges, slower).

    Label smoothing logs every class and sums the C log-probabilities, so the spread
    edge is also where that sum overflows: all classes but one S below the largest
    (``[0, -S, ..., -S]``), as well as one class S below the others.
    """
    if not pipeline.from_logits:
        return Limit(None, None)  # probability inputs have no logit scale to run out of
    line = ValueLine(precision)
    closed = (closed_form_limit(pipeline, precision, classes, options=options)
              if from_closed_form else None)
    per_step = max(1, min(_MAX_CANDIDATES, _VALUES_PER_STEP // max(1, classes)))
    smoothing = label_smoothing if pipeline.family == "softmax" else 0.0

    def run(make_rows: Callable[[FloatArray], tuple[FloatArray, FloatArray, str]]) -> KeyTest:
        def test(keys: list[int]) -> FloatArray:
            logits, labels, kind = make_rows(line.values(keys))
            # values of D: held in D's storage dtype they are exact, and cheaper to run
            logits = np.asarray(logits).astype(precision.storage_dtype)
            return _finite_rows(pipeline, precision, logits, labels, kind, smoothing, options)
        return test

    level: float | None = None
    if pipeline.family == "sigmoid":
        def sigmoid_rows(values: FloatArray) -> tuple[FloatArray, FloatArray, str]:
            logits = np.repeat(values[:, None], 2, axis=1)
            return logits, np.tile(np.array([0.0, 1.0]), (len(values), 1)), "binary"
        logit_test, spread_test = run(sigmoid_rows), None
    else:
        def equal_rows(values: FloatArray) -> tuple[FloatArray, FloatArray, str]:
            return np.repeat(values[:, None], classes, axis=1), np.zeros(len(values)), "index"

        # (None also where no value of D has an exp rounding to u: the others at 0 then)
        level = (worst_target(precision)
                 if pipeline.name == "naive" or pipeline.every_limit_pattern else None)
        if level is not None and options.temperature != 1.0:
            # the worst level is one the pipeline sees after the division by T
            level = float(precision.round(np.float64(level * options.temperature)))

        def one_below(values: FloatArray) -> tuple[FloatArray, FloatArray, str]:
            rows = np.zeros((len(values), classes))
            rows[:, 0] = -values
            return rows, np.zeros(len(values)), "index"

        def all_below(values: FloatArray) -> tuple[FloatArray, FloatArray, str]:
            rows = np.repeat(-values[:, None], classes, axis=1)  # every class but one
            rows[:, 0] = 0.0
            return rows, np.zeros(len(values)), "index"

        def at_worst_level(values: FloatArray) -> tuple[FloatArray, FloatArray, str]:
            # the target where exp rounds worst, the others as high as D allows within S
            assert level is not None
            others = line.values([line.key_below(level + v) for v in values])
            rows = np.repeat(others[:, None], classes, axis=1)
            rows[:, 0] = level
            return rows, np.zeros(len(values)), "index"

        patterns = [one_below]
        if level is not None:
            patterns.insert(0, at_worst_level)  # naive's binding pattern first
        if smoothing:
            patterns.append(all_below)
        logit_test = run(equal_rows)
        spread_test = _every_pattern([run(pattern) for pattern in patterns])

    def hint(value: float | None, below: bool) -> int | None:
        if closed is None or value is None:
            return None
        return line.key_below(value) if below else line.key_above(value)

    # With smoothing the closed forms are only where to start: the smoothing sum of C
    # log-probabilities (C ln C for equal logits, about (C - 1) S for [0, -S, ..., -S])
    # overflows D from some C on, which the search finds on the pipeline.
    overflow = math.exp(ln_overflow(precision)) if precision.max < 1e300 else math.inf
    no_logit = closed is not None and (closed.no_safe_logit or bool(
        smoothing and classes * math.log(classes) >= overflow))
    logits = _search(
        logit_test, -line.top, line.top, per_step,
        hint_high=hint(closed.largest_safe_logit if closed else None, True),
        hint_low=hint(closed.smallest_safe_logit if closed else None, False),
        want_low=True, expect_none=no_logit)
    if level is not None and logits is not None and level < line.value(logits[0]):
        # a target below the lower edge breaks at every spread; an opaque formulation whose
        # lower edge is above naive's (jax's flushed subnormals) gets its worst level there
        level = line.value(logits[0])
    spread: tuple[int, int] | None = None
    if spread_test is not None and classes > 1:
        spread_hint = closed.largest_safe_spread if closed else None
        if smoothing and spread_hint is not None:
            spread_hint = min(spread_hint, overflow / (classes - 1))
        spread = _search(
            spread_test, 0, line.top, per_step,
            hint_high=hint(spread_hint, True), hint_low=None, want_low=False,
            expect_none=closed is not None and closed.no_safe_spread)
    has_spread = spread_test is not None and classes > 1
    return Limit(
        largest_safe_logit=None if logits is None else line.value(logits[1]),
        largest_safe_spread=None if spread is None else line.value(spread[1]),
        smallest_safe_logit=None if logits is None else line.value(logits[0]),
        no_safe_logit=logits is None,
        no_safe_spread=has_spread and spread is None,
    )


def _every_pattern(tests: Sequence[KeyTest]) -> KeyTest:
    """A key is safe when it is under every pattern; a key already unsafe under one
    pattern is not run through the next (each is a whole row of C logits)."""
    def every(keys: list[int]) -> FloatArray:
        safe = np.ones(len(keys), dtype=bool)
        for test in tests:
            still = [k for k, ok in zip(keys, safe, strict=True) if ok]
            if not still:
                break
            safe[safe] = np.asarray(test(still), dtype=bool)
        return safe
    return every


@dataclass(frozen=True)
class LimitRow:
    """One pipeline in one precision: its edges by bisection and in closed form."""

    family: str
    pipeline: str
    dtype: str
    classes: int
    bisected: Limit
    closed_form: Limit | None
    spread_without_subnormals: float | None
    agrees: bool
    options: LossOptions = NO_OPTIONS


def _agree(found: float | None, closed: float | None, precision: Precision,
           temperature: float = 1.0) -> bool:
    """Whether a closed form lies within the rounding slack of the edge found.

    The edge found is a value of D and the true edge lies before the next one; the closed
    forms take the sums as the pipeline rounds them, and ignore only the rounding of exp (a
    relative error of a unit or so in the compute dtype), which moves the edge by as much in
    absolute terms (d ln y = dy / y).
    """
    if found is None or closed is None:
        return found is None and closed is None
    if not (math.isfinite(found) and math.isfinite(closed)):
        return found == closed
    compute_eps = float(np.finfo(precision.compute_dtype).eps)
    slack = float(precision.ulp(np.float64(found))) + 4 * compute_eps
    if temperature != 1.0:
        # the edge the pipeline sees is x / T, with the slack above; T times it, plus the
        # rounding of the division (an ulp of the raw edge)
        inner = float(precision.ulp(np.float64(found / temperature))) + 4 * compute_eps
        slack = float(precision.ulp(np.float64(found))) + temperature * inner
    return abs(closed - found) <= slack


def limits_agree(found: Limit, closed: Limit | None, precision: Precision,
                 temperature: float = 1.0) -> bool:
    """Whether every edge of the closed form agrees with the one found on the pipeline,
    absent edges included (with a temperature, within its scaled slack)."""
    return closed is not None and found.no_safe_logit == closed.no_safe_logit \
        and found.no_safe_spread == closed.no_safe_spread and all(
            _agree(a, b, precision, temperature) for a, b in (
                (found.largest_safe_logit, closed.largest_safe_logit),
                (found.smallest_safe_logit, closed.smallest_safe_logit),
                (found.largest_safe_spread, closed.largest_safe_spread),
            ))


def limit_rows(
    pipelines: Sequence[Pipeline], precisions: Sequence[Precision], classes: int,
    options: LossOptions = NO_OPTIONS,
) -> list[LimitRow]:
    """Every (pipeline, precision) pair's edges, closed form next to bisection (pairs that
    do not run, a framework in float8, left out)."""
    rows = []
    pairs = [(p, q) for q in precisions for p in pipelines if p.unsupported(q) is None]
    prefetch_limits(pairs, classes, 0.0, options)
    for pipeline, precision in pairs:
        found = pipeline_limit(pipeline, precision, classes, 0.0, options)
        closed = closed_form_limit(pipeline, precision, classes, options=options)
        no_sub = None
        if closed is not None and closed.largest_safe_spread is not None \
                and pipeline.name != "stable" and options == NO_OPTIONS:
            no_sub = spread_closed_form(precision, classes, subnormals=False)
        rows.append(LimitRow(pipeline.family, pipeline.name, precision.name, classes, found,
                             closed, no_sub,
                             limits_agree(found, closed, precision, options.temperature),
                             options))
    return rows
