"""The recorded PyTorch cases of ``fixtures/torch_textbook_gradients.json``, and xentcheck's
numbers for them computed the way the evaluator computes them (forward pass, then the
backward pass from the forward's own values, block by block)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from xentcheck.case import Case, LossSpec
from xentcheck.execution import run_with_gradient
from xentcheck.pipelines import available
from xentcheck.precision import Precision

FIXTURE = Path(__file__).parent / "fixtures" / "torch_textbook_gradients.json"


@cache
def recorded() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(FIXTURE.read_text(encoding="utf-8"))
    return doc


def from_hex(values: Any) -> np.ndarray:
    if isinstance(values, str):
        return np.array(float.fromhex(values))
    return np.array([from_hex(v) for v in values])


def make_case(entry: dict[str, Any]) -> Case:
    spec = dict(entry["spec"])
    for key in ("class_weights", "pos_weight"):
        if key in spec:
            spec[key] = np.array(spec[key], dtype=np.float64)
    kind = entry["label_kind"]
    labels = np.array(entry["labels"], dtype=np.int64 if kind == "index" else np.float64)
    return Case(entry["name"], np.array(entry["logits"], dtype=np.float64), labels, kind,
                LossSpec(family=entry["family"], **spec))


def xentcheck_result(case: Case, pipeline_name: str, dtype: str,
                     block_elements: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """xentcheck's loss (the per-example array for ``none``) and gradient, in float64."""
    pipeline = next(p for p in available(case.spec.family, case.spec.from_logits, every=True)
                    if p.name == pipeline_name)
    loss, _, gradient = run_with_gradient(pipeline, Precision(dtype), case, block_elements)
    assert gradient is not None
    return np.asarray(loss, dtype=np.float64), gradient


def bits(values: np.ndarray) -> np.ndarray:
    """float64 bit patterns, every NaN alike (payloads and signs are not compared)."""
    array = np.asarray(values, dtype=np.float64)
    return np.where(np.isnan(array), np.float64(np.nan), array).view(np.uint64)


def ulp_distance(a: np.ndarray, b: np.ndarray, dtype: str) -> float:
    """Largest distance in units of D's spacing (inf where only one side is finite)."""
    precision = Precision(dtype)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    same = (a == b) | both_nan
    if same.all():
        return 0.0
    with np.errstate(invalid="ignore"):
        gap = np.abs(a - b) / precision.ulp(np.minimum(np.abs(a), np.abs(b)))
    return float(np.max(np.where(same, 0.0, np.where(np.isnan(gap), np.inf, gap))))
