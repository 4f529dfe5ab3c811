"""Limits found by bisection against closed forms derived from the formats' parameters."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from xentcheck.case import Case, LossSpec
from xentcheck.execution import run_pipeline
from xentcheck.limits import pipeline_limit
from xentcheck.pipelines import available
from xentcheck.precision import Precision

# (largest finite, smallest subnormal, stored significand bits), from the IEEE formats
# (bfloat16: float32's exponent with 7 stored bits).
FORMATS = {
    "float16": ((2 - 2**-10) * 2.0**15, 2.0**-24, 10),
    "bfloat16": ((2 - 2**-7) * 2.0**127, 2.0**-133, 7),
    "float32": ((2 - 2**-23) * 2.0**127, 2.0**-149, 23),
    "float64": ((2 - 2**-52) * 2.0**1023, 2.0**-1074, 52),
}
DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32,
          "float64": np.float64}


def pipeline(family: str, name: str):  # type: ignore[no-untyped-def]
    return next(p for p in available(family, True) if p.name == name)


def next_up(value: float, dtype: str) -> float:
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[np.dtype(DTYPES[dtype]).itemsize]
    b = np.array(value, dtype=DTYPES[dtype]).view(bits) + bits(1)
    return float(np.array(b).view(DTYPES[dtype]).astype(np.float64))


def ln_overflow_threshold(dtype: str) -> float:
    """ln of the smallest value that rounds to inf: max + half an ulp = (2 - 2^-(p+1)) 2^emax."""
    top, _, p = FORMATS[dtype]
    emax = math.frexp(top)[1] - 1
    return math.log(2 - 2.0 ** -(p + 1)) + emax * math.log(2)


def slack(dtype: str, classes: int) -> float:
    """How far roundings may move the edge: exp's rounding to D and the sum's (in float32
    for 16-bit D) each perturb e^L relatively, which moves ln by the same amount."""
    _, _, p = FORMATS[dtype]
    acc_bits = 23 if p < 23 else p
    return 2 * 2.0**-p + classes * 2.0**-acc_bits


@pytest.mark.parametrize("dtype", list(FORMATS))
@pytest.mark.parametrize("classes", [1, 2, 3, 10, 1000])
def test_naive_softmax_largest_safe_logit(dtype: str, classes: int) -> None:
    limit = pipeline_limit(pipeline("softmax", "naive"), Precision(dtype), classes)
    edge = ln_overflow_threshold(dtype) - math.log(classes)
    found = limit.largest_safe_logit
    assert found is not None
    # the edge lies between the last safe value of D and the next one up, up to rounding
    assert found <= edge + slack(dtype, classes) * 2
    assert next_up(found, dtype) >= edge - slack(dtype, classes) * 2


@pytest.mark.parametrize("dtype", list(FORMATS))
def test_the_edge_is_real(dtype: str) -> None:
    # Finite at the limit, not finite one value of D above it (C = 3, all logits equal).
    naive = pipeline("softmax", "naive")
    found = pipeline_limit(naive, Precision(dtype), 3).largest_safe_logit
    assert found is not None
    x = np.array([[found] * 3, [next_up(found, dtype)] * 3])
    case = Case("edge", x, np.zeros(2, dtype=np.int64), "index", LossSpec(reduction="none"))
    loss, _, _ = run_pipeline(naive, Precision(dtype), case)
    finite = np.isfinite(np.asarray(loss, dtype=np.float64))
    assert finite.tolist() == [True, False]


@pytest.mark.parametrize("dtype", list(FORMATS))
@pytest.mark.parametrize("name", ["shifted", "stable"])
def test_shifted_and_stable_never_overflow_below_the_format(name: str, dtype: str) -> None:
    limit = pipeline_limit(pipeline("softmax", name), Precision(dtype), 1000)
    assert limit.largest_safe_logit == FORMATS[dtype][0]


@pytest.mark.parametrize("dtype", list(FORMATS))
@pytest.mark.parametrize("name", ["naive", "shifted"])
def test_spread_edge_two_and_three_classes(name: str, dtype: str) -> None:
    _, tiny_sub, _ = FORMATS[dtype]
    p = pipeline("softmax", name)
    # C = 2: p_t = round(e^-S) is non-zero while e^-S > half the smallest subnormal.
    two = pipeline_limit(p, Precision(dtype), 2).largest_safe_spread
    edge2 = math.log(2) - math.log(tiny_sub)
    # C = 3: p_t = round(e_t / 2) with e_t a multiple of the smallest subnormal; e_t = 1
    # subnormal gives exactly half a subnormal, a tie that rounds to even (0), so e_t must
    # round to 2 subnormals: e^-S >= 1.5 subnormals.
    three = pipeline_limit(p, Precision(dtype), 3).largest_safe_spread
    edge3 = -math.log(1.5) - math.log(tiny_sub)
    for found, edge in ((two, edge2), (three, edge3)):
        assert found is not None
        tol = 4 * 2.0**-23 * edge  # exp evaluated in float32 (or D) before rounding
        assert found <= edge + tol
        assert next_up(found, dtype) >= edge - tol


@pytest.mark.parametrize("dtype", list(FORMATS))
def test_stable_softmax_spread_is_the_format_range(dtype: str) -> None:
    limit = pipeline_limit(pipeline("softmax", "stable"), Precision(dtype), 3)
    assert limit.largest_safe_spread == FORMATS[dtype][0]


@pytest.mark.parametrize("dtype", list(FORMATS))
def test_naive_sigmoid_edge(dtype: str) -> None:
    # 1 + e^-x rounds to 1 once e^-x <= 2^-(p+1) (half an ulp of 1; the tie goes to even),
    # then 1 - s = 0 and log(1 - s) = -inf for a zero target: x < (p + 1) ln 2.
    _, _, p = FORMATS[dtype]
    edge = (p + 1) * math.log(2)
    found = pipeline_limit(pipeline("sigmoid", "naive"), Precision(dtype), 1).largest_safe_logit
    assert found is not None
    tol = 4 * 2.0**-23 * edge
    assert found <= edge + tol
    assert next_up(found, dtype) >= edge - tol
    stable = pipeline_limit(pipeline("sigmoid", "stable"), Precision(dtype), 1)
    assert stable.largest_safe_logit == FORMATS[dtype][0]
