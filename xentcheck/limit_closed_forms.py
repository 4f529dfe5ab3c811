"""Closed forms of the limits: where each textbook formulation breaks, derived from D's
parameters (its largest value, smallest subnormal, mantissa bits) and from the sums of
equal terms as a pipeline's ``sum`` stage rounds them.

:mod:`xentcheck.limits` starts its search on the pipeline next to these, and shows them
beside the edges it finds; they are not the answer themselves (see that module for the
patterns and the meaning of each edge).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .case import NO_OPTIONS, LossOptions
from .findings import Limit
from .pipelines import Pipeline
from .precision import FloatArray, Precision
from .stages import StageRunner
from .value_line import ValueLine


def worst_target(precision: Precision) -> float | None:
    """The largest value T of D whose exp, as a pipeline computes it, rounds to D's smallest
    subnormal u: e^T is almost 1.5 u, and rounding it to u loses a third of it. None where
    no value of D has an exp that rounds to u (float8_e5m2: its values around ln u = -11.09
    are 2 apart, exp(-10) rounds to 3 u and exp(-12) to 0).

    Naive softmax divides that target exponential by the others' sum without shifting
    first, so the same spread S is worse with the others at T + S (p = u / ((C - 1) e^(T+S)),
    about e^-S / (1.5 (C - 1))) than at 0, where e^-S is rounded up as often as down.
    """
    line = ValueLine(precision)
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


def ln_overflow(precision: Precision) -> float:
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
    return _ln_largest_term(precision, classes, math.exp(ln_overflow(precision))
                            if precision.max < 1e300 else precision.max, math.isfinite)


def _ln_largest_term(precision: Precision, count: int, bound: float,
                     holds: Callable[[float], bool]) -> float | None:
    """The real L below which e = round(exp L) keeps ``holds(sum)`` true, for the sum of
    ``count`` copies of e as the pipeline sums them (rounded to D), ``bound`` being about
    where the sum stops holding.

    The largest such e of D is found next to bound / (sum of ``count`` ones); exp(L)
    rounds to at most e below the midpoint between e and the next value of D.
    """
    line = ValueLine(precision)
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
        return ln_overflow(precision)
    low, high = line.value(best), line.value(best + 1)
    return math.log(low + (high - low) / 2)  # (low + high) / 2 would overflow near max


def spread_closed_form(precision: Precision, classes: int, subnormals: bool) -> float | None:
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
    line = ValueLine(precision)
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
    -103.97, float16 -17.33, bfloat16 -92.88); spread: see :func:`spread_closed_form`,
    and at most about ``ln 2 - ln(C - 1) - T`` (T from :func:`worst_target`: the others at
    T + S rather than 0 make the same spread worse by up to ln 1.5). shifted: no logit edge
    while the sum of C ones is finite in D (none at all once it is not: p = 1/inf = 0); the
    spread edge of :func:`spread_closed_form` (the shift puts the others at 0 whatever
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
                         smallest_safe_logit=-ln_overflow(precision))
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
            spread = spread_closed_form(precision, classes, subnormals)
            if pipeline.name == "naive" and spread is not None and subnormals:
                # the others at M = T + S, the target at T (see worst_target): p = u / s
                # must exceed u / 2, s the sum of C - 1 copies of round(e^M): s < 2; the
                # first M of D past that bound breaks, and S must stay below M - T
                level = _ln_largest_term(precision, classes - 1, 2.0, lambda s: s < 2.0)
                target = worst_target(precision)
                if level is not None and target is not None:
                    line = ValueLine(precision)
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
