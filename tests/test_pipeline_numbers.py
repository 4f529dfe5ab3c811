"""Each pipeline in each dtype against an independent numpy re-implementation of its formula.

The re-implementations follow the precision model (README, Precision) directly: inputs rounded to D,
each elementwise step evaluated in float32 (D itself for float32/float64) and rounded to D,
sums accumulated in float32 for 16-bit D and rounded to D. Where the order of operations is
the same the results must be bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from xentcheck.case import Case, LossSpec
from xentcheck.execution import run_pipeline
from xentcheck.pipelines import textbook
from xentcheck.precision import Precision

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32,
          "float64": np.float64}
Array = Any


class D:
    """Arithmetic that rounds every result to one dtype (float32 inside for 16-bit)."""

    def __init__(self, name: str) -> None:
        self.dtype = np.dtype(DTYPES[name])
        self.inner = np.float32 if self.dtype.itemsize == 2 else self.dtype

    def r(self, value: Array) -> Array:
        with np.errstate(all="ignore"):
            return np.asarray(value).astype(self.dtype)

    def op(self, fn: Callable[..., Array], *args: Array) -> Array:
        with np.errstate(all="ignore"):
            return self.r(fn(*(np.asarray(a).astype(self.inner) for a in args)))

    def sum(self, x: Array) -> Array:
        with np.errstate(all="ignore"):
            return self.r(np.asarray(x).astype(self.inner).sum(axis=-1, keepdims=True))


def per_example(pipeline_name: str, family: str, dtype: str, logits: Array, labels: Array,
                kind: str = "index", from_logits: bool = True) -> Array:
    pipeline = next(p for p in textbook(family, from_logits) if p.name == pipeline_name)
    case = Case("t", logits, labels, kind,  # type: ignore[arg-type]
                LossSpec(family=family, from_logits=from_logits, reduction="none"))  # type: ignore[arg-type]
    loss, _, _ = run_pipeline(pipeline, Precision(dtype), case)
    return np.asarray(loss)


def softmax_reimplementation(name: str, dtype: str, x: Array, t: Array) -> Array:
    d = D(dtype)
    x = d.r(x)
    rows = np.arange(len(t))
    if name == "naive":
        e = d.op(np.exp, x)
        p = d.op(np.divide, e, d.sum(e))
        return -d.op(np.log, p[rows, t])
    if name == "shifted":
        e = d.op(np.exp, d.op(np.subtract, x, x.max(axis=-1, keepdims=True)))
        p = d.op(np.divide, e, d.sum(e))
        return -d.op(np.log, p[rows, t])
    z = d.op(np.subtract, x, x.max(axis=-1, keepdims=True))
    log_softmax = d.op(np.subtract, z, d.op(np.log, d.sum(d.op(np.exp, z))))
    return -log_softmax[rows, t]


ROWS = np.random.default_rng(11).normal(0, 4, (40, 7))
TARGETS = np.random.default_rng(12).integers(0, 7, 40)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", ["naive", "shifted", "stable"])
def test_softmax_pipelines_match_the_formula_bit_for_bit(name: str, dtype: str) -> None:
    got = per_example(name, "softmax", dtype, ROWS, TARGETS)
    expected = softmax_reimplementation(name, dtype, ROWS, TARGETS)
    # held in D's storage dtype (float16 values in float32), and equal to numpy's float16
    # arithmetic bit for bit
    assert got.dtype == Precision(dtype).storage_dtype  # type: ignore[arg-type]
    np.testing.assert_array_equal(got.astype(np.float64), expected.astype(np.float64))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_sigmoid_pipelines_match_the_formulas(dtype: str) -> None:
    x = np.array([[-18.6, 0.51, 2.94, -12.8, 20.0, 0.0, -3.0]])
    z = np.array([[0.0, 1.0, 0.0, 0.0, 1.0, 0.5, 0.25]])
    d = D(dtype)
    xd, zd = d.r(x), d.r(z)
    s = d.op(np.divide, 1.0, d.op(np.add, 1.0, d.op(np.exp, -xd)))
    q = d.op(np.subtract, 1.0, s)
    pos = d.op(np.multiply, zd, d.op(np.log, s))
    neg = d.op(np.multiply, d.op(np.subtract, 1.0, zd), d.op(np.log, q))
    naive = -d.op(np.add, pos, neg)
    got = per_example("naive", "sigmoid", dtype, x, z, "binary")
    np.testing.assert_array_equal(got.astype(np.float64), naive.astype(np.float64))
    tail = d.op(np.log1p, d.op(np.exp, -np.abs(xd)))
    stable = d.op(np.add, d.op(np.subtract, d.op(np.maximum, xd, 0.0),
                               d.op(np.multiply, xd, zd)), tail)
    got = per_example("stable", "sigmoid", dtype, x, z, "binary")
    np.testing.assert_array_equal(got.astype(np.float64), stable.astype(np.float64))


def test_naive_overflow_case_in_every_dtype() -> None:
    x = np.array([[1000.0, 2000.0, 2500.0]])
    t = np.array([1])
    for dtype in DTYPES:
        assert math.isnan(per_example("naive", "softmax", dtype, x, t)[0])
        shifted = float(per_example("shifted", "softmax", dtype, x, t)[0])
        stable = float(per_example("stable", "softmax", dtype, x, t)[0])
        # bfloat16 holds 2500 as 2496 (8 significant bits: spacing 16 in [2048, 4096)).
        top = float(np.float64(np.array(2500.0).astype(ml_dtypes.bfloat16))) \
            if dtype == "bfloat16" else 2500.0
        assert top == (2496.0 if dtype == "bfloat16" else 2500.0)
        assert stable == top - 2000.0
        # exp(2000 - 2500) is 7e-218: zero in every format but float64
        assert shifted == (500.0 if dtype == "float64" else math.inf)


def test_probability_pipelines() -> None:
    p = np.array([[0.2, 0.3, 0.4], [1e-9, 0.9, 0.3]])
    t = np.array([2, 0])
    naive = per_example("naive", "softmax", "float64", p, t, from_logits=False)
    expected = -np.log(p[[0, 1], t] / p.sum(axis=-1))
    np.testing.assert_allclose(naive, expected, rtol=4e-16)
    clipped = per_example("clipped", "softmax", "float64", p, t, from_logits=False)
    q = np.clip(p / p.sum(axis=-1, keepdims=True), 1e-7, 1 - 1e-7)
    np.testing.assert_array_equal(clipped, -np.log(q[[0, 1], t]))
