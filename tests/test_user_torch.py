"""The torch adapter against torch itself: a user's loss run through it gives what torch gives
(losses and autograd's gradient, bit for bit), and the first operation that went bad is the
one at the line of the user's file that called it, forward and backward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from frameworks import require
from user_loss_fixture import line_of, load

from xentcheck.errors import InputError
from xentcheck.reference import softmax_index_gradients, softmax_index_losses

ISSUE = np.array([[1000.0, 2000.0, 2500.0]], dtype=np.float32)
DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]


@pytest.fixture(scope="module")
def losses() -> tuple[Any, Path]:
    require("torch")
    return load("torch_losses")


def _call(losses: tuple[Any, Path], name: str, logits: np.ndarray, labels: np.ndarray,
          upstream: float | None = 1.0) -> Any:
    from xentcheck.user_functions.torch_adapter import TorchAdapter

    module, path = losses
    return TorchAdapter().call(getattr(module, name), logits, labels, user_file=path,
                               upstream=upstream)


def _tensor(torch: Any, values: np.ndarray) -> Any:
    # independent of the adapter's conversion: through float64, which holds every D exactly
    dtype = {"bfloat16": torch.bfloat16}.get(values.dtype.name,
                                            getattr(torch, values.dtype.name, None))
    return torch.tensor(values.astype(np.float64)).to(dtype)


def _random_case(dtype: Any, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((6, 11)) * 4).astype(dtype)
    return logits, rng.integers(0, 11, size=6)


def test_the_textbook_loss_overflows_at_its_exp_line(losses: tuple[Any, Path]) -> None:
    result = _call(losses, "textbook", ISSUE, np.array([0]))
    assert not np.isfinite(result.losses).any()
    first = result.events[0]
    assert (first.op, first.kind, first.index) == ("aten::exp", "overflow", (0, 0))
    assert first.shape == (1, 3)  # exp's output: the logits' shape
    assert first.source == line_of(losses[1], "e = torch.exp(logits)")
    # then inf / inf: the division's NaN, at its own line
    assert (result.events[1].op, result.events[1].kind) == ("aten::div", "nan")
    assert result.events[1].source == line_of(losses[1], "p = e / e.sum(")
    # the backward pass: the division's backward is the first to make NaN from finite values
    assert np.isnan(result.gradient).all()
    assert result.gradient_events[0].op == "aten::div (DivBackward0)"
    assert result.gradient_events[0].source == line_of(losses[1], "p = e / e.sum(")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_a_correct_loss_is_torch_bit_for_bit(losses: tuple[Any, Path], dtype: Any) -> None:
    torch = require("torch")
    logits, labels = _random_case(dtype)
    result = _call(losses, "library", logits, labels, upstream=0.25)
    x = _tensor(torch, logits).requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(x, torch.tensor(labels), reduction="none")
    (gradient,) = torch.autograd.grad(expected, x, torch.full_like(expected, 0.25))
    assert result.events == [] and result.gradient_events == []
    np.testing.assert_array_equal(result.losses, expected.detach().double().numpy())
    np.testing.assert_array_equal(result.gradient, gradient.double().numpy())
    assert result.losses.dtype == np.float64 and result.gradient.shape == logits.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_a_correct_loss_is_within_rounding_of_the_reference(
        losses: tuple[Any, Path], dtype: Any) -> None:
    logits, labels = _random_case(dtype, seed=1)
    result = _call(losses, "stable_log_softmax", logits, labels, upstream=1.0)
    x = logits.astype(np.float64)
    ones = np.ones(len(labels))
    reference = softmax_index_losses(x, labels, ones)
    reference_gradient = softmax_index_gradients(x, labels, ones)
    eps = float(ml_dtypes.finfo(dtype).eps)
    # log_softmax rounds each output to D once (torch computes narrow formats in float32):
    # half an ulp of |loss| plus an ulp of the max and the log-sum-exp it subtracted
    scale = np.abs(x).max(axis=-1) + np.abs(reference)
    assert np.all(np.abs(result.losses - reference) <= 2 * eps * scale)
    # the gradient, exp(log_softmax in D) - onehot: log_softmax's entry z - lse (z = x - max)
    # is off by about an ulp of |z| + lse, which moves p by that much relative; then one
    # rounding to D. Entry by entry:
    z = x - x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=-1, keepdims=True))
    p = np.exp(z - lse)
    bound = eps * (p * (np.abs(z) + lse + 2) + 1)
    assert np.all(np.abs(result.gradient - reference_gradient) <= bound)


def test_a_softmax_that_underflows_before_its_log(losses: tuple[Any, Path]) -> None:
    result = _call(losses, "log_of_softmax", ISSUE, np.array([0]))
    assert result.losses.tolist() == [np.inf]
    flush, pole = result.events[:2]
    assert (flush.op, flush.kind, flush.index) == ("aten::_softmax", "underflow", (0, 0))
    assert flush.source == line_of(losses[1], "p = torch.softmax(")
    assert (pole.op, pole.kind) == ("aten::log", "log_of_zero")
    assert pole.source == line_of(losses[1], "# log of an exact 0")
    # the backward of log divides by the zero: located at the log's line
    first = result.gradient_events[0]
    assert (first.op, first.kind) == ("aten::div (LogBackward0)", "division_by_zero")
    assert first.source == pole.source


def test_a_harmless_flush_is_not_an_event(losses: tuple[Any, Path]) -> None:
    # the other classes' probabilities flush to 0; the target's log is finite
    result = _call(losses, "log_of_softmax", ISSUE, np.array([2]))
    assert result.losses.tolist() == [0.0]
    assert result.events == []


def test_a_bad_backward_op_is_named_at_its_forward_line(losses: tuple[Any, Path]) -> None:
    logits = np.array([[0.0, -20.0, -20.0]], dtype=np.float32)
    result = _call(losses, "focal", logits, np.array([0]))
    assert np.isfinite(result.losses).all() and result.events == []
    assert np.isnan(result.gradient).all()
    first = result.gradient_events[0]
    assert (first.op, first.kind) == ("aten::pow (PowBackward0)", "overflow")
    assert first.source == line_of(losses[1], "weight = (1 - logp.exp()) ** 0.5")


def test_an_in_place_op_is_judged_against_its_operand_before(
        losses: tuple[Any, Path]) -> None:
    result = _call(losses, "in_place", ISSUE, np.array([0]))
    first = result.events[0]
    assert (first.op, first.kind) == ("aten::exp_", "overflow")
    assert first.source == line_of(losses[1], "e.exp_()")


def test_inputs_reach_the_function_exactly(losses: tuple[Any, Path]) -> None:
    torch = require("torch")
    from xentcheck.user_functions.torch_adapter import to_numpy, to_tensor

    seen: list[Any] = []
    values = np.array([[1.0, 3.140625, -2.5e-38, 6e4]], dtype=np.float64)
    for dtype in [*DTYPES, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]:
        given = values.astype(dtype)
        tensor = to_tensor(torch, given)
        assert str(tensor.dtype) == f"torch.{np.dtype(dtype).name}"
        back = to_numpy(torch, tensor)
        assert back.dtype == given.dtype
        np.testing.assert_array_equal(back.view(np.uint8), given.view(np.uint8))

    def keep(logits: Any, labels: Any) -> Any:
        seen.append((logits, labels))
        return logits.sum(-1)

    bf16 = values.astype(ml_dtypes.bfloat16)
    from xentcheck.user_functions.torch_adapter import TorchAdapter

    TorchAdapter().call(keep, bf16, np.array([0]), user_file=losses[1], upstream=None)
    logits, labels = seen[0]
    assert logits.dtype == torch.bfloat16 and labels.dtype == torch.int64
    assert logits.double().tolist() == bf16.astype(np.float64).tolist()


def test_without_upstream_there_is_no_gradient(losses: tuple[Any, Path]) -> None:
    torch = require("torch")
    result = _call(losses, "library", ISSUE, np.array([0]), upstream=None)
    assert result.gradient is None and result.gradient_events == []
    assert not torch.is_anomaly_enabled()


def test_a_scalar_loss_gets_the_upstream_as_is(losses: tuple[Any, Path]) -> None:
    logits, labels = _random_case(np.float64, seed=2)
    result = _call(losses, "mean", logits, labels, upstream=1.0)
    assert result.losses.shape == ()
    ones = np.ones(len(labels))
    expected = softmax_index_gradients(logits, labels, ones) / len(labels)
    np.testing.assert_allclose(result.gradient, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize(("name", "message"), [
    ("raises", r"the function raised IndexError: index 7 is out of bounds .* at .*"),
    ("returns_numpy", r"^returned a numpy.ndarray, not a torch tensor$"),
    ("returns_integers", r"^returned a tensor of torch.int64; losses must be floating$"),
    ("returns_wrong_shape", r"^returned shape \(3, 2\); expected the logits' leading shape "
                            r"\(2,\) \(one loss per example\), their shape \(2, 3\) \(one per "
                            r"element\) or a scalar$"),
    ("detached", r"^returned losses that do not depend on the logits through autograd"),
])
def test_a_function_that_misbehaves_is_one_line(losses: tuple[Any, Path], name: str,
                                                message: str) -> None:
    torch = require("torch")
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    logits = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(InputError, match=message) as info:
        _call(losses, name, logits, np.array([0, 1]))
    assert "\n" not in str(info.value)
    if name == "raises":
        assert str(info.value).endswith(line_of(losses[1], "# IndexError"))
    # whatever happened, the global state is as it was
    assert not torch.is_anomaly_enabled()
    assert _get_current_dispatch_mode_stack() == []


def test_a_value_of_another_framework_is_refused(losses: tuple[Any, Path]) -> None:
    jnp = require("jax.numpy")
    from xentcheck.user_functions.torch_adapter import TorchAdapter

    def jax_loss(logits: Any, labels: Any) -> Any:
        return jnp.asarray(logits.detach().numpy()).sum(-1)

    with pytest.raises(InputError, match=r"^returned a jax.*, not a torch tensor$"):
        TorchAdapter().call(jax_loss, ISSUE, np.array([0]), user_file=losses[1],
                            upstream=None)


def test_an_enabled_anomaly_mode_is_left_enabled(losses: tuple[Any, Path]) -> None:
    torch = require("torch")
    torch.autograd.set_detect_anomaly(True, check_nan=True)
    try:
        _call(losses, "library", ISSUE, np.array([0]))
        assert torch.is_anomaly_enabled() and torch.is_anomaly_check_nan_enabled()
    finally:
        torch.autograd.set_detect_anomaly(False)


def test_float8_ops_torch_lacks_are_one_line(losses: tuple[Any, Path]) -> None:
    logits = np.array([[1.0, 2.0, 3.0]]).astype(ml_dtypes.float8_e4m3fn)
    with pytest.raises(InputError, match=r"the function raised NotImplementedError: .*exp"):
        _call(losses, "textbook", logits, np.array([0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_a_sigmoid_loss_gets_float_targets_in_d(losses: tuple[Any, Path], dtype: Any) -> None:
    torch = require("torch")
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((4, 5)) * 6).astype(dtype)
    targets = rng.random((4, 5)).astype(dtype)
    result = _call(losses, "binary", logits, targets, upstream=1.0)
    x = _tensor(torch, logits).requires_grad_(True)
    t = _tensor(torch, targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    (gradient,) = torch.autograd.grad(expected, x, torch.ones_like(expected))
    assert result.losses.shape == logits.shape  # one loss per element
    np.testing.assert_array_equal(result.losses, expected.detach().double().numpy())
    np.testing.assert_array_equal(result.gradient, gradient.double().numpy())
