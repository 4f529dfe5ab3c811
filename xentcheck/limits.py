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
    the level where the target's exp rounds worst (:func:`_worst_target`).

Where the worst-case pattern breaks at every magnitude (the float16 sum of 128,256 equal
terms is inf whatever they are), the edge is absent: None, with ``no_safe_logit`` or
``no_safe_spread`` set on the :class:`Limit`.

Every edge is found on the pipeline itself, over the representable values of D laid out
on an ordered integer line (negative values included), so it includes every rounding the
pipeline makes: the value returned is safe and the next value of D beyond it is not. The
search starts from the closed form (a few candidates around it, one batched evaluation),
widens geometrically only if the edge is not there, and bisects what is left; without a
closed form it bisects the whole line. A value equal to D's largest finite number (or its
negation) means the pipeline does not break within the format's own range.
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
from .pipelines import Pipeline
from .precision import FloatArray, Precision
from .stages import StageRunner

# Candidates evaluated per search step, at most: ~5 bits of the answer per bisection step.
# Each candidate is a row of C logits, so for large C fewer per step cost less in all (plain
# bisection, one row per step, evaluates the fewest values overall).
_MAX_CANDIDATES = 32
_VALUES_PER_STEP = 1 << 18
# Rows of C logits the threads of :func:`prefetch_limits` evaluate at once, at most.
_VALUES_IN_FLIGHT = 1 << 23
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
# Evenly spaced keys tried when nothing else gave a safe value (spaced evenly on the key
# line, i.e. about evenly in the exponent).
_GRID = 9

KeyTest = Callable[[list[int]], FloatArray]




class _Line:
    """D's values as an ordered integer line: key k >= 0 is the value whose bit pattern is
    k, key -k is its negation. Adjacent keys are adjacent values of D (+0 and -0 are one).
    Keys run up to D's largest finite number's: the patterns above it are inf and NaN (in
    float8_e4m3fn, the one above 448, 0x7F, is NaN: the format has no infinity)."""

    def __init__(self, precision: Precision) -> None:
        self.precision = precision
        self.unsigned = _UNSIGNED[precision.dtype.itemsize]
        self.sign_bit = 1 << (8 * precision.dtype.itemsize - 1)
        self.top = self._key(precision.max)

    def _key(self, value: float) -> int:
        bits = int(np.array(value, dtype=np.float64).astype(self.precision.dtype)
                   .view(self.unsigned))
        return -(bits & ~self.sign_bit) if bits & self.sign_bit else bits

    def values(self, keys: Sequence[int]) -> FloatArray:
        k = np.asarray(keys, dtype=np.int64)
        magnitude = np.abs(k).astype(self.unsigned).view(self.precision.dtype)
        return np.where(k < 0, -1.0, 1.0) * magnitude.astype(np.float64)

    def value(self, key: int) -> float:
        return float(self.values([key])[0])

    def key_below(self, x: float) -> int:
        """The key of the largest value of D at most ``x`` (clipped to D's finite range)."""
        if x >= self.precision.max:
            return self.top
        if x <= -self.precision.max:
            return -self.top
        key = self._key(x)
        return key - 1 if self.value(key) > x else key

    def key_above(self, x: float) -> int:
        """The key of the smallest value of D at least ``x`` (clipped)."""
        return -self.key_below(-x)


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
    line = _Line(precision)
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
        level = (_worst_target(precision)
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
    overflow = math.exp(_ln_overflow(precision)) if precision.max < 1e300 else math.inf
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


def _worst_target(precision: Precision) -> float | None:
    """The largest value T of D whose exp, as a pipeline computes it, rounds to D's smallest
    subnormal u: e^T is almost 1.5 u, and rounding it to u loses a third of it. None where
    no value of D has an exp that rounds to u (float8_e5m2: its values around ln u = -11.09
    are 2 apart, exp(-10) rounds to 3 u and exp(-12) to 0).

    Naive softmax divides that target exponential by the others' sum without shifting
    first, so the same spread S is worse with the others at T + S (p = u / ((C - 1) e^(T+S)),
    about e^-S / (1.5 (C - 1))) than at 0, where e^-S is rounded up as often as down.
    """
    line = _Line(precision)
    runner = StageRunner(precision, ("exp",)).bind(np.ones(1, dtype=bool))
    unit = precision.smallest_subnormal
    guess = line.key_below(math.log(1.5) + math.log(unit))  # 1.5 u itself rounds to 2 u
    for width in (8, 64, 512, 4096):  # exp rounds to u across the window's first part
        keys = list(range(guess - width, guess + width + 1))
        with np.errstate(all="ignore"):
            exps = np.asarray(runner.exp("exp", precision.round(line.values(keys))[None, :])[0],
                              dtype=np.float64)
        at_unit = [k for k, e in zip(keys, exps, strict=True) if e == unit]
        if at_unit and max(at_unit) < keys[-1]:
            return line.value(max(at_unit))
        if not at_unit and precision.is_fp8 and exps[0] == 0 and exps[-1] > unit:
            return None  # the window spans exp from 0 past u without meeting u
    raise AssertionError(f"exp never rounds to the smallest subnormal of {precision.name}")


# -- closed forms ----------------------------------------------------------------------------


def _ln_overflow(precision: Precision) -> float:
    """ln of the real from which on rounding to D overflows: max + half an ulp, (2 -
    2^-(p+1)) 2^emax in the IEEE formats (a tie that rounds to inf there); float8_e4m3fn's
    max is 448 = 1.75 * 2^8, so 448 + 16 = 464 (a tie that rounds to the even 448: every
    real above it rounds to NaN)."""
    emax = math.frexp(precision.max)[1] - 1
    half_ulp = 2.0 ** (emax - precision.mantissa_bits - 1)
    return math.log(precision.max) + math.log1p(half_ulp / precision.max)  # no float64 overflow


def _sums_of_copies(precision: Precision, values: Sequence[float], count: int) -> FloatArray:
    """For each value v of D, the sum of ``count`` copies of v as a pipeline's ``sum`` stage
    computes it (accumulated per the precision, rounded to D), in float64."""
    terms = np.broadcast_to(
        np.asarray(values, dtype=np.float64).astype(precision.storage_dtype)[:, None],
        (len(values), count))
    runner = StageRunner(precision, ("sum",))
    with np.errstate(all="ignore"):
        return np.asarray(precision.round(runner.accumulate(terms)), dtype=np.float64)


def _naive_top(precision: Precision, classes: int) -> float | None:
    """The real L above which e = round(exp L) makes the sum of C copies of e inf in D
    (None: not even the smallest positive value has a finite sum)."""
    return _ln_largest_term(precision, classes, math.exp(_ln_overflow(precision))
                            if precision.max < 1e300 else precision.max, math.isfinite)


def _ln_largest_term(precision: Precision, count: int, bound: float,
                     holds: Callable[[float], bool]) -> float | None:
    """The real L below which e = round(exp L) keeps ``holds(sum)`` true, for the sum of
    ``count`` copies of e as the pipeline sums them (rounded to D), ``bound`` being about
    where the sum stops holding.

    The largest such e of D is found next to bound / (sum of ``count`` ones); exp(L)
    rounds to at most e below the midpoint between e and the next value of D.
    """
    line = _Line(precision)
    ones = float(_sums_of_copies(precision, [1.0], count)[0])
    guess = line.key_below(bound / ones) if math.isfinite(ones) \
        else line.key_below(bound / count)
    # the guess is within a unit or two of D; windows of keys walk to the edge otherwise
    keys = [k for k in range(guess - 2, guess + 3) if 0 < k <= line.top]
    best = None
    while keys and best is None:
        sums = _sums_of_copies(precision, list(line.values(keys)), count)
        finite = [k for k, s in zip(keys, sums, strict=True) if holds(float(s))]
        if finite and (max(finite) < keys[-1] or keys[-1] == line.top):
            best = max(finite)
        elif finite:  # every candidate finite: the edge is further up
            keys = [k for k in range(keys[-1], keys[-1] + 8) if k <= line.top]
        elif keys[0] == 1:
            # not even C copies of the smallest subnormal hold (float8_e4m3fn: 262,144
            # times 2^-9 is past 448)
            break
        else:
            keys = [k for k in range(keys[0] - 8, keys[0] + 1) if k > 0]
    if best is None:
        return None
    if best == line.top:
        return _ln_overflow(precision)
    low, high = line.value(best), line.value(best + 1)
    return math.log(low + (high - low) / 2)  # (low + high) / 2 would overflow near max


def _spread_closed_form(precision: Precision, classes: int, subnormals: bool) -> float | None:
    """Largest target gap S before round(e^-S / rest) is zero (the others at 0, exp 1).

    ``rest`` is the sum of the other C - 1 ones as the pipeline computes it (accumulated
    per the precision, rounded to D); inf there means no gap is safe (None). With
    subnormals, e_t = e^-S is rounded to a multiple k of the smallest subnormal u, and
    k u / rest must exceed u / 2 (an exact half is a tie that rounds to the even 0):
    k >= floor(rest / 2) + 1, which e^-S reaches from (k - 1/2) u on. Once k u is a
    normal number, the same on D's grid there: e_t must round to the first value of D
    above rest u / 2, which e^-S does from the midpoint below it on (in the wide formats
    that is e^-S / rest > u / 2 to within an ulp; in the 8-bit ones a step of the grid
    moves the edge: float8_e4m3fn, 300 classes, rest 288, S = 1.25 gives e_t = 0.28125
    and p = 2^-10 = u / 2 exactly, a tie to 0). Without subnormals (flush to zero) every
    value below the smallest normal is 0.
    """
    rest = float(_sums_of_copies(precision, [1.0], classes - 1)[0])
    if not math.isfinite(rest) or not _sum_with_target_is_finite(precision, classes):
        return None
    if not subnormals:
        return -math.log(precision.tiny) - math.log(rest)
    unit = precision.smallest_subnormal
    k = math.floor(rest / 2) + 1
    if k * unit < precision.tiny:
        return -math.log(k - 0.5) - math.log(unit)
    line = _Line(precision)
    bound = rest / 2 * unit  # a normal number here: no underflow
    first = line.key_above(bound)
    if line.value(first) == bound:
        first += 1  # e_t / rest = u / 2 exactly rounds to 0: the next value up
    low, high = line.value(first - 1), line.value(first)
    return -math.log(low + (high - low) / 2)


def _sum_with_target_is_finite(precision: Precision, classes: int) -> bool:
    """Whether the row's sum stays finite with the target's term in it, at its least (the
    smallest subnormal, first, as the spread pattern puts it): C - 1 ones at a tie of D's
    overflow tip over with anything added (float8_e4m3fn, 465 classes: 464 ones round to
    448, 464 plus any e_t to NaN)."""
    row = np.ones((1, classes))
    row[0, 0] = precision.smallest_subnormal
    runner = StageRunner(precision, ("sum",))
    with np.errstate(all="ignore"):
        total = precision.round(runner.accumulate(row.astype(precision.storage_dtype)))
    return bool(np.isfinite(np.asarray(total, dtype=np.float64)).all())


def _equal_probability_vanishes(precision: Precision, classes: int) -> bool:
    """Whether the probability of C equal logits, ``round(e / round(C e))``, is 0 at every
    level: ``round(C e)`` is at least ``C e (1 - 2^-(p+1))``, so ``e / round(C e)`` is at
    most ``1 / (C (1 - 2^-(p+1)))``, which rounds to 0 once it is at most half the smallest
    subnormal u (a tie goes to the even 0). From about 2 / u classes on: 1024 in
    float8_e4m3fn, 131,072 in float8_e5m2, 3.4e7 in float16. Just below that the answer
    depends on how each level's sum rounds (1000 classes in float8_e4m3fn: at -1, 0.375 /
    384 is exactly u / 2), and the safe levels are no longer an interval."""
    shrink = 1.0 - 2.0 ** -(precision.mantissa_bits + 1)
    return classes * shrink * precision.smallest_subnormal / 2 >= 1.0


def closed_form_limit(
    pipeline: Pipeline, precision: Precision, classes: int, *, subnormals: bool = True,
    options: LossOptions = NO_OPTIONS,
) -> Limit | None:
    """The edges of ``pipeline`` derived from the format's parameters, where known.

    With a temperature T alone, the pipeline sees ``x / T``: every edge is T times the
    edge without options, within D's range. With a soft-cap or a z-loss there is none
    here (a cap bounds the logits the pipeline sees, ``z_loss lse^2`` adds an edge of its
    own): their edges are found on the pipeline alone.
    """
    if options == NO_OPTIONS:
        return _closed_form_limit(pipeline, precision, classes, subnormals=subnormals)
    if options.logit_softcap is not None or options.z_loss:
        return None
    plain = _closed_form_limit(pipeline, precision, classes, subnormals=subnormals)
    if plain is None:
        return None
    top, t = precision.max, options.temperature

    def scaled(edge: float | None) -> float | None:
        return None if edge is None else max(-top, min(top, t * edge))

    return Limit(scaled(plain.largest_safe_logit), scaled(plain.largest_safe_spread),
                 scaled(plain.smallest_safe_logit), no_safe_logit=plain.no_safe_logit,
                 no_safe_spread=plain.no_safe_spread)


def _closed_form_limit(
    pipeline: Pipeline, precision: Precision, classes: int, *, subnormals: bool = True
) -> Limit | None:
    """:func:`closed_form_limit` without loss options.

    naive softmax: largest logit ``ln(max + ulp/2) - ln C`` while the sum of C ones is
    exact (see :func:`_naive_top` for the sum as the pipeline rounds it); smallest logit
    ``ln(u / 2)`` with u the smallest subnormal of D (exp, evaluated in float32 for 16-bit
    D, rounds to 0 below it and the probabilities are 0/0: float64 -745.13, float32
    -103.97, float16 -17.33, bfloat16 -92.88); spread: see :func:`_spread_closed_form`,
    and at most about ``ln 2 - ln(C - 1) - T`` (T from :func:`_worst_target`: the others at
    T + S rather than 0 make the same spread worse by up to ln 1.5). shifted: no logit edge
    while the sum of C ones is finite in D (none at all once it is not: p = 1/inf = 0); the
    spread edge of :func:`_spread_closed_form` (the shift puts the others at 0 whatever
    their level). stable: the format's range while the sum of C ones is finite, else none
    (log_softmax = 0 - log(inf)). accurate: as stable, its sum of C equal logits being of the
    C - 1 terms other than the max's. online and chunked: the format's range (their sums are float32
    registers, finite for any C a row can have) while the largest loss, about max + ln C,
    still rounds to a finite value of D; beyond that (float16 past C = e^16) no closed form.
    naive sigmoid:
    ``1 + e`` rounds to 1 once ``e = round(e^-x) <= 2^-(p+1)`` (a tie, to the even 1), and
    e^-x rounds to at most 2^-(p+1) below 2^-(p+1) plus half the spacing above it, so
    ``x < (p + 1) ln 2 - ln(1 + 2^-(p+1))`` (the second term matters in the 8-bit formats:
    0.06 for float8_e4m3fn, where the grid of x is 0.25 apart there); from below,
    ``exp(-x)`` overflows at ``x = -ln(max + ulp/2)``. stable sigmoid: none. Returns None
    for probability and framework pipelines. Accurate to the rounding of exp, i.e. to
    within a unit or two in the last place of D at the edge.
    """
    if not pipeline.from_logits or pipeline.framework:
        # a framework's own arithmetic (sums stored in D or kept in float32, inputs cast
        # up first) has no closed form here: its edges are found on the pipeline alone
        return None
    top = precision.max
    if pipeline.family == "sigmoid":
        if pipeline.name == "naive":
            half_ulp_of_one = 2.0 ** -(precision.mantissa_bits + 1)
            return Limit(-math.log(half_ulp_of_one) - math.log1p(half_ulp_of_one), None,
                         smallest_safe_logit=-_ln_overflow(precision))
        return Limit(top, None, smallest_safe_logit=-top)
    if pipeline.name in ("online", "chunked"):
        with np.errstate(over="ignore"):
            if not np.isfinite(precision.round(np.float64(top + math.log(classes)))):
                return None
        return Limit(top, top if classes > 1 else None, -top)
    # accurate's sum leaves the max's term out: C - 1 terms where stable sums C
    terms = classes - 1 if pipeline.name == "accurate" else classes
    spread: float | None = None
    no_spread = False
    if classes > 1:
        if pipeline.name in ("stable", "accurate"):
            # the C - 1 others equal (the max's among them for accurate: the gap's start)
            rest = float(_sums_of_copies(precision, [1.0], classes - 1)[0])
            spread = top if math.isfinite(rest) else None
        else:
            spread = _spread_closed_form(precision, classes, subnormals)
            if pipeline.name == "naive" and spread is not None and subnormals:
                # the others at M = T + S, the target at T (see _worst_target): p = u / s
                # must exceed u / 2, s the sum of C - 1 copies of round(e^M): s < 2; the
                # first M of D past that bound breaks, and S must stay below M - T
                level = _ln_largest_term(precision, classes - 1, 2.0, lambda s: s < 2.0)
                target = _worst_target(precision)
                if level is not None and target is not None:
                    line = _Line(precision)
                    spread = min(spread, line.value(line.key_above(level)) - target)
        no_spread = spread is None
    if pipeline.name == "naive":
        largest = _naive_top(precision, classes)
        smallest = math.log(precision.smallest_subnormal) - math.log(2.0)
        if largest is None or largest < smallest or _equal_probability_vanishes(precision,
                                                                                classes):
            return Limit(None, spread, None, no_safe_logit=True, no_safe_spread=no_spread)
        return Limit(largest, spread, smallest, no_safe_spread=no_spread)
    every = float(_sums_of_copies(precision, [1.0], terms)[0])
    if not math.isfinite(every):
        return Limit(None, spread, None, no_safe_logit=True, no_safe_spread=no_spread)
    return Limit(top, spread, -top, no_safe_spread=no_spread)


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
            no_sub = _spread_closed_form(precision, classes, subnormals=False)
        rows.append(LimitRow(pipeline.family, pipeline.name, precision.name, classes, found,
                             closed, no_sub,
                             limits_agree(found, closed, precision, options.temperature),
                             options))
    return rows
