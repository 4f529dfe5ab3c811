"""The loss options (temperature, soft-cap, z-loss) on the ``torch`` pipeline against PyTorch.

``fixtures/torch_options.json`` holds what PyTorch (CPU, one thread) computes for
``F.cross_entropy(cap * tanh((x / T) / cap), t) + coef * logsumexp(...) ** 2`` and its
gradient (``fixtures/record_torch_options.py`` shows the code and regenerates the file);
the live test reruns that script against the installed torch. In float16 and bfloat16
xentcheck's ``torch`` pipeline with the options is equal to it bit for bit, loss and every
gradient entry. In float32 and float64 the distances below are torch's SLEEF ``exp``,
``log`` and ``tanh`` against numpy's (within an ulp or so of the compute dtype), as
``tests/test_torch_gradients.py`` measures for the textbook pipelines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from frameworks import recording_script, require
from torch_fixture import bits, from_hex, ulp_distance

from xentcheck.case_validation import make_case
from xentcheck.execution import run_with_gradient
from xentcheck.pipelines import select
from xentcheck.precision import Precision

FIXTURE = Path(__file__).parent / "fixtures" / "torch_options.json"
RECORDED: dict[str, Any] = json.loads(FIXTURE.read_text(encoding="utf-8"))
ENTRIES = [(entry, dtype) for entry in RECORDED["cases"] for dtype in entry["torch"]]
IDS = [f"{entry['name']}-{dtype}" for entry, dtype in ENTRIES]

# (case, dtype): the largest distance, in units of D's spacing, of xentcheck's loss and of
# its gradient entries from torch's, as measured; float16/bfloat16 are bit for bit.
# The large gradient distances are entries that are small differences of nearly equal
# terms: ``p_t - 1`` for a target near probability 1 (temperature, row [0, -40] / 3: the
# entry is -1.8e-7 and a one-ulp difference in float32 ``exp`` of the log-softmax moves it
# by 3e-9), and tiny ``p_j (1 - t_j^2)`` products whose factors each carry an ulp.
PRIMITIVE_DIFFERENCES: dict[tuple[str, str], tuple[float, float]] = {
    ("zloss_issue", "float32"): (0, 1),
    ("softcap_large", "float32"): (1, 76),
    ("softcap_large", "float64"): (0, 42),
    ("temperature", "float32"): (0, 233016),
    ("all_three", "float32"): (2, 526),
    ("all_three", "float64"): (0, 2450),
    ("all_three_ignore_sum", "float32"): (0, 14),
    ("softcap_smoothing_weights", "float32"): (0, 517),
    ("softcap_smoothing_weights", "float64"): (0, 257),
}


def xentcheck_torch(entry: dict[str, Any], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    spec = dict(entry["spec"])
    case = make_case(name=entry["name"], logits=np.array(entry["logits"]),
                     labels=np.array(entry["labels"]), **spec, **entry["options"])
    pipeline = select("softmax", True, ["torch"])[0]
    loss, _, gradient = run_with_gradient(pipeline, Precision(dtype), case)
    assert gradient is not None
    return np.asarray(loss, dtype=np.float64), gradient


def _compare(entry: dict[str, Any], dtype: str, torch: dict[str, Any]) -> None:
    loss, gradient = xentcheck_torch(entry, dtype)
    expected_loss, expected_gradient = from_hex(torch["loss"]), from_hex(torch["gradient"])
    allowed = PRIMITIVE_DIFFERENCES.get((entry["name"], dtype), (0.0, 0.0))
    if dtype in ("float16", "bfloat16") or allowed == (0, 0):
        np.testing.assert_array_equal(bits(loss), bits(expected_loss))
        np.testing.assert_array_equal(bits(gradient), bits(expected_gradient))
        return
    assert ulp_distance(loss, expected_loss, dtype) == allowed[0]
    assert ulp_distance(gradient, expected_gradient, dtype) == allowed[1]


@pytest.mark.parametrize(("entry", "dtype"), ENTRIES, ids=IDS)
def test_recorded_torch_with_options(entry: dict[str, Any], dtype: str) -> None:
    _compare(entry, dtype, entry["torch"][dtype])


@pytest.mark.parametrize(("entry", "dtype"), ENTRIES, ids=IDS)
def test_live_torch_with_options(entry: dict[str, Any], dtype: str) -> None:
    require("torch")
    script = recording_script("record_torch_options")
    live = script.torch_result(entry["logits"], entry["labels"], entry["options"],
                               entry["spec"], dtype)
    _compare(entry, dtype, live)
