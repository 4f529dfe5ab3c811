"""The cases of ``fixtures/torch_framework.json``, built from seeds: the recording script
(``fixtures/record_torch_framework.py``, with torch) and the test (without it) build the very
same inputs, so large cases need not be stored.

Every input is a value of the dtype it is evaluated in (generated in float32, rounded to D
once), so no conversion of the inputs is in question; class weights and ``pos_weight`` are
small multiples of 1/8, exact in every dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

from xentcheck.case import Case, LossSpec

DTYPES = ("float16", "bfloat16", "float32", "float64")
NP_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
IGNORE = -100


@dataclass(frozen=True)
class Spec:
    """One case: ``kind`` is ``index``/``dense`` (softmax from logits), ``binary`` (sigmoid
    from logits) or ``probabilities`` (sigmoid, F.binary_cross_entropy)."""

    name: str
    kind: str
    rows: int
    classes: int
    seed: int = 0
    scale: float = 3.0
    centre: float = 0.0
    reduction: str = "mean"
    weights: bool = False
    pos_weight: bool = False
    smoothing: float = 0.0
    ignored: float = 0.0  # share of rows whose label is IGNORE
    constant: tuple[float, ...] | None = None  # every row these logits (label: last class)
    extra: dict[str, Any] = field(default_factory=dict)


def _specs() -> list[Spec]:
    out: list[Spec] = []
    for reduction in ("mean", "sum", "none"):
        out += [
            Spec(f"tiny_{reduction}", "index", 1, 2, constant=(0.0, -40.0), reduction=reduction),
            Spec(f"random_{reduction}", "index", 64, 100, seed=1, reduction=reduction),
            Spec(f"weights_ignore_{reduction}", "index", 300, 37, seed=2, weights=True,
                 ignored=0.2, reduction=reduction),
            Spec(f"smoothing_{reduction}", "index", 64, 50, seed=3, smoothing=0.1,
                 reduction=reduction),
            Spec(f"smoothing_weights_ignore_{reduction}", "index", 70, 20, seed=4,
                 weights=True, smoothing=0.25, ignored=0.1, reduction=reduction),
            Spec(f"dense_{reduction}", "dense", 32, 50, seed=5, reduction=reduction),
            Spec(f"dense_smoothing_weights_{reduction}", "dense", 33, 17, seed=6,
                 smoothing=0.1, weights=True, reduction=reduction),
            Spec(f"binary_{reduction}", "binary", 64, 8, seed=7, scale=4.0, reduction=reduction),
            Spec(f"binary_weights_pos_{reduction}", "binary", 64, 8, seed=8, scale=4.0,
                 weights=True, pos_weight=True, reduction=reduction),
            Spec(f"probabilities_{reduction}", "probabilities", 64, 8, seed=9,
                 reduction=reduction),
            Spec(f"probabilities_weights_{reduction}", "probabilities", 40, 5, seed=10,
                 weights=True, reduction=reduction),
        ]
    out += [
        Spec("pair_1x2", "index", 1, 2, seed=11),
        Spec("overflow_2000", "index", 2000, 2, constant=(0.0, -40.0)),
        Spec("overflow_2000_sum", "index", 2000, 2, constant=(0.0, -40.0), reduction="sum"),
        Spec("divisor_257", "index", 257, 10, seed=12, scale=2.0),
        Spec("divisor_257_constant", "index", 257, 2, constant=(0.0, -6.0)),
        # counts that bfloat16 (and float16) cannot hold: which divisors are rounded to D
        Spec("smoothing_divisor_257", "index", 257, 10, seed=26, smoothing=0.2, ignored=0.0),
        Spec("smoothing_divisor_2100", "index", 2100, 3, seed=27, smoothing=0.2, ignored=0.1),
        Spec("dense_divisor_257", "dense", 257, 10, seed=28),
        Spec("binary_divisor_771", "binary", 257, 3, seed=29),
        Spec("binary_divisor_771_sum", "binary", 257, 3, seed=29, reduction="sum"),
        Spec("divisor_257_weights", "index", 257, 10, seed=13, scale=2.0, weights=True),
        Spec("narrow", "index", 128, 64, seed=14, scale=0.01),
        Spec("wide", "index", 128, 64, seed=15, scale=30.0, centre=100.0),
        Spec("wide_sum", "index", 128, 64, seed=15, scale=30.0, centre=100.0, reduction="sum"),
        Spec("cascade_4099_sum", "index", 4099, 3, seed=16, ignored=0.3, reduction="sum"),
        Spec("cascade_4099_mean_weights", "index", 4099, 3, seed=17, ignored=0.3,
             weights=True),
        Spec("vocab_32000", "index", 257, 32000, seed=18, scale=2.0),
        Spec("vocab_32000_smoothing", "index", 33, 32000, seed=19, scale=2.0, smoothing=0.1),
        Spec("flat_70000", "index", 2, 70000, seed=20, scale=0.001),
        Spec("dense_wide", "dense", 16, 40, seed=21, scale=25.0),
        Spec("binary_wide", "binary", 50, 6, seed=22, scale=40.0),
        Spec("binary_wide_pos", "binary", 50, 6, seed=23, scale=40.0, pos_weight=True),
        Spec("binary_large", "binary", 257, 1000, seed=24, scale=6.0),
        Spec("probabilities_edges", "probabilities", 4, 6, seed=25, extra={"edges": True}),
    ]
    return out


SPECS = _specs()


def _in(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to D once, as float64."""
    return np.asarray(values, dtype=np.float32).astype(NP_DTYPES[dtype]).astype(np.float64)


def _eighths(rng: np.random.Generator, n: int, low: int = 1, high: int = 24) -> np.ndarray:
    return rng.integers(low, high, n).astype(np.float64) / 8


def inputs(spec: Spec, dtype: str) -> dict[str, Any]:
    """logits, labels (int64 or float64), weights, pos_weight of a case, in D."""
    rng = np.random.default_rng(spec.seed)
    shape = (spec.rows, spec.classes)
    if spec.constant is not None:
        logits = np.tile(np.asarray(spec.constant, dtype=np.float64), (spec.rows, 1))
    elif spec.kind == "probabilities":
        logits = rng.uniform(0, 1, shape) ** 3
        if spec.extra.get("edges"):
            logits.flat[: 8] = [0.0, 1.0, 1e-30, 1 - 1e-7, 0.0, 1.0, 0.5, 1e-5]
    else:
        logits = spec.centre + spec.scale * rng.standard_normal(shape)
    logits = _in(logits, dtype)
    labels: np.ndarray
    if spec.kind == "index":
        if spec.constant is not None:
            labels = np.full(spec.rows, spec.classes - 1, dtype=np.int64)
        else:
            labels = rng.integers(0, spec.classes, spec.rows)
        if spec.ignored:
            labels = np.where(rng.uniform(size=spec.rows) < spec.ignored, IGNORE, labels)
    elif spec.kind == "dense":
        raw = rng.uniform(0, 1, shape) ** 4
        labels = _in(raw / raw.sum(-1, keepdims=True), dtype)
    else:
        labels = _in(np.where(rng.uniform(size=shape) < 0.3, rng.uniform(size=shape),
                              rng.integers(0, 2, shape)), dtype)
        if spec.extra.get("edges"):
            labels.flat[: 8] = [1, 0, 1, 0, 0, 1, 0.5, 1]
    weights = _eighths(rng, spec.classes) if spec.weights else None
    pos = _eighths(rng, spec.classes, 2, 40) if spec.pos_weight else None
    return {"logits": logits, "labels": labels.astype(np.int64 if spec.kind == "index"
                                                      else np.float64),
            "weights": weights, "pos_weight": pos}


def make_case(spec: Spec, dtype: str) -> Case:
    data = inputs(spec, dtype)
    family = "softmax" if spec.kind in ("index", "dense") else "sigmoid"
    loss = LossSpec(
        family=family,  # type: ignore[arg-type]
        from_logits=spec.kind != "probabilities",
        class_weights=data["weights"], pos_weight=data["pos_weight"],
        label_smoothing=spec.smoothing,
        ignore_index=IGNORE if spec.kind == "index" else None,
        reduction=spec.reduction,  # type: ignore[arg-type]
    )
    label_kind = "index" if spec.kind == "index" else ("dense" if spec.kind == "dense"
                                                        else "binary")
    return Case(spec.name, data["logits"], data["labels"], label_kind,  # type: ignore[arg-type]
                loss)


def has_gradient(spec: Spec) -> bool:
    return spec.kind != "probabilities"


def canonical_bits(values: np.ndarray) -> np.ndarray:
    """float64 bit patterns, every NaN alike."""
    array = np.asarray(values, dtype=np.float64)
    return np.where(np.isnan(array), np.float64(np.nan), array).view(np.uint64)


def largest_magnitude(values: np.ndarray) -> float:
    """The largest finite ``|value|`` (0 if none): the scale float32/float64 distances are
    measured in."""
    array = np.abs(np.asarray(values, dtype=np.float64))
    finite = array[np.isfinite(array)]
    return float(finite.max()) if finite.size else 0.0


def scaled_distance(mine: np.ndarray, theirs: np.ndarray, dtype: str, scale: float) -> float:
    """The largest ``|mine - theirs|`` in units of D's spacing at ``scale`` (the array's
    largest magnitude): a normwise distance, which a gradient entry that is a tiny
    difference of nearly equal terms does not blow up; inf where only one side is finite."""
    from xentcheck.precision import Precision

    a, b = np.asarray(mine, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    if same.all():
        return 0.0
    if not (np.isfinite(a[~same]).all() and np.isfinite(b[~same]).all()):
        return float("inf")
    return float(np.max(np.abs(a - b)[~same]) / Precision(dtype).ulp(np.float64(scale)))


SAMPLES = 8
FULL = 600  # arrays up to this many values are stored whole
