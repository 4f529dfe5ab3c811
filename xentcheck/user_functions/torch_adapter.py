"""Running a user's PyTorch loss: eager, every aten operation watched, autograd's gradient.

The function is called on tensors holding exactly the values of D (bfloat16's bits are
reinterpreted, never rounded twice) inside a ``TorchDispatchMode`` (torch.utils._python_dispatch)
that sees each aten operation's operands and outputs as it runs -- the forward, and the
backward kernels autograd runs inside ``torch.autograd.grad``. Each is judged by
:class:`~.watch.OpWatcher`; the operation is named as aten does (``aten::exp``) and located at
the innermost frame of the user's file on the Python stack. A backward operation is named
with the autograd node that ran it (``aten::div (DivBackward0)``) and located at the line of
the user's file whose forward operation created that node: autograd's anomaly mode
(``torch.autograd.set_detect_anomaly``) records each node's forward traceback in
``node.metadata["traceback_"]``, read through ``torch._C._current_autograd_node()``.

torch is imported only when a torch function is run.
"""

from __future__ import annotations

import importlib
import re
import sys
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .adapter import CallResult, LossFunction
from .locate import not_an_array, raised, same_file, source, wrong_shape
from .watch import Flush, OpWatcher

# numpy dtype name -> (torch dtype attribute, integer numpy view of the same width); the
# narrow formats move over bit for bit through the integer view, as torch has no numpy
# interchange for them.
_DTYPES: dict[str, tuple[str, type[np.generic] | None]] = {
    "float64": ("float64", None),
    "float32": ("float32", None),
    "float16": ("float16", None),
    "bfloat16": ("bfloat16", np.int16),
    "float8_e4m3fn": ("float8_e4m3fn", np.uint8),
    "float8_e5m2": ("float8_e5m2", np.uint8),
}
_FRAME = re.compile(r'File "(?P<file>.*)", line (?P<line>\d+)')


def to_tensor(torch: Any, values: np.ndarray[Any, Any]) -> Any:
    """A torch tensor holding exactly ``values`` (labels: int64; floats: the same dtype)."""
    array = np.ascontiguousarray(values)
    if array.dtype.kind in "iu":
        return torch.from_numpy(array.astype(np.int64))
    spec = _DTYPES.get(array.dtype.name)
    if spec is None:
        raise InputError(f"torch functions take float16, bfloat16, float32, float64 and "
                         f"float8 inputs, not {array.dtype.name}")
    dtype_name, view = spec
    dtype = getattr(torch, dtype_name, None)
    if dtype is None:
        raise InputError(f"this torch ({torch.__version__}) has no {array.dtype.name}")
    if view is None:
        return torch.from_numpy(array.copy())
    return torch.from_numpy(array.view(view).copy()).view(dtype)


def to_numpy(torch: Any, tensor: Any) -> np.ndarray[Any, Any]:
    """A numpy array with ``tensor``'s values and dtype (ml_dtypes for the narrow formats)."""
    import ml_dtypes

    t = tensor.detach()
    if t.dtype == torch.bfloat16:
        return np.asarray(t.view(torch.int16).numpy()).view(ml_dtypes.bfloat16)
    for name in ("float8_e4m3fn", "float8_e5m2"):
        if t.dtype == getattr(torch, name, None):
            return np.asarray(t.view(torch.uint8).numpy()).view(getattr(ml_dtypes, name))
    return np.asarray(t.numpy())


def checked_losses(torch: Any, out: Any, leading: tuple[int, ...],
                   whole: tuple[int, ...]) -> Any:
    """``out`` if it is a floating torch tensor of the leading shape, the logits' whole
    shape (a sigmoid loss: one per element) or a scalar."""
    if not isinstance(out, torch.Tensor):
        raise not_an_array(out, "a torch tensor")
    if not out.is_floating_point():
        raise InputError(f"returned a tensor of {out.dtype}; losses must be floating")
    if tuple(out.shape) not in (leading, whole, ()):
        raise wrong_shape(tuple(out.shape), leading, whole)
    return out


class _Watch:
    """The dispatch mode's bookkeeping: one watcher for the forward, one for the backward,
    and the flushes to zero each live tensor carries (by identity, weakly held)."""

    def __init__(self, torch: Any, user_file: Path | None) -> None:
        self.torch = torch
        self.user_file = user_file
        self.in_user = same_file(user_file)
        self.forward = OpWatcher()
        self.backward = OpWatcher()
        self._taints: dict[int, tuple[weakref.ref[Any], Flush]] = {}

    def _taint(self, tensor: Any) -> Flush | None:
        entry = self._taints.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1]

    def _stack_line(self) -> str | None:
        frame = sys._getframe(1)
        while frame is not None:
            if self.in_user(frame.f_code.co_filename):
                return source(self.user_file, frame.f_lineno)
            frame = frame.f_back  # type: ignore[assignment]
        return None

    def _node_line(self, node: Any) -> str | None:
        lines = node.metadata.get("traceback_") or []
        found = None
        for entry in lines:
            for match in _FRAME.finditer(str(entry)):
                if self.in_user(match["file"]):
                    found = match["line"]
        return source(self.user_file, found)

    def _floating(self, value: Any) -> np.ndarray[Any, Any] | None:
        torch = self.torch
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return to_numpy(torch, value)
        return None

    def dispatch(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        torch = self.torch
        from torch.utils._pytree import tree_flatten

        flat_args, _ = tree_flatten((args, kwargs))
        mutable = bool(getattr(func._schema, "is_mutable", False))
        # An in-place operation overwrites its operand: judge it against a copy taken first.
        operands = [self._floating(a.clone() if mutable and isinstance(a, torch.Tensor) else a)
                    for a in flat_args if isinstance(a, torch.Tensor)]
        taints = [self._taint(a) for a in flat_args if isinstance(a, torch.Tensor)]
        out = func(*args, **kwargs)
        flat_out, _ = tree_flatten(out)
        outputs = [o for o in (self._floating(v) for v in flat_out) if o is not None]
        node = torch._C._current_autograd_node()
        op = str(func._schema.name)
        if node is None:
            watcher, locate = self.forward, self._stack_line
        else:
            op = f"{op} ({node.name()})"
            watcher = self.backward

            def locate() -> str | None:
                return self._node_line(node)

        carried = watcher.inspect(op, operands, outputs, taints, locate)
        if carried is not None:
            for value in flat_out:
                if isinstance(value, torch.Tensor):
                    self._taints[id(value)] = (weakref.ref(value), carried)
        return out


def _dispatch_mode(watch: _Watch) -> Any:
    """A dispatch mode class handing every aten operation to ``watch``."""
    base: Any = importlib.import_module("torch.utils._python_dispatch").TorchDispatchMode

    class Mode(base):  # type: ignore[misc]
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                               kwargs: dict[str, Any] | None = None) -> Any:
            return watch.dispatch(func, args, kwargs or {})

    return Mode


class TorchAdapter:
    """Calls a user's torch loss eagerly on CPU, watching every aten operation."""

    framework = "torch"

    def call(self, fn: LossFunction, logits: np.ndarray[Any, Any],
             labels: np.ndarray[Any, Any], *, user_file: Path | None,
             upstream: float | None) -> CallResult:
        import torch

        watch = _Watch(torch, user_file)
        Mode = _dispatch_mode(watch)

        x = to_tensor(torch, logits)
        y = to_tensor(torch, labels)
        if upstream is not None:
            x.requires_grad_(True)
        leading = tuple(logits.shape[:-1])
        anomaly = torch.is_anomaly_enabled()
        anomaly_nan = torch.is_anomaly_check_nan_enabled()
        try:
            # Anomaly mode records each forward operation's stack on its autograd node, so a
            # bad backward operation can be traced to the user's line; it must not raise on
            # NaN (check_nan=False): finding the NaN is our job.
            if upstream is not None:
                torch.autograd.set_detect_anomaly(True, check_nan=False)
            try:
                with Mode():
                    out = fn(x, y)
            except InputError:
                raise
            except Exception as exc:
                raise raised(exc, user_file, "the function") from exc
            losses = checked_losses(torch, out, leading, tuple(logits.shape))
            result = CallResult(losses=to_numpy(torch, losses).astype(np.float64),
                                events=watch.forward.events)
            if upstream is None:
                return result
            if not losses.requires_grad:
                raise InputError("returned losses that do not depend on the logits through "
                                 "autograd (detached, or computed outside torch)")
            # The upstream gradient reaches the losses in their own dtype, as autograd's.
            seed = torch.full_like(losses.detach(), upstream)
            try:
                with Mode():
                    (gradient,) = torch.autograd.grad(losses, x, grad_outputs=seed,
                                                      allow_unused=True)
            except Exception as exc:
                raise raised(exc, user_file, "the backward pass") from exc
            if gradient is None:  # the losses do not depend on the logits at all
                gradient = torch.zeros_like(x)
            result.gradient = to_numpy(torch, gradient).astype(np.float64)
            result.gradient_events = watch.backward.events
            return result
        finally:
            torch.autograd.set_detect_anomaly(anomaly, check_nan=anomaly_nan)
