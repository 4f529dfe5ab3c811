"""The rules by which every adapter (numpy, torch, jax) judges one operation (``OpWatcher``),
on numpy arrays: what counts as created trouble, where, and when a flush to zero is reported."""

from __future__ import annotations

from typing import Any

import numpy as np

from xentcheck.user_functions.watch import Flush, OpWatcher, base_name

INF, NAN = np.inf, np.nan


def _here() -> str:
    return "loss.py:1"


def _inspect(watcher: OpWatcher, op: str, operands: list[Any], out: np.ndarray,
             taints: list[Flush | None] | None = None) -> Flush | None:
    taints = taints if taints is not None else [None] * len(operands)
    return watcher.inspect(op, operands, [out], taints, _here)


def test_op_names() -> None:
    assert base_name("aten::exp_") == "exp"
    assert base_name("aten::div (DivBackward0)") == "div"
    assert base_name("aten::_softmax") == "_softmax"
    assert base_name("log (backward)") == "log"


def test_an_infinite_output_of_finite_operands_is_an_overflow_where_it_happened() -> None:
    watcher = OpWatcher()
    x = np.array([[1.0, 100.0], [2.0, 3.0]], dtype=np.float32)
    with np.errstate(over="ignore"):
        _inspect(watcher, "exp", [x], np.exp(x))
    (event,) = watcher.events
    assert (event.op, event.kind, event.index, event.source, event.shape) == (
        "exp", "overflow", (0, 1), "loss.py:1", (2, 2))


def test_an_infinite_operand_explains_an_infinite_output() -> None:
    watcher = OpWatcher()
    a = np.array([INF, 1.0])
    _inspect(watcher, "add", [a, np.array([1.0])], a + 1.0)  # broadcast: position by position
    assert watcher.events == []
    # but not at another position: a new inf next to an old one is still new
    b = np.array([INF, 3e38], dtype=np.float32)
    with np.errstate(over="ignore"):
        _inspect(watcher, "mul", [b, np.float32(2)], b * np.float32(2))
    assert [(e.kind, e.index) for e in watcher.events] == [("overflow", (1,))]


def test_a_reduction_is_judged_as_a_whole() -> None:
    watcher = OpWatcher()
    rows = np.array([[INF, 1.0], [3e38, 3e38]], dtype=np.float32)
    with np.errstate(over="ignore"):
        _inspect(watcher, "sum", [rows], rows.sum(axis=-1))
    assert watcher.events == []  # an operand held an inf: no output is new trouble
    clean = np.array([[1.0, 1.0], [3e38, 3e38]], dtype=np.float32)
    with np.errstate(over="ignore"):
        _inspect(watcher, "sum", [clean], clean.sum(axis=-1))
    assert [(e.kind, e.index) for e in watcher.events] == [("overflow", (1,))]


def test_nan_from_non_nan_operands() -> None:
    watcher = OpWatcher()
    a = np.array([INF, 1.0])
    with np.errstate(invalid="ignore"):
        _inspect(watcher, "div", [a, a], a / a)
    assert [(e.kind, e.index) for e in watcher.events] == [("nan", (0,))]
    watcher = OpWatcher()
    _inspect(watcher, "add", [np.array([NAN, 1.0]), np.array([1.0])], np.array([NAN, 2.0]))
    assert watcher.events == []


def test_poles_take_precedence_over_overflow_and_nan() -> None:
    watcher = OpWatcher()
    p = np.array([0.5, 0.0])
    with np.errstate(divide="ignore"):
        _inspect(watcher, "log", [p], np.log(p))
        _inspect(watcher, "div", [np.array([1.0, 0.0]), p], np.array([2.0, NAN]))
        _inspect(watcher, "reciprocal", [p], 1 / p)
    assert [(e.op, e.kind, e.index) for e in watcher.events] == [
        ("log", "log_of_zero", (1,)), ("div", "division_by_zero", (1,)),
        ("reciprocal", "division_by_zero", (1,))]


def test_a_flush_is_reported_only_when_a_pole_meets_its_zero() -> None:
    watcher = OpWatcher()
    z = np.array([0.0, -200.0], dtype=np.float32)
    with np.errstate(under="ignore"):
        flush = _inspect(watcher, "exp", [z], np.exp(z))  # exp(-200) = 0 in float32
    assert flush is not None and watcher.events == []  # harmless so far
    # an index carries the zero on (an index has no operand of the output's shape)
    picked = _inspect(watcher, "gather", [np.exp(z).astype(np.float32)],
                      np.array([0.0], dtype=np.float32), [flush])
    assert picked is flush and watcher.events == []
    with np.errstate(divide="ignore"):
        _inspect(watcher, "log", [np.array([0.0])], np.array([-INF]), [picked])
    assert [(e.op, e.kind, e.index) for e in watcher.events] == [
        ("exp", "underflow", (1,)), ("log", "log_of_zero", (0,))]


def test_exact_zeros_are_not_flushes() -> None:
    watcher = OpWatcher()
    # 0 * x, x - x and exp(-inf) (a masked logit) are exact zeros
    assert _inspect(watcher, "mul", [np.array([0.0]), np.array([5.0])], np.array([0.0])) is None
    assert _inspect(watcher, "sub", [np.array([5.0]), np.array([5.0])], np.array([0.0])) is None
    assert _inspect(watcher, "exp", [np.array([-INF])], np.array([0.0])) is None
    # but a product of non-zero finite numbers that is 0 is
    tiny = np.array([1e-30], dtype=np.float32)
    with np.errstate(under="ignore"):
        assert _inspect(watcher, "mul", [tiny, tiny], tiny * tiny) is not None


def test_one_event_per_op_kind_and_line_in_execution_order() -> None:
    watcher = OpWatcher()
    x = np.array([1000.0])
    with np.errstate(over="ignore"):
        for _ in range(3):
            _inspect(watcher, "exp", [x], np.exp(x))
    assert len(watcher.events) == 1


def test_a_flush_of_another_pass_is_not_reported_in_this_one() -> None:
    forward, backward = OpWatcher(), OpWatcher()
    with np.errstate(under="ignore"):
        flush = _inspect(forward, "exp", [np.array([-800.0])], np.exp(np.array([-800.0])))
    with np.errstate(divide="ignore"):
        _inspect(backward, "div", [np.array([1.0]), np.array([0.0])], np.array([INF]), [None,
                                                                                   flush])
    assert [e.kind for e in backward.events] == ["division_by_zero"]
    assert forward.events == []


def test_log1p_has_its_pole_at_minus_one_and_a_zero_base_power_overflows() -> None:
    """log1p(-1) = log(0), in every adapter's names (numpy's ufuncs, aten's, jax's
    primitives); 0 ** -1 is named an overflow in every adapter (torch's and jax's tests)."""
    for op in ("log1p", "aten::log1p"):
        watcher = OpWatcher()
        x = np.array([0.5, -1.0, -1.0])
        with np.errstate(divide="ignore"):
            _inspect(watcher, op, [x], np.log1p(x))
        (event,) = watcher.events
        assert (event.kind, event.index) == ("log_of_zero", (1,))
    for op in ("power", "pow", "aten::pow"):
        watcher = OpWatcher()
        base, exponent = np.array([2.0, 0.0]), np.array([-1.0, -1.0])
        with np.errstate(divide="ignore"):
            _inspect(watcher, op, [base, exponent], np.power(base, exponent))
        (event,) = watcher.events
        assert (event.kind, event.index) == ("overflow", (1,))
    watcher = OpWatcher()
    a, b = np.array([1.0, 1.0]), np.array([2.0, 0.0])
    with np.errstate(invalid="ignore"):
        _inspect(watcher, "remainder", [a, b], np.remainder(a, b))
    (event,) = watcher.events
    assert (event.kind, event.index) == ("division_by_zero", (1,))


def test_a_projection_judges_a_reduction_position_by_position() -> None:
    """numpy's ``sum(axis=-1)``: a row whose operands were finite and whose sum overflowed is
    an overflow even when another row already held an inf (the whole-operation rule would
    miss it)."""
    x = np.array([[INF, 1.0], [3e38, 3e38]], dtype=np.float32)
    with np.errstate(over="ignore"):
        out = x.sum(axis=-1)
    assert np.isinf(out).all()

    def project(flags: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return np.broadcast_to(np.logical_or.reduce(flags, axis=-1), shape)

    watcher = OpWatcher()
    watcher.inspect("sum", [x], [out], [None], _here, project)
    (event,) = watcher.events
    assert (event.kind, event.index) == ("overflow", (1,))
    whole = OpWatcher()
    _inspect(whole, "sum", [x], out)
    assert whole.events == []
