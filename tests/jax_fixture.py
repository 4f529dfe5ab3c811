"""The JAX/optax cases of ``fixtures/jax_optax.json``: their inputs (given, or generated from a
seed), and the bit patterns and hashes the recorded values are compared by.

``fixtures/record_jax_optax.py`` imports this module to build the same inputs it hands to
jax; the tests import it to rebuild them for xentcheck.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from xentcheck.case import Case, LossSpec
from xentcheck.precision import Precision

FIXTURE = Path(__file__).parent / "fixtures" / "jax_optax.json"
DTYPES = ("float16", "bfloat16", "float32", "float64")
# values stored in full below this many; beyond it, a hash and a few samples
INLINE_LIMIT = 512
SAMPLES = 8


@cache
def recorded() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(FIXTURE.read_text(encoding="utf-8"))
    return doc


def generated_inputs(gen: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float64) and labels from a seed: ``normal(0, scale)`` logits (plus ``shift``),
    labels per ``labels``: ``index`` (integers), ``onehot``, ``probs`` (Dirichlet rows),
    ``binary`` (0/1 targets) or ``soft`` (uniform targets in [0, 1])."""
    rng = np.random.default_rng(gen["seed"])
    rows, classes = gen["rows"], gen["classes"]
    logits = rng.normal(0.0, gen["scale"], (rows, classes)) + gen.get("shift", 0.0)
    kind = gen["labels"]
    labels: np.ndarray
    if kind in ("index", "onehot"):
        labels = rng.integers(0, classes, rows)
        if kind == "onehot":
            labels = np.eye(classes)[labels]
    elif kind == "probs":
        labels = rng.dirichlet(np.ones(classes), rows)
    elif kind == "binary":
        labels = rng.integers(0, 2, (rows, classes)).astype(np.float64)
    else:
        labels = rng.uniform(0.0, 1.0, (rows, classes))
    return logits, labels


def inputs(entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    if "generate" in entry:
        return generated_inputs(entry["generate"])
    kind = entry["label_kind"]
    labels = np.array(entry["labels"], dtype=np.int64 if kind == "index" else np.float64)
    return np.array(entry["logits"], dtype=np.float64), labels


def make_case(entry: dict[str, Any]) -> Case:
    spec = dict(entry["spec"])
    for key in ("class_weights", "pos_weight"):
        if key in spec:
            spec[key] = np.array(spec[key], dtype=np.float64)
    logits, labels = inputs(entry)
    kind = entry["label_kind"]
    if kind == "index":
        labels = labels.astype(np.int64)
    return Case(entry["name"], logits, labels, kind, LossSpec(family=entry["family"], **spec))


def in_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """Values of D (held in float64 or D) as an array of D itself, NaNs made canonical."""
    array = np.asarray(values, dtype=np.float64)
    array = np.where(np.isnan(array), np.nan, array)
    return np.asarray(array.astype(Precision(dtype).dtype))


def digest(values: np.ndarray, dtype: str) -> str:
    """SHA-256 of the values' bit patterns in D (C order)."""
    return hashlib.sha256(np.ascontiguousarray(in_dtype(values, dtype)).tobytes()).hexdigest()


def sample_positions(size: int) -> list[int]:
    """Flat positions recorded alongside a hash: the ends and a spread between."""
    return sorted({int(i) for i in np.linspace(0, size - 1, SAMPLES)})


def summarise(values: np.ndarray, dtype: str) -> dict[str, Any] | list[str] | str:
    """A value: hex floats in full (small), or a hash with sampled entries (large)."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if np.ndim(values) == 0:
        return float(flat[0]).hex()
    if flat.size <= INLINE_LIMIT:
        return [float(v).hex() for v in flat]
    positions = sample_positions(flat.size)
    return {"sha256": digest(values, dtype), "size": int(flat.size),
            "samples": {str(i): float(flat[i]).hex() for i in positions}}


def matches(summary: Any, values: np.ndarray, dtype: str) -> bool:
    """Whether ``values`` are, bit for bit, the recorded ones (every NaN alike)."""
    if isinstance(summary, dict):
        return digest(values, dtype) == summary["sha256"]
    return bool(np.array_equal(bits(np.asarray(values, dtype=np.float64).reshape(-1)),
                               bits(from_hex(summary).reshape(-1))))


def from_hex(values: Any) -> np.ndarray:
    if isinstance(values, str):
        return np.array(float.fromhex(values))
    return np.array([float.fromhex(v) for v in values])


def bits(values: np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    return np.where(np.isnan(array), np.float64(np.nan), array).view(np.uint64)


def ulp_distance(summary: Any, values: np.ndarray, dtype: str) -> float:
    """The largest distance in units of D's spacing between ``values`` and the recorded ones
    (for hashed values: over the sampled entries only)."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if isinstance(summary, dict):
        positions = [int(i) for i in summary["samples"]]
        want = np.array([float.fromhex(summary["samples"][str(i)]) for i in positions])
        flat = flat[positions]
    else:
        want = from_hex(summary).reshape(-1)
    precision = Precision(dtype)
    both_nan = np.isnan(flat) & np.isnan(want)
    same = (flat == want) | both_nan
    if same.all():
        return 0.0
    with np.errstate(invalid="ignore"):
        gap = np.abs(flat - want) / precision.ulp(np.minimum(np.abs(flat), np.abs(want)))
    return float(np.max(np.where(same, 0.0, np.where(np.isnan(gap), np.inf, gap))))


def xentcheck_result(case: Case, dtype: str) -> dict[str, np.ndarray]:
    """The ``jax`` pipeline's loss, per-example losses and gradient for a case, computed as the
    evaluator computes them (forward, then backward from the forward's own values, block by
    block), in float64."""
    from xentcheck.execution import run_with_gradient
    from xentcheck.pipelines import select

    [pipeline] = select(case.spec.family, True, ["jax"])
    loss, per_example, gradient = run_with_gradient(pipeline, Precision(dtype), case)
    assert gradient is not None
    return {"loss": np.asarray(loss, dtype=np.float64),
            "per_example": np.asarray(per_example, dtype=np.float64), "grad": gradient}
