"""Limits: how large the logits, and the gap below the largest, may get before a pipeline breaks.

For a pipeline, a precision and a class count C:

largest safe logit
    the largest L (a value of D) such that the worst input with every logit at most L still
    gives a finite loss. For softmax the worst case is all C logits equal to L (the sum of
    C exponentials is largest); for sigmoid it is x = +L with target 0 and x = -L with
    target 1. Naive softmax in float32 breaks just above ln(FLT_MAX) - ln C.
largest safe spread
    softmax only: the largest S such that a target logit S below the other C - 1 logits
    (all equal, the worst case) still has a non-zero probability, so the loss stays finite.

Both are found on the pipeline itself, by bisection over the representable values of D
(each step evaluates a batch of candidates at once through the one execution path), so
they include every rounding the pipeline makes. A value equal to D's largest finite number
means the pipeline does not break below the format's own range.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .case import Case, LossSpec
from .findings import Limit
from .pipelines import Pipeline
from .precision import FloatArray, Precision

# Candidates evaluated per bisection step, at most: ~5 bits of the answer per step. Each
# candidate is a row of C logits, so for large C fewer per step cost less in all (plain
# bisection, one row per step, evaluates the fewest values overall).
_MAX_CANDIDATES = 32
_VALUES_PER_STEP = 1 << 18
_UNSIGNED = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _finite_rows(pipeline: Pipeline, precision: Precision, logits: FloatArray,
                 labels: FloatArray, label_kind: str) -> FloatArray:
    from .execution import run_pipeline  # execution imports pipelines, as this module does

    case = Case(
        name="limit",
        logits=logits,
        labels=labels,
        label_kind=label_kind,  # type: ignore[arg-type]
        spec=LossSpec(family=pipeline.family, reduction="none"),  # type: ignore[arg-type]
    )
    _, per_example, _ = run_pipeline(pipeline, precision, case)
    finite = np.isfinite(np.asarray(per_example, dtype=np.float64))
    return np.asarray(finite.reshape(len(logits), -1).all(axis=-1))


def _largest_safe(
    is_safe: Callable[[FloatArray], FloatArray], precision: Precision, classes: int
) -> float:
    """The largest non-negative value v of D with ``is_safe`` true at v (assumed monotone).

    Works on the bit patterns of D, which order non-negative floats, so the answer is exact:
    the next value of D up is unsafe.
    """
    unsigned = _UNSIGNED[precision.dtype.itemsize]

    def values(bits: list[int]) -> FloatArray:
        return np.array(bits, dtype=unsigned).view(precision.dtype).astype(np.float64)

    candidates = max(1, min(_MAX_CANDIDATES, _VALUES_PER_STEP // max(1, classes)))
    top = int(np.array(precision.max, dtype=precision.dtype).view(unsigned))
    if is_safe(values([top]))[0]:
        return precision.max
    low, high = 0, top  # low is safe (0 is, for every pipeline here), high is not
    while high - low > 1:
        span = high - low
        bits = sorted({low + span * k // (candidates + 1) for k in range(1, candidates + 1)})
        bits = [b for b in bits if low < b < high] or [low + span // 2]
        safe = is_safe(values(bits))
        unsafe = np.flatnonzero(~safe)
        if len(unsafe):
            first = int(unsafe[0])
            high = bits[first]
            if first:
                low = bits[first - 1]
        else:
            low = bits[-1]
    return float(values([low])[0])


@lru_cache(maxsize=256)
def pipeline_limit(pipeline: Pipeline, precision: Precision, classes: int) -> Limit:
    """Largest safe logit and spread of ``pipeline`` in ``precision`` for ``classes`` classes."""
    if not pipeline.from_logits:
        return Limit(None, None)  # probability inputs have no logit scale to run out of
    if pipeline.family == "sigmoid":
        def sigmoid_safe(values: FloatArray) -> FloatArray:
            logits = np.stack([values, -values], axis=-1)
            labels = np.tile(np.array([0.0, 1.0]), (len(values), 1))
            return _finite_rows(pipeline, precision, logits, labels, "binary")

        return Limit(_largest_safe(sigmoid_safe, precision, 2), None)

    def logit_safe(values: FloatArray) -> FloatArray:
        logits = np.repeat(values[:, None], classes, axis=1)
        return _finite_rows(pipeline, precision, logits, np.zeros(len(values)), "index")

    def spread_safe(values: FloatArray) -> FloatArray:
        logits = np.zeros((len(values), classes))
        logits[:, 0] = -values
        return _finite_rows(pipeline, precision, logits, np.zeros(len(values)), "index")

    spread = _largest_safe(spread_safe, precision, classes) if classes > 1 else None
    return Limit(_largest_safe(logit_safe, precision, classes), spread)


# -- closed forms ----------------------------------------------------------------------------


def _ln_overflow(precision: Precision) -> float:
    """ln of the smallest real that rounds to inf: max + half an ulp = (2 - 2^-(p+1)) 2^emax."""
    p = precision.mantissa_bits
    emax = math.frexp(precision.max)[1] - 1
    return math.log(2.0 - 2.0 ** -(p + 1)) + emax * math.log(2.0)


def _spread_closed_form(precision: Precision, classes: int, subnormals: bool) -> float:
    """Largest target gap S before round(e^-S / (C - 1)) is zero (others at the maximum).

    With subnormals, e_t = e^-S is rounded to a multiple k of the smallest subnormal u, and
    k u / (C - 1) must exceed u / 2 (an exact half is a tie that rounds to the even 0):
    k >= floor((C - 1) / 2) + 1, which e^-S reaches from (k - 1/2) u on. Once k u is a
    normal number the grid is fine enough that e^-S / (C - 1) > u / 2 is the edge. Without
    subnormals (flush to zero) every value below the smallest normal is 0.
    """
    rest = float(precision.round(np.float64(classes - 1)))  # the sum of the other C - 1 ones
    if not subnormals:
        return -math.log(precision.tiny) - math.log(rest)
    unit = precision.smallest_subnormal
    k = math.floor(rest / 2) + 1
    if k * unit < precision.tiny:
        return -math.log(k - 0.5) - math.log(unit)
    return -math.log(unit / 2) - math.log(rest)


def closed_form_limit(
    pipeline: Pipeline, precision: Precision, classes: int, *, subnormals: bool = True
) -> Limit | None:
    """The edges of ``pipeline`` derived from the format's parameters, where known.

    naive softmax: largest logit ``ln(max + ulp/2) - ln C`` (C equal terms overflow the sum);
    spread: see :func:`_spread_closed_form`. shifted: no logit edge (the max is subtracted);
    the same spread edge. stable: neither, before the format's own range. naive sigmoid:
    ``1 + e^-x`` rounds to 1 once ``e^-x <= 2^-(p+1)``, so ``x < (p + 1) ln 2`` (or the
    overflow of ``e^x`` at ``ln(max)``, whichever is smaller). stable sigmoid: none. Returns
    None for probability pipelines. Accurate to the rounding of exp and of the sums, i.e. to
    within a few units in the last place of D at the edge.
    """
    if not pipeline.from_logits:
        return None
    top = precision.max
    if pipeline.family == "sigmoid":
        if pipeline.name == "naive":
            edge = min((precision.mantissa_bits + 1) * math.log(2.0), _ln_overflow(precision))
            return Limit(edge, None)
        return Limit(top, None)
    spread = None
    if classes > 1:
        spread = top if pipeline.name == "stable" else _spread_closed_form(
            precision, classes, subnormals)
    logit = _ln_overflow(precision) - math.log(classes) if pipeline.name == "naive" else top
    return Limit(logit, spread)


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


def _agree(found: float | None, closed: float | None, precision: Precision, classes: int) -> bool:
    """Whether a closed form lies within the rounding slack of the bisected edge.

    The bisected edge is a value of D and the true edge lies before the next one; the closed
    form ignores the rounding of exp (a relative error of a unit in the compute dtype) and of
    the C-term sum, which move the edge by as much in absolute terms (d ln y = dy / y).
    """
    if found is None or closed is None:
        return found is None and closed is None
    compute_eps = float(np.finfo(precision.compute_dtype).eps)
    slack = float(precision.ulp(np.float64(found))) + 4 * compute_eps * (abs(closed) + classes)
    return abs(closed - found) <= slack


def limit_rows(
    pipelines: Sequence[Pipeline], precisions: Sequence[Precision], classes: int
) -> list[LimitRow]:
    """Every (pipeline, precision) pair's edges, closed form next to bisection."""
    rows = []
    for precision in precisions:
        for pipeline in pipelines:
            found = pipeline_limit(pipeline, precision, classes)
            closed = closed_form_limit(pipeline, precision, classes)
            no_sub = None
            if closed is not None and closed.largest_safe_spread is not None \
                    and pipeline.name != "stable":
                no_sub = _spread_closed_form(precision, classes, subnormals=False)
            agrees = closed is not None and all(
                _agree(a, b, precision, classes) for a, b in (
                    (found.largest_safe_logit, closed.largest_safe_logit),
                    (found.largest_safe_spread, closed.largest_safe_spread),
                )
            )
            rows.append(LimitRow(pipeline.family, pipeline.name, precision.name, classes, found,
                                 closed, no_sub, agrees))
    return rows
