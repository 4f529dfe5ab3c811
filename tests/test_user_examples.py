"""The torch and jax losses of ``examples/``: each does what its docstring says, through the
adapters (where each one breaks, at which line, and the edges the docstrings give)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from frameworks import require
from user_loss_fixture import line_of, load_file

from xentcheck.reference import softmax_index_gradients, softmax_index_losses

EXAMPLES = Path(__file__).parent.parent / "examples"
ISSUE = np.array([[1000.0, 2000.0, 2500.0]])
FRAMEWORKS = {"torch": "TorchAdapter", "jax": "JaxAdapter"}


def _adapter(framework: str) -> Any:
    require(framework)
    module = __import__(f"xentcheck.user_functions.{framework}_adapter",
                        fromlist=[FRAMEWORKS[framework]])
    return getattr(module, FRAMEWORKS[framework])()


def _run(framework: str, example: str, logits: np.ndarray, labels: np.ndarray,
         upstream: float | None = 1.0) -> tuple[Any, Path]:
    adapter = _adapter(framework)
    path = EXAMPLES / f"{framework}_{example}.py"
    module = load_file(path)
    return adapter.call(module.loss, logits, labels, user_file=path, upstream=upstream), path


@pytest.mark.parametrize(("framework", "exp_op", "exp_call"),
                         [("torch", "aten::exp", "torch.exp("), ("jax", "exp", "jnp.exp(")])
def test_the_textbook_losses_are_nan_at_their_exp_line(framework: str, exp_op: str,
                                                       exp_call: str) -> None:
    result, path = _run(framework, "textbook", ISSUE.astype(np.float32), np.array([1]))
    assert np.isnan(result.losses).all()
    first = result.events[0]
    assert (first.op, first.kind) == (exp_op, "overflow")
    assert first.source == line_of(path, exp_call)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_the_stable_losses_are_exact_on_the_issue_case(framework: str, dtype: Any) -> None:
    result, _ = _run(framework, "stable", ISSUE.astype(dtype), np.array([1]))
    ones = np.ones(1)
    # the inputs are exact in these dtypes, the loss 500 and the gradient [0, -1, 1] too
    np.testing.assert_array_equal(result.losses, softmax_index_losses(ISSUE, np.array([1]),
                                                                      ones))
    np.testing.assert_array_equal(result.gradient,
                                  softmax_index_gradients(ISSUE, np.array([1]), ones))
    assert result.events == [] and result.gradient_events == []


def _edge(framework: str, dtype: Any) -> float:
    """The smallest spread (largest logit minus the target's) at which the subtle loss is
    no longer finite, to within the dtype's spacing, by bisection over the real function."""
    below, above = 0.0, 200.0
    while above - below > 1e-9 * above:
        middle = (below + above) / 2
        logits = np.array([[0.0, middle]]).astype(dtype)
        result, _ = _run(framework, "subtle", logits, np.array([0]), upstream=None)
        below, above = (middle, above) if np.isfinite(result.losses).all() else (below,
                                                                                  middle)
    return above


@pytest.mark.parametrize(("framework", "exponent"), [("torch", 150), ("jax", 126)])
def test_the_subtle_losses_edges_are_the_docstrings(framework: str, exponent: int) -> None:
    # exp(-s) rounds to 0 below half the smallest subnormal, 2**-150 (torch); XLA flushes
    # subnormal results, so below the smallest normal number, 2**-126 (jax)
    edge = _edge(framework, np.float32)
    assert edge == pytest.approx(exponent * math.log(2), abs=2e-5)  # float32's spacing at 100
    assert f"{exponent} ln 2 = {exponent * math.log(2):.2f}" in (
        EXAMPLES / f"{framework}_subtle.py").read_text()


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_subtle_losses_name_the_softmax_line(framework: str) -> None:
    logits = np.array([[0.0, 120.0]], dtype=np.float32)
    result, path = _run(framework, "subtle", logits, np.array([0]))
    flush, pole = result.events[:2]
    assert flush.kind == "underflow" and flush.source == line_of(path, "softmax(logits")
    assert pole.kind == "log_of_zero" and pole.source == line_of(path, "log(")
    # the stable loss has no such edge: 120, exactly
    stable, _ = _run(framework, "stable", logits, np.array([0]))
    assert stable.losses.tolist() == [120.0]


def test_float16_edge_of_the_subtle_torch_loss() -> None:
    # torch rounds the float32 probability to float16, which is 0 below 2**-25, half the
    # smallest subnormal: the edge is 25 ln 2 = 17.33, moved to the float16 grid (spacing
    # 1/64 at 17) on which the logits lie
    edge = _edge("torch", np.float16)
    grid = np.float16(25 * math.log(2))
    assert float(grid) <= 25 * math.log(2) < edge <= float(np.nextafter(grid, np.float16(99)))
    assert "17.34 in float16" in (EXAMPLES / "torch_subtle.py").read_text()


def test_jax_functions_are_evaluated_as_eager_jax_not_as_jit() -> None:
    # the adapter's values are jax's without jax.jit, bit for bit; under jax.jit XLA fuses
    # the bfloat16 steps (float32 in between) and some losses differ (docs/user-functions.md)
    jax = require("jax")
    ml_dtypes = require("ml_dtypes")
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((200, 50)) * 8).astype(ml_dtypes.bfloat16)
    labels = rng.integers(0, 50, 200)
    result, path = _run("jax", "stable", logits, labels, upstream=None)
    module = load_file(path)
    x, y = jax.numpy.asarray(logits), jax.numpy.asarray(labels.astype(np.int32))
    eager = np.asarray(module.loss(x, y)).astype(np.float64)
    jitted = np.asarray(jax.jit(module.loss)(x, y)).astype(np.float64)
    np.testing.assert_array_equal(result.losses, eager)
    assert (result.losses != jitted).any()


def test_the_jax_textbook_loss_flushes_its_division_before_exp_overflows() -> None:
    # three equal logits of 86.5: the sum 1.1e38 is finite, but XLA divides through its
    # reciprocal, 9e-39, subnormal, flushed: every probability is 0 (torch's is 1/3)
    logits = np.full((1, 3), 86.5, dtype=np.float32)
    result, path = _run("jax", "textbook", logits, np.array([0]), upstream=None)
    assert result.losses.tolist() == [np.inf]
    flush, pole = result.events[:2]
    assert (flush.op, flush.kind) == ("div", "underflow")
    assert flush.source == line_of(path, "p = e / e.sum(")
    assert (pole.op, pole.kind) == ("log", "log_of_zero")
    torch_result, _ = _run("torch", "textbook", logits, np.array([0]), upstream=None)
    assert torch_result.losses.tolist() == [pytest.approx(math.log(3))]
    assert torch_result.events == []
