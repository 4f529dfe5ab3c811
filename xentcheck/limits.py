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

from collections.abc import Callable
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
