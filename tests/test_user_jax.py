"""The jax adapter against jax itself: a user's loss evaluated equation by equation gives what
jax gives calling it (losses, and jax.vjp's gradient, bit for bit), and the first primitive
that went bad is located at the line of the user's file that called it, forward and
backward."""

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
    require("jax")
    require("optax")
    return load("jax_losses")


def _call(losses: tuple[Any, Path], name: str, logits: np.ndarray, labels: np.ndarray,
          upstream: float | None = 1.0) -> Any:
    from xentcheck.user_functions.jax_adapter import JaxAdapter

    module, path = losses
    return JaxAdapter().call(getattr(module, name), logits, labels, user_file=path,
                             upstream=upstream)


def _random_case(dtype: Any, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((6, 11)) * 4).astype(dtype)
    return logits, rng.integers(0, 11, size=6)


def test_the_textbook_loss_overflows_at_its_exp_line(losses: tuple[Any, Path]) -> None:
    result = _call(losses, "textbook", ISSUE, np.array([0]))
    assert not np.isfinite(result.losses).any()
    first = result.events[0]
    assert (first.op, first.kind, first.index) == ("exp", "overflow", (0, 0))
    assert first.shape == (1, 3)  # exp's output: the logits' shape
    assert first.source == line_of(losses[1], "# overflows past ln(max)")
    assert (result.events[1].op, result.events[1].kind) == ("div", "nan")
    assert result.events[1].source == line_of(losses[1], "p = e / e.sum(")
    # backward: the division's transpose is the first to make NaN, at the division's line
    assert np.isnan(result.gradient).all()
    first_backward = result.gradient_events[0]
    assert first_backward.op.endswith(" (backward)") and first_backward.kind == "nan"
    assert first_backward.source == line_of(losses[1], "p = e / e.sum(")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_a_correct_loss_is_jax_bit_for_bit(losses: tuple[Any, Path], dtype: Any) -> None:
    jax = require("jax")
    optax = require("optax")
    logits, labels = _random_case(dtype)
    result = _call(losses, "library", logits, labels, upstream=0.25)
    with jax.enable_x64(dtype == np.float64):
        # jax itself, called as a user would call it (eager, not under jit)
        x = jax.numpy.asarray(logits)
        y = jax.numpy.asarray(labels.astype(np.int32))
        expected, pullback = jax.vjp(
            lambda a: optax.softmax_cross_entropy_with_integer_labels(a, y), x)
        (gradient,) = pullback(jax.numpy.full(expected.shape, 0.25, expected.dtype))
    assert expected.dtype == logits.dtype and gradient.dtype == logits.dtype
    assert result.events == [] and result.gradient_events == []
    np.testing.assert_array_equal(result.losses, np.asarray(expected).astype(np.float64))
    np.testing.assert_array_equal(result.gradient, np.asarray(gradient).astype(np.float64))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_a_correct_loss_is_within_rounding_of_the_reference(
        losses: tuple[Any, Path], dtype: Any) -> None:
    logits, labels = _random_case(dtype, seed=1)
    result = _call(losses, "stable_log_softmax", logits, labels, upstream=1.0)
    x = logits.astype(np.float64)
    ones = np.ones(len(labels))
    reference = softmax_index_losses(x, labels, ones)
    eps = float(ml_dtypes.finfo(dtype).eps)
    # jax's log_softmax computes every step in D: z = x - max is exact (Sterbenz, where it
    # matters), log(sum(exp(z))) is off by a few ulps of D, z - lse rounds once more
    z = x - x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=-1, keepdims=True))
    scale = np.abs(reference) + lse[:, 0] + 1
    assert np.all(np.abs(result.losses - reference) <= 2 * eps * scale)
    # the gradient exp(log_softmax) - onehot: p moved by about an ulp of |z| + lse, relative
    p = np.exp(z - lse)
    bound = eps * (p * (np.abs(z) + lse + 3) + 1)
    reference_gradient = softmax_index_gradients(x, labels, ones)
    assert np.all(np.abs(result.gradient - reference_gradient) <= bound)


def test_a_softmax_that_underflows_before_its_log(losses: tuple[Any, Path]) -> None:
    result = _call(losses, "log_of_softmax", ISSUE, np.array([0]))
    assert result.losses.tolist() == [np.inf]
    flush, pole = result.events[:2]
    # jax.nn.softmax's exp(x - max) is where the target's probability becomes 0
    assert (flush.op, flush.kind, flush.index) == ("exp", "underflow", (0, 0))
    assert flush.source == line_of(losses[1], "p = jax.nn.softmax(")
    assert (pole.op, pole.kind) == ("log", "log_of_zero")
    assert pole.source == line_of(losses[1], "# log of an exact 0")
    first = result.gradient_events[0]
    assert (first.op, first.kind) == ("div (backward)", "division_by_zero")
    assert first.source == pole.source


def test_a_harmless_flush_is_not_an_event(losses: tuple[Any, Path]) -> None:
    result = _call(losses, "log_of_softmax", ISSUE, np.array([2]))
    assert result.losses.tolist() == [0.0]
    assert result.events == []


def test_a_bad_backward_op_is_located_at_its_forward_line(losses: tuple[Any, Path]) -> None:
    logits = np.array([[0.0, -20.0, -20.0]], dtype=np.float32)
    result = _call(losses, "focal", logits, np.array([0]))
    assert np.isfinite(result.losses).all() and result.events == []
    assert np.isnan(result.gradient).all()
    # jax linearises: 0.5 * 0 ** -0.5 = inf is a residual of the forward; the backward's
    # first bad operation is the product with it, at the power's line
    first = result.gradient_events[0]
    assert (first.op, first.kind) == ("mul (backward)", "nan")
    assert first.source == line_of(losses[1], "weight = (1 - jnp.exp(logp)) ** 0.5")


def test_a_jit_inside_the_function_is_entered(losses: tuple[Any, Path]) -> None:
    result = _call(losses, "jitted", ISSUE, np.array([0]))
    assert (result.events[0].op, result.events[0].kind) == ("exp", "overflow")
    assert result.events[0].source == line_of(losses[1], "inside a jit")


def test_inputs_reach_the_function_exactly(losses: tuple[Any, Path]) -> None:
    jax = require("jax")
    from xentcheck.user_functions.jax_adapter import JaxAdapter

    seen: list[Any] = []

    def keep(logits: Any, labels: Any) -> Any:
        jax.debug.callback(lambda a, b: seen.append((np.asarray(a), np.asarray(b))),
                           logits, labels)
        return logits.sum(-1)

    values = np.array([[1.0, 3.140625, -2.5e-38, 6e4]])
    for dtype in [*DTYPES, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]:
        given = values.astype(dtype)
        seen.clear()
        JaxAdapter().call(keep, given, np.array([3]), user_file=losses[1], upstream=None)
        logits, labels = seen[0]
        assert logits.dtype == given.dtype and labels.dtype == np.int32
        np.testing.assert_array_equal(logits.view(np.uint8), given.view(np.uint8))
    assert not jax.config.jax_enable_x64  # float64's x64 was set for its call only


def test_without_upstream_there_is_no_gradient(losses: tuple[Any, Path]) -> None:
    result = _call(losses, "library", ISSUE, np.array([0]), upstream=None)
    assert result.gradient is None and result.gradient_events == []


def test_a_scalar_loss_gets_the_upstream_as_is(losses: tuple[Any, Path]) -> None:
    logits, labels = _random_case(np.float64, seed=2)
    result = _call(losses, "mean", logits, labels, upstream=1.0)
    assert result.losses.shape == ()
    ones = np.ones(len(labels))
    expected = softmax_index_gradients(logits, labels, ones) / len(labels)
    np.testing.assert_allclose(result.gradient, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize(("name", "message"), [
    ("raises", r"^the function raised TypeError: cannot reshape .* at .*"),
    ("python_branch", r"^the function raised TracerBoolConversionError: .* at .*"),
    ("returns_float", r"^returned a builtins.float, not a jax array$"),
    ("returns_integers", r"^returned an array of int64; losses must be floating$"),
    ("returns_wrong_shape", r"^returned shape \(3, 2\); expected the logits' leading shape "
                            r"\(2,\) \(one loss per example\), their shape \(2, 3\) \(one per "
                            r"element\) or a scalar$"),
])
def test_a_function_that_misbehaves_is_one_line(losses: tuple[Any, Path], name: str,
                                                message: str) -> None:
    jax = require("jax")
    logits = np.zeros((2, 3), dtype=np.float64)  # x64 on for the call: it must be restored
    with pytest.raises(InputError, match=message) as info:
        _call(losses, name, logits, np.array([0, 1]))
    assert "\n" not in str(info.value)
    if name == "raises":
        assert str(info.value).endswith(line_of(losses[1], "# TypeError"))
    if name == "python_branch":
        assert str(info.value).endswith(line_of(losses[1], "# not traceable"))
    assert not jax.config.jax_enable_x64


def test_a_value_of_another_framework_is_refused(losses: tuple[Any, Path]) -> None:
    torch = require("torch")
    from xentcheck.user_functions.jax_adapter import JaxAdapter

    def torch_loss(logits: Any, labels: Any) -> Any:
        return torch.zeros(1)

    with pytest.raises(InputError, match=r"^returned a torch.Tensor, not a jax array$"):
        JaxAdapter().call(torch_loss, ISSUE, np.array([0]), user_file=losses[1],
                          upstream=None)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_a_sigmoid_loss_gets_float_targets_in_d(losses: tuple[Any, Path], dtype: Any) -> None:
    jax = require("jax")
    optax = require("optax")
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((4, 5)) * 6).astype(dtype)
    targets = rng.random((4, 5)).astype(dtype)
    result = _call(losses, "binary", logits, targets, upstream=1.0)
    with jax.enable_x64(dtype == np.float64):
        t = jax.numpy.asarray(targets)
        expected, pullback = jax.vjp(lambda a: optax.sigmoid_binary_cross_entropy(a, t),
                                     jax.numpy.asarray(logits))
        (gradient,) = pullback(jax.numpy.ones_like(expected))
    assert result.losses.shape == logits.shape and expected.dtype == logits.dtype
    np.testing.assert_array_equal(result.losses, np.asarray(expected).astype(np.float64))
    np.testing.assert_array_equal(result.gradient, np.asarray(gradient).astype(np.float64))


def test_a_loop_runs_whole_and_is_named_at_its_line(losses: tuple[Any, Path]) -> None:
    jax = require("jax")
    result = _call(losses, "chunked", ISSUE, np.array([0]))
    first = result.events[0]
    assert (first.op, first.kind) == ("scan", "overflow")
    assert first.source == line_of(losses[1], "# scan")
    module = losses[0]
    direct = module.chunked(jax.numpy.asarray(ISSUE), jax.numpy.asarray([0]))
    np.testing.assert_array_equal(result.losses, np.asarray(direct).astype(np.float64))
