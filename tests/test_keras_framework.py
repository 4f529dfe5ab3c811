"""The ``keras`` pipeline against Keras 3.15's losses (torch backend, CPU, one thread).

``fixtures/keras_torch.json`` (written by ``fixtures/record_keras.py``) holds the float32 loss
and the float32 gradient (``torch.autograd`` on the input's float32 copy) of 60 cases: sparse
and categorical cross-entropy from logits (``ignore_class``, label smoothing, every
reduction), the probability form, and binary cross-entropy from logits, each with inputs
stored in float16, bfloat16, float32 and float64 (Keras rounds the last to float32).

Where xentcheck's numbers are not PyTorch's bit for bit the cause is a primitive, not the
formulation: PyTorch's float32 ``exp``/``log``/``log1p`` are SLEEF's (within 1 ulp, not
correctly rounded) where xentcheck's are numpy's, PyTorch sums a row with a vectorised cascade
where numpy sums pairwise, and log-softmax's backward kernel forms ``exp(log_softmax)`` with
an exp of its own that differs from ``torch.exp`` by 1 ulp on ~10% of inputs. A gradient entry
``(p - y) / N`` is a difference of nearly equal terms where ``p`` is near ``y``: one ulp of
``p`` becomes many of the difference (up to ~1500 float32 ulps for soft labels, whose
entries come close to ``p``). :func:`test_with_torchs_primitives_the_losses_are_keras_bit_for_bit`
proves the forward part: with torch's exp, log, log1p and sum substituted, every loss is equal
bit for bit but the two documented there.
"""

from __future__ import annotations

import json
import os
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from framework_cases import make_case, matches
from framework_results import xentcheck_result
from frameworks import recording_script, require

from xentcheck.stages import StageRunner

FIXTURE = Path(__file__).parent / "fixtures" / "keras_torch.json"


@cache
def recorded() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(FIXTURE.read_text(encoding="utf-8"))
    return doc


ENTRIES = recorded()["cases"]
IDS = [entry["name"] for entry in ENTRIES]

# case: (loss, gradient) -- the largest distance, in float32 ulps, of xentcheck's loss and
# gradient entries from Keras', as measured with numpy's primitives; every other case is
# equal bit for bit (the probability form throughout, in float16, float32 and float64).
DIFFERENCES: dict[str, tuple[int, int]] = {
    "sparse_narrow-float16": (0, 9),
    "sparse_narrow-bfloat16": (0, 4),
    "sparse_narrow-float32": (1, 9),
    "sparse_narrow-float64": (1, 9),
    "sparse_wide_none-float16": (0, 2),
    "sparse_wide_none-bfloat16": (0, 2),
    "sparse_wide_none-float32": (0, 15),
    "sparse_wide_none-float64": (0, 15),
    "sparse_ignore-float16": (1, 16),
    "sparse_ignore-bfloat16": (1, 16),
    "sparse_ignore-float32": (0, 16),
    "sparse_ignore-float64": (0, 16),
    "sparse_ignore_sum-float16": (0, 8),
    "sparse_ignore_sum-bfloat16": (0, 9),
    "sparse_ignore_sum-float32": (1, 9),
    "sparse_ignore_sum-float64": (1, 9),
    "sparse_257-float16": (1, 1),
    "sparse_257-bfloat16": (0, 12),
    "sparse_257-float32": (1, 10),
    "sparse_257-float64": (1, 10),
    "sparse_shifted-float16": (0, 4),
    "sparse_shifted-bfloat16": (1, 3),
    "sparse_shifted-float32": (1, 9),
    "sparse_shifted-float64": (1, 9),
    "sparse_vocabulary-float16": (1, 14),
    "sparse_vocabulary-bfloat16": (0, 15),
    "sparse_vocabulary-float32": (0, 14),
    "sparse_vocabulary-float64": (0, 14),
    "categorical-float16": (1, 419),
    "categorical-bfloat16": (1, 1476),
    "categorical-float32": (0, 1012),
    "categorical-float64": (0, 1012),
    "categorical_smoothing_none-float16": (2, 128),
    "categorical_smoothing_none-bfloat16": (2, 256),
    "categorical_smoothing_none-float32": (3, 176),
    "categorical_smoothing_none-float64": (3, 176),
    "categorical_sum-float16": (1, 35),
    "categorical_sum-bfloat16": (1, 11),
    "categorical_sum-float32": (0, 128),
    "categorical_sum-float64": (0, 128),
    "probabilities-bfloat16": (1, 0),
    "probabilities_sparse_none-bfloat16": (6, 0),
    "probabilities_sparse_none-float32": (9, 0),
    "probabilities_sparse_none-float64": (9, 0),
    "binary-float16": (1, 13),
    "binary-bfloat16": (1, 13),
    "binary-float32": (0, 13),
    "binary-float64": (0, 13),
    "binary_none-float16": (1, 1),
    "binary_none-bfloat16": (1, 1),
    "binary_none-float32": (4, 2),
    "binary_none-float64": (4, 2),
    "binary_sum-float16": (2, 64),
    "binary_sum-bfloat16": (0, 32),
    "binary_sum-float32": (1, 64),
    "binary_sum-float64": (1, 64),
}

# With torch's primitives every loss is Keras' bit for bit except these, by float32 ulps:
# label smoothing's one-hot rows (the smoothed targets' products summed by torch's cascade)
# and BCE-with-logits' elementwise ``log_sigmoid`` (PyTorch's vectorised kernel).
PRIMITIVE_RESIDUE: dict[str, int] = {
    "categorical_smoothing_none-float16": 1,
    "categorical_smoothing_none-bfloat16": 1,
    "categorical_smoothing_none-float32": 2,
    "categorical_smoothing_none-float64": 2,
    "binary_none-float16": 1,
    "binary_none-bfloat16": 1,
    "binary_none-float32": 1,
    "binary_none-float64": 1,
}


def _from_logits(entry: dict[str, Any]) -> bool:
    return bool(entry["loss"] != "probabilities")


def _compare(entry: dict[str, Any], result: dict[str, Any]) -> tuple[bool, int, bool, int]:
    case = make_case(entry, from_logits=_from_logits(entry))
    loss, grad = xentcheck_result(case, "keras", entry["dtype"])
    loss_equal, loss_ulps = matches(result["loss"], loss, "float32")
    if "gradient" not in result:
        assert grad is None  # no gradient of probability inputs is checked
        return loss_equal, loss_ulps, True, 0
    assert grad is not None
    grad_equal, grad_ulps = matches(result["gradient"], grad, "float32")
    return loss_equal, loss_ulps, grad_equal, grad_ulps


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_keras_pipeline_is_keras(entry: dict[str, Any]) -> None:
    loss_equal, loss_ulps, grad_equal, grad_ulps = _compare(entry, entry["keras"])
    expected = DIFFERENCES.get(entry["name"], (0, 0))
    assert (loss_ulps, grad_ulps) == expected
    if expected[0] == 0:
        assert loss_equal
    if expected[1] == 0:
        assert grad_equal


def test_the_fixture_covers_what_the_brief_asks() -> None:
    names = {entry["variant"] for entry in ENTRIES}
    assert len(ENTRIES) >= 40
    assert {entry["dtype"] for entry in ENTRIES} == {"float16", "bfloat16", "float32", "float64"}
    assert any(entry["shape"] == [257, 32000] for entry in ENTRIES)
    assert any(entry["shape"] == [1, 2] for entry in ENTRIES) or "sparse_narrow" in names
    assert FIXTURE.stat().st_size < 2_000_000


def test_keras_losses_are_float32_for_every_dtype() -> None:
    # float64 inputs are rounded to float32 before anything else: a loss whose float64 value
    # differs in the 30th bit comes out the same as float32's
    entry = next(e for e in ENTRIES if e["name"] == "sparse_narrow-float64")
    case = make_case(entry)
    loss64, _ = xentcheck_result(case, "keras", "float64")
    loss32, _ = xentcheck_result(case, "keras", "float32")
    assert loss64 == loss32
    assert np.float64(np.float32(loss64)) == loss64


# -- with keras installed ----------------------------------------------------------------------


def _keras() -> Any:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = require("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("keras was imported with another backend")
    return keras


def _recorder() -> Any:
    return recording_script("record_keras")


LIVE = [entry for entry in ENTRIES if entry["shape"] != [257, 32000]]


@pytest.mark.parametrize("entry", LIVE, ids=[entry["name"] for entry in LIVE])
def test_live_keras_is_the_keras_pipeline(entry: dict[str, Any]) -> None:
    _keras()
    torch = require("torch")
    torch.set_num_threads(1)
    with warnings.catch_warnings():  # torch's deprecated APIs, as keras uses them
        warnings.simplefilter("ignore", DeprecationWarning)
        live = _recorder().run_case(entry)
    if torch.backends.cpu.get_cpu_capability() == recorded()["cpu_capability"]:
        assert live == entry["keras"]  # the fixture is what this Keras computes
    _, loss_ulps, _, grad_ulps = _compare(entry, live)
    expected = DIFFERENCES.get(entry["name"], (0, 0))
    # another vector width sums in another order: a few float32 ulps either way
    assert loss_ulps <= expected[0] + 4
    assert grad_ulps <= 2 * expected[1] + 16


def _use_torchs_primitives(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = require("torch")
    elementwise = StageRunner._elementwise
    by_numpy = {np.exp: torch.exp, np.log: torch.log, np.log1p: torch.log1p}

    def patched(self: StageRunner, stage: str, fn: Any, *operands: Any, **kw: Any) -> Any:
        if fn in by_numpy:
            torch_fn = by_numpy[fn]

            def fn(x: np.ndarray) -> np.ndarray:
                return torch_fn(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        return elementwise(self, stage, fn, *operands, **kw)

    def accumulate(self: StageRunner, x: Any, *, axis: int = -1, keepdims: bool = False) -> Any:
        values = torch.from_numpy(np.ascontiguousarray(np.asarray(x)).astype(
            self.precision.accumulate_dtype))
        return torch.sum(values, dim=axis, keepdim=keepdims).numpy()

    monkeypatch.setattr(StageRunner, "_elementwise", patched)
    monkeypatch.setattr(StageRunner, "accumulate", accumulate)


@pytest.mark.parametrize("entry", LIVE, ids=[entry["name"] for entry in LIVE])
def test_with_torchs_primitives_the_losses_are_keras_bit_for_bit(
        entry: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    torch = require("torch")
    torch.set_num_threads(1)
    if torch.backends.cpu.get_cpu_capability() != recorded()["cpu_capability"]:
        pytest.skip("the fixture was recorded with another vector width")
    _use_torchs_primitives(monkeypatch)
    loss_equal, loss_ulps, _, _ = _compare(entry, entry["keras"])
    assert loss_ulps == PRIMITIVE_RESIDUE.get(entry["name"], 0)
    if entry["name"] not in PRIMITIVE_RESIDUE:
        assert loss_equal
