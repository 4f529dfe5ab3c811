"""Running a numpy loss function: every ufunc it calls, watched, located in its source.

Two nets, the first doing almost all the work:

1. The inputs are handed over as a subclass of ``np.ndarray`` whose ``__array_ufunc__``
   sees every ufunc call made on them and on what is computed from them (``np.exp(x)``,
   ``x - m``, ``e.sum(-1)``, which is ``np.add.reduce``; scipy's functions too, where they
   keep the array type), with its operands and outputs, as PyTorch's dispatch modes see
   every aten op. Each call is judged by the rules every adapter shares
   (:class:`~.watch.OpWatcher`: ``overflow``, ``nan``, ``log_of_zero``, ``division_by_zero``
   and the ``underflow`` that later meets a pole, its flush carried on each ``Watched``
   array and its views as the torch adapter carries it per tensor). The op is the ufunc
   (``exp``, ``divide``; a reduction by its numpy name: ``sum``, ``max``, judged position by
   position along its axis; other ufunc methods as whole operations), the index the first
   such position in its output, and the line the innermost frame in the user's
   file. This also sees what numpy's floating-point flags miss (float16 and ml_dtypes'
   bfloat16 results rounded to inf in a cast inside the loop).
2. ``np.errstate(over="call", invalid="call", divide="call")`` with ``np.seterrcall``, for
   whatever escapes the subclass (an ``np.asarray`` copy, a C extension): numpy's flags give
   the kind, the innermost frame in the user's file gives the line, and the op is read from
   the expression that line was executing (the name a call calls, the ufunc an operator
   stands for); the position is not known.

Gradients: numpy has no autodiff. A function may say how: an attribute ``gradient``
(``loss.gradient = loss_grad``) called as ``gradient(logits, labels)``, returning d(sum of
the returned losses)/d(logits) in the logits' shape (for a function returning a scalar: of
that scalar). xentcheck scales it by d(reduced loss)/d(per-example loss) in D, as autograd
seeds a backward pass; it is watched like the loss.
"""

from __future__ import annotations

import ast
import linecache
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from ..errors import InputError
from ..precision import FloatArray
from .adapter import CallResult, LossFunction, OpEvent
from .loading import describe, same_file, user_line
from .watch import Flush, OpWatcher

_REDUCTIONS = {"add": "sum", "multiply": "prod", "maximum": "max", "minimum": "min",
               "fmax": "max", "fmin": "min"}
_OPERATORS: dict[type[ast.AST], str] = {
    ast.Add: "add", ast.Sub: "subtract", ast.Mult: "multiply", ast.Div: "divide",
    ast.FloorDiv: "floor_divide", ast.Pow: "power", ast.Mod: "remainder",
    ast.MatMult: "matmul", ast.USub: "negative",
}
_NUMPY_FLAGS = {"overflow": "overflow", "invalid value": "nan", "divide by zero": "pole"}


def _floating(array: Any) -> bool:
    dtype = getattr(array, "dtype", None)
    return dtype is not None and (dtype.kind == "f" or dtype.name == "bfloat16"
                                  or dtype.name.startswith("float8"))


def _plain(value: Any) -> Any:
    return value.view(np.ndarray) if isinstance(value, Watched) else value


class _Watch:
    """What one call of a user's function found: a :class:`~.watch.OpWatcher` (the rules
    every adapter shares) and where the user's file is."""

    def __init__(self, user_file: Path | None) -> None:
        self.user_file = user_file
        self.watcher = OpWatcher()
        self._files: dict[str, bool] = {}

    @property
    def events(self) -> list[OpEvent]:
        return self.watcher.events

    def source(self, frame: FrameType | None) -> str | None:
        user = self.user_frame(frame)
        return None if user is None else f"{self.user_file}:{user.f_lineno}"

    def user_frame(self, frame: FrameType | None) -> FrameType | None:
        """The innermost frame at or outside ``frame`` whose code is in the user's file."""
        if self.user_file is None:
            return None
        while frame is not None:
            name = frame.f_code.co_filename
            mine = self._files.get(name)
            if mine is None:
                mine = self._files[name] = same_file(name, self.user_file)
            if mine:
                return frame
            frame = frame.f_back
        return None


class Watched(np.ndarray):
    """An array whose ufunc calls are watched (module docstring, first net). ``_flush``: the
    flush to zero its values carry (:class:`~.watch.Flush`), passed on to its views, copies
    and indexings, as the torch adapter keeps one per tensor."""

    _watch: _Watch | None = None
    _flush: Flush | None = None

    def __array_finalize__(self, obj: Any) -> None:
        self._watch = getattr(obj, "_watch", None)
        self._flush = getattr(obj, "_flush", None)

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        watch = next((i._watch for i in inputs if isinstance(i, Watched)
                      and i._watch is not None), self._watch)
        taints = [i._flush if isinstance(i, Watched) else None for i in inputs]
        operands = [_plain(i) for i in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(_plain(o) for o in kwargs["out"])
        flush: Flush | None = None
        with np.errstate(all="ignore"):  # this net reports what the warnings would
            result = getattr(ufunc, method)(*operands, **kwargs)
            outputs = result if isinstance(result, tuple) else (result,)
            if watch is not None:
                flush = _check(watch, ufunc, method, operands, taints, kwargs, outputs,
                               sys._getframe(1))

        def wrap(value: Any) -> Any:
            if isinstance(value, np.ndarray) and not isinstance(value, Watched):
                value = value.view(Watched)
                value._watch = watch
                value._flush = flush
            return value

        return tuple(wrap(o) for o in outputs) if isinstance(result, tuple) else wrap(result)


def _check(watch: _Watch, ufunc: np.ufunc, method: str, operands: list[Any],
           taints: list[Flush | None], kwargs: dict[str, Any], outputs: tuple[Any, ...],
           frame: FrameType) -> Flush | None:
    """Judge this ufunc call by the rules every adapter shares (:class:`~.watch.OpWatcher`);
    returns the flush to zero its outputs carry."""
    name = ufunc.__name__
    op = _REDUCTIONS.get(name, f"{name}.{method}") if method == "reduce" else (
        name if method == "__call__" else f"{name}.{method}")
    project: Callable[[FloatArray, tuple[int, ...]], FloatArray] | None = None
    if method == "reduce":
        def project(flags: FloatArray, shape: tuple[int, ...]) -> FloatArray:
            # a position of the output holds a flag if any position reduced into it did
            reduce: Any = np.logical_or.reduce
            return np.broadcast_to(reduce(flags, axis=kwargs.get("axis", 0),
                                          keepdims=bool(kwargs.get("keepdims", False))), shape)
    elif method != "__call__":
        # accumulate, outer, at...: judged as a whole operation
        def project(flags: FloatArray, shape: tuple[int, ...]) -> FloatArray:
            return np.full(shape, bool(flags.any()))
    floats = [np.asarray(o) if _floating(o) or isinstance(o, float) else None
              for o in operands]
    judged = [np.asarray(o) for o in outputs if _floating(o)]
    return watch.watcher.inspect(op, floats, judged, taints, lambda: watch.source(frame),
                                 project)


def _expression_op(frame: FrameType) -> str | None:
    """The operation the frame's current instruction belongs to, read from its source: the
    name a call calls (``exp`` for ``np.exp(x)``), the ufunc an operator stands for."""
    positions_of = getattr(frame.f_code, "co_positions", None)  # Python 3.11 on
    if positions_of is None:
        return None
    try:
        line, end_line, column, end_column = list(positions_of())[frame.f_lasti // 2]
    except (IndexError, ValueError):
        return None
    if None in (line, end_line, column, end_column):
        return None
    assert line is not None and end_line is not None
    lines = [linecache.getline(frame.f_code.co_filename, n) for n in range(line, end_line + 1)]
    if not lines or not lines[0]:
        return None
    lines[-1] = lines[-1].encode()[:end_column].decode(errors="ignore")
    lines[0] = lines[0].encode()[column:].decode(errors="ignore")
    try:
        node = ast.parse("\n".join(lines).strip(), mode="eval").body
    except SyntaxError:
        return None
    if isinstance(node, ast.Call):
        called = node.func
        if isinstance(called, ast.Attribute):
            return called.attr
        if isinstance(called, ast.Name):
            return called.id
    if isinstance(node, (ast.BinOp, ast.UnaryOp)):
        return _OPERATORS.get(type(node.op))
    return None


class NumpyAdapter:
    """Calls a numpy loss function on numpy arrays of D, watching its ufuncs."""

    framework = "numpy"

    def call(self, fn: LossFunction, logits: np.ndarray[Any, Any],
             labels: np.ndarray[Any, Any], *, user_file: Path | None,
             upstream: float | None) -> CallResult:
        """See :meth:`xentcheck.user_functions.adapter.Adapter.call`."""
        watch = _Watch(user_file)
        losses = self._watched_call(fn, logits, labels, watch, user_file, "")
        expected = (tuple(logits.shape[:-1]), tuple(logits.shape), ())
        if losses.shape not in expected:
            raise InputError(f"returned an array of shape {list(losses.shape)} for logits of "
                             f"shape {list(logits.shape)}; expected "
                             f"{list(logits.shape[:-1])} (one loss per example), "
                             f"{list(logits.shape)} (sigmoid: one per element) or a scalar")
        result = CallResult(np.asarray(losses, dtype=np.float64), watch.events)
        gradient = getattr(fn, "gradient", None)
        if upstream is None or gradient is None:
            return result
        if not callable(gradient):
            raise InputError(f"its 'gradient' attribute is a {type(gradient).__name__}, not "
                             "a function")
        backward = _Watch(user_file)
        values = self._watched_call(gradient, logits, labels, backward, user_file,
                                    "its gradient ")
        if values.shape != logits.shape:
            raise InputError(f"its gradient returned shape {list(values.shape)}; expected the "
                             f"logits' shape {list(logits.shape)}")
        seed = 1.0 if losses.ndim == 0 else upstream
        with np.errstate(all="ignore"):  # a gradient that overflows is what is measured
            scaled = values.astype(logits.dtype) * np.asarray(seed, dtype=logits.dtype)
        result.gradient = np.asarray(scaled, dtype=np.float64)
        result.gradient_events = backward.events
        return result

    def _watched_call(self, fn: Callable[..., Any], logits: np.ndarray[Any, Any],
                      labels: np.ndarray[Any, Any], watch: _Watch, user_file: Path | None,
                      what: str) -> np.ndarray[Any, Any]:
        x = logits.view(Watched)
        x._watch = watch
        y: Any = labels
        if _floating(labels):
            y = labels.view(Watched)
            y._watch = watch

        def flagged(kind: str, flag: int) -> None:
            frame = watch.user_frame(sys._getframe(1))
            op = (_expression_op(frame) if frame is not None else None) or "numpy"
            mapped = _NUMPY_FLAGS.get(kind)
            if mapped == "pole":
                mapped = "log_of_zero" if "log" in op else "division_by_zero"
            if mapped is not None:
                watch.watcher.record(OpEvent(op, mapped, (), watch.source(frame), None))

        shown = str(user_file) if user_file is not None else None
        with _errcall(flagged), np.errstate(over="call", invalid="call", divide="call",
                                            under="ignore"):
            try:
                value = fn(x, y)
            except Exception as exc:
                where = user_line(exc, user_file, shown or "") if user_file else None
                raise InputError(f"{what}raised {describe(exc)}"
                                 f"{f' ({where})' if where else ''}", cause=exc) from exc
        return _checked(value, what)


class _errcall:
    """``np.seterrcall(handler)`` for the duration, restored after (numpy's error state
    is the thread's own)."""

    def __init__(self, handler: Callable[[str, int], None]) -> None:
        self.handler = handler
        self.previous: Any = None

    def __enter__(self) -> None:
        self.previous = np.seterrcall(self.handler)

    def __exit__(self, *exc: object) -> None:
        np.seterrcall(self.previous)


def _checked(value: Any, what: str) -> np.ndarray[Any, Any]:
    """The function's answer as a plain numpy array, or one line on what it is instead."""
    if isinstance(value, np.ndarray):
        array = np.asarray(_plain(value))
    elif isinstance(value, np.generic):
        array = np.asarray(value)
    else:
        kind = type(value)
        module = kind.__module__.split(".")[0]
        named = f"{kind.__module__}.{kind.__qualname__}" if module != "builtins" \
            else kind.__qualname__
        if module in ("torch", "jax", "jaxlib"):
            framework = "jax" if module.startswith("jax") else module
            raise InputError(f"{what}returned a {named}, not a numpy array; a {framework} "
                             f"function runs with --framework {framework}")
        raise InputError(f"{what}returned a {named}, not a numpy array (return the array "
                         "of D the loss was computed in)")
    if not _floating(array):
        raise InputError(f"{what}returned an array of {array.dtype}, not floating point")
    return array
