"""Inputs of the recorded framework cases (``fused``, ``keras``), generated from a seed with
numpy alone, so that the recording scripts (run with the framework installed) and the tests
(run without it) build the same inputs; and the encoding of recorded values.

A case's logits are values of its dtype D (rounded there from float64 draws) held in float64;
small arrays are stored whole as D's bit patterns in hex, large ones as the SHA-256 of their
bit patterns plus a few sampled values.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from xentcheck.case import Case, LossSpec
from xentcheck.precision import Precision

# Arrays with at most this many values are stored whole; larger ones are hashed.
STORED_WHOLE = 1024
SAMPLES = 16
_UNSIGNED = {2: np.uint16, 4: np.uint32, 8: np.uint64}


DTYPES = ("float16", "bfloat16", "float32", "float64")


def cases(variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every variant in every dtype, named ``<variant>-<dtype>``."""
    return [{**variant, "name": f"{variant['name']}-{dtype}", "variant": variant["name"],
             "dtype": dtype} for variant in variants for dtype in DTYPES]


def make_inputs(entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(logits, labels, class weights), logits and weights values of the case's dtype in
    float64; labels int64 (index) or float64 values of D (dense/binary)."""
    d = Precision(entry["dtype"])
    rows, classes = entry["shape"]
    rng = np.random.default_rng(entry["seed"])
    kind = entry.get("logits", "normal")
    if kind == "normal":
        logits = rng.normal(entry.get("loc", 0.0), entry.get("scale", 1.0), (rows, classes))
    elif kind == "probabilities":  # rows of a softmax, some tiny entries
        raw = np.exp(rng.normal(0.0, entry.get("scale", 3.0), (rows, classes)))
        logits = raw / raw.sum(axis=-1, keepdims=True)
    elif kind == "overflow":  # the float16 mean: rows of [0, -40], label 1
        logits = np.tile(np.array([[0.0, -40.0]]), (rows, 1))
    else:
        raise ValueError(kind)
    logits = d.round(logits).astype(np.float64)
    label_kind = entry.get("label_kind", "index")
    labels: np.ndarray
    if label_kind == "index":
        labels = rng.integers(0, classes, rows).astype(np.int64)
        if kind == "overflow":
            labels[:] = 1
        ignore = entry.get("ignore_index")
        if ignore is not None:
            labels[rng.random(rows) < 0.25] = ignore
    elif label_kind == "dense":
        if entry.get("one_hot"):
            labels = np.eye(classes)[rng.integers(0, classes, rows)]
        else:
            raw = np.exp(rng.normal(0.0, 2.0, (rows, classes)))
            labels = raw / raw.sum(axis=-1, keepdims=True)
        labels = d.round(labels).astype(np.float64)
    else:  # binary targets in [0, 1]
        labels = d.round(rng.random((rows, classes))).astype(np.float64)
        if entry.get("hard_targets"):
            labels = np.round(labels)
    weights = None
    if entry.get("weights"):
        weights = d.round(rng.uniform(0.5, 2.0, classes)).astype(np.float64)
    return logits, labels, weights


def make_case(entry: dict[str, Any], from_logits: bool = True) -> Case:
    logits, labels, weights = make_inputs(entry)
    spec = LossSpec(
        family=entry.get("family", "softmax"),
        from_logits=from_logits,
        class_weights=weights,
        label_smoothing=entry.get("label_smoothing", 0.0),
        ignore_index=entry.get("ignore_index"),
        reduction=entry.get("reduction", "mean"),
    )
    return Case(entry["name"], logits, labels, entry.get("label_kind", "index"), spec)


def bit_patterns(values: Any, dtype: str) -> np.ndarray:
    """Values of ``dtype`` (given in any float dtype that holds them) as unsigned integers."""
    d = Precision(dtype)
    array = np.asarray(values, dtype=np.float64).astype(d.dtype)
    out: np.ndarray = array.view(_UNSIGNED[d.dtype.itemsize])
    return out


def encode(values: Any, dtype: str) -> dict[str, Any]:
    """Whole bit patterns (hex) for a small array; SHA-256 and samples for a large one."""
    bits = bit_patterns(values, dtype).ravel()
    if bits.size <= STORED_WHOLE:
        return {"bits": [format(int(b), "x") for b in bits]}
    positions = sample_positions(bits.size)
    return {
        "sha256": hashlib.sha256(bits.tobytes()).hexdigest(),
        "size": int(bits.size),
        "samples": [format(int(b), "x") for b in bits[positions]],
        "row_sha256": row_digests(bit_patterns(values, dtype)),
    }


def row_digests(bits: np.ndarray) -> list[str]:
    """The first 16 hex digits of each row's SHA-256 (a 1-D array is one row): which rows of
    a hashed array differ."""
    rows = bits.reshape(1, -1) if bits.ndim < 2 else bits.reshape(bits.shape[0], -1)
    return [hashlib.sha256(np.ascontiguousarray(row).tobytes()).hexdigest()[:16] for row in rows]


def differing_rows(stored: dict[str, Any], values: Any, dtype: str) -> list[int]:
    """The rows of a hashed array whose bit patterns differ from the recorded ones."""
    digests = row_digests(bit_patterns(values, dtype))
    return [i for i, (a, b) in enumerate(zip(digests, stored["row_sha256"], strict=True))
            if a != b]


def sample_positions(size: int) -> np.ndarray:
    return np.unique(np.linspace(0, size - 1, SAMPLES).astype(np.int64))


def decode_bits(stored: dict[str, Any]) -> np.ndarray:
    """The stored bit patterns (whole, or the samples of a hashed array)."""
    return np.array([int(h, 16) for h in stored.get("bits", stored.get("samples", []))],
                    dtype=np.uint64)


def ulp_distance(a_bits: np.ndarray, b_bits: np.ndarray, dtype: str) -> int:
    """The largest distance between two arrays of D's bit patterns, in D's representable
    steps (sign-magnitude patterns mapped to a monotone integer line)."""
    width = Precision(dtype).dtype.itemsize * 8
    sign = np.uint64(1) << np.uint64(width - 1)

    def line(bits: np.ndarray) -> np.ndarray:
        b = bits.astype(np.uint64)
        magnitude = (b & (sign - np.uint64(1))).astype(object)
        return np.where((b & sign) != 0, -magnitude, magnitude)

    if not a_bits.size:
        return 0
    return int(max(abs(int(x) - int(y)) for x, y in zip(line(a_bits), line(b_bits), strict=True)))


def matches(stored: dict[str, Any], values: Any, dtype: str) -> tuple[bool, int]:
    """(bit-for-bit equal, largest ulp distance over what is stored: the whole array, or a
    hashed array's samples)."""
    bits = bit_patterns(values, dtype).ravel()
    if "bits" in stored:
        recorded = decode_bits(stored)
        return bool(np.array_equal(recorded, bits.astype(np.uint64))), ulp_distance(
            recorded, bits, dtype)
    equal = hashlib.sha256(bits.tobytes()).hexdigest() == stored["sha256"]
    sampled = bits[sample_positions(bits.size)]
    return equal, ulp_distance(decode_bits(stored), sampled, dtype)
