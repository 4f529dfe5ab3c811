"""Running a user's JAX loss: traced to a jaxpr, evaluated equation by equation, ``jax.vjp``.

``jax.make_jaxpr`` traces the function once; :func:`evaluate` then runs the jaxpr one
primitive at a time (``primitive.bind`` on concrete arrays), entering the jaxprs that
``jit``, ``custom_jvp_call``, ``custom_vjp_call`` and ``cond`` carry, and hands every
equation's operands and outputs to :class:`~.watch.OpWatcher`. An operation is named by its
primitive (``exp``, ``log``, ``div``) and located at the innermost frame of the user's file
in the equation's ``source_info`` traceback. The gradient is ``jax.vjp``'s: the function
``(x, labels, cotangent) -> vjp(fn, x)[1](cotangent)`` is traced and evaluated the same way,
watching only the equations transposition made (their name stack says ``transpose``; the
others recompute the forward and its derivative factors); transposition keeps each forward
equation's source info on the backward equations it gives, so a bad backward operation is
located at the forward line it differentiates, and named ``div (backward)``. Traces are
kept per function, pass and input shape, as ``jax.jit`` keeps its own.

Semantics: eager, op by op, as JAX runs a function without ``jax.jit``: a ``jit`` inside the
function (or around it: a decorated loss) is entered, not compiled, so that its operations
can be named. The values are those of the function called without ``jax.jit`` where no
``jit`` fuses its arithmetic (the examples' and optax's losses, bit for bit, in every
dtype: tests). Where XLA compiles a ``jit`` it may fuse operations and round differently
(a bfloat16 batch through ``jax.jit`` does); XLA on CPU flushes subnormals either way.
The function must be traceable, as ``jax.jit`` requires (no Python branch on an array's
value). Labels are int32 (JAX's default integers: int64 needs ``jax_enable_x64``, which
would change the function's own default dtypes); float64 inputs are run with
``jax.enable_x64`` set for the call and restored after it.

jax is imported only when a jax function is run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .adapter import CallResult, LossFunction
from .locate import not_an_array, raised, same_file, source, wrong_shape
from .watch import Flush, OpWatcher

# equations whose inner jaxpr is evaluated in place: primitive -> parameter holding it
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}
_INT32 = np.iinfo(np.int32)
_TRACES_KEPT = 64  # traces of (function, pass, input shapes) one adapter keeps


class _Returned(Exception):
    """The function returned something the adapter refuses (raised out of the trace)."""

    def __init__(self, error: InputError) -> None:
        super().__init__(str(error))
        self.error = error


def _is_float(dtype: Any) -> bool:
    import jax.numpy as jnp

    return bool(jnp.issubdtype(dtype, jnp.floating))


def _numpy(value: Any) -> np.ndarray[Any, Any] | None:
    """A floating value as a numpy array (ml_dtypes for the narrow formats), else None."""
    dtype = getattr(value, "dtype", None)
    if dtype is None or not _is_float(dtype):
        return None
    return np.asarray(value)


class _Evaluator:
    """Evaluates jaxprs one equation at a time, judging each with a watcher."""

    def __init__(self, user_file: Path | None, watcher: OpWatcher, suffix: str = "") -> None:
        self.user_file = user_file
        self.in_user = same_file(user_file)
        self.watcher = watcher
        self.suffix = suffix

    def _locate(self, eqn: Any) -> str | None:
        traceback = eqn.source_info.traceback
        if traceback is None:
            return None
        for frame in traceback.frames:  # innermost first
            if self.in_user(frame.file_name):
                return source(self.user_file, frame.line_num)
        return None

    def evaluate(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any],
                 taints: Sequence[Flush | None] | None = None,
                 judged: bool = False) -> tuple[list[Any], list[Flush | None]]:
        """The outputs of ``jaxpr`` on ``args`` (and the flushes to zero they carry).
        ``judged``: every equation is watched (the inside of a watched call); else those
        :attr:`watches` picks."""
        from jax.extend.core import Literal

        values: dict[Any, Any] = {}
        flushes: dict[Any, Flush | None] = {}
        for var, value in zip(jaxpr.constvars, consts, strict=True):
            values[var] = value
        for i, (var, value) in enumerate(zip(jaxpr.invars, args, strict=True)):
            values[var] = value
            flushes[var] = taints[i] if taints is not None else None

        def read(var: Any) -> Any:
            return var.val if isinstance(var, Literal) else values[var]

        for eqn in jaxpr.eqns:
            inputs = [read(v) for v in eqn.invars]
            carried = [None if isinstance(v, Literal) else flushes.get(v) for v in eqn.invars]
            watched = judged or self.watches(eqn)
            outputs, out_flush = self._equation(eqn, inputs, carried, watched)
            for var, value in zip(eqn.outvars, outputs, strict=True):
                values[var] = value
                flushes[var] = out_flush
        return [read(v) for v in jaxpr.outvars], [
            None if isinstance(v, Literal) else flushes.get(v) for v in jaxpr.outvars]

    def watches(self, eqn: Any) -> bool:
        """Whether an equation of the outer jaxpr is watched: every one in the forward; in
        the backward only those transposition made (the rest recompute the forward)."""
        return self.suffix == "" or "transpose" in str(eqn.source_info.name_stack)

    def _equation(self, eqn: Any, inputs: list[Any], carried: list[Flush | None],
                  watched: bool) -> tuple[list[Any], Flush | None]:
        name = eqn.primitive.name
        inner = eqn.params.get(_CALLS.get(name, ""))
        if inner is not None:
            closed = hasattr(inner, "consts")
            jaxpr = inner.jaxpr if closed else inner
            outputs, flushes = self.evaluate(jaxpr, inner.consts if closed else (), inputs,
                                             carried, watched)
            return outputs, next((f for f in flushes if f is not None), None)
        if name == "cond":
            branch = eqn.params["branches"][int(np.asarray(inputs[0]))]
            outputs, flushes = self.evaluate(branch.jaxpr, branch.consts, inputs[1:],
                                             carried[1:], watched)
            return outputs, next((f for f in flushes if f is not None), None)
        params = eqn.primitive.get_bind_params(eqn.params)
        with eqn.ctx.manager:  # the equation's own context, as jax's eval_jaxpr does
            out = eqn.primitive.bind(*inputs, **params)
        outputs = list(out) if eqn.primitive.multiple_results else [out]
        if not watched:
            return outputs, None
        floating = [a for a in (_numpy(o) for o in outputs) if a is not None]
        flush = self.watcher.inspect(name + self.suffix, [_numpy(i) for i in inputs],
                                     floating, carried, lambda: self._locate(eqn))
        return outputs, flush


def _checked(jax: Any, out: Any, leading: tuple[int, ...], whole: tuple[int, ...]) -> Any:
    """``out`` if it is a floating jax array of the leading shape, the logits' whole shape
    (a sigmoid loss: one per element) or a scalar."""
    if not isinstance(out, jax.Array):
        raise _Returned(not_an_array(out, "a jax array"))
    if not _is_float(out.dtype):
        raise _Returned(InputError(f"returned an array of {out.dtype}; losses must be floating"))
    if tuple(out.shape) not in (leading, whole, ()):
        raise _Returned(wrong_shape(tuple(out.shape), leading, whole))
    return out


def to_jax(jnp: Any, values: np.ndarray[Any, Any]) -> Any:
    """A jax array holding exactly ``values`` (labels: int32; floats: the same dtype)."""
    array = np.ascontiguousarray(values)
    if array.dtype.kind in "iu":
        if array.size and (array.min() < _INT32.min or array.max() > _INT32.max):
            raise InputError("labels beyond int32 cannot be given to a jax function")
        return jnp.asarray(array.astype(np.int32))
    out = jnp.asarray(array)
    if out.dtype != array.dtype:
        raise InputError(f"this jax has no {array.dtype.name}")
    return out


class JaxAdapter:
    """Calls a user's jax loss equation by equation, watching every primitive."""

    framework = "jax"

    def __init__(self) -> None:
        self._traces: dict[tuple[Any, ...], tuple[Any, Any]] = {}

    def call(self, fn: LossFunction, logits: np.ndarray[Any, Any],
             labels: np.ndarray[Any, Any], *, user_file: Path | None,
             upstream: float | None) -> CallResult:
        import jax

        wide = np.dtype(np.float64) in (logits.dtype, labels.dtype)
        with jax.enable_x64(True) if wide else contextlib.nullcontext():
            return self._call(jax, fn, logits, labels, user_file, upstream)

    def _call(self, jax: Any, fn: LossFunction, logits: np.ndarray[Any, Any],
              labels: np.ndarray[Any, Any], user_file: Path | None,
              upstream: float | None) -> CallResult:
        import jax.numpy as jnp

        x = to_jax(jnp, logits)
        y = to_jax(jnp, labels)
        leading = tuple(logits.shape[:-1])

        def checked(a: Any, b: Any) -> Any:
            return _checked(jax, fn(a, b), leading, tuple(logits.shape))

        try:
            traced = self._trace(jax, ("forward", fn, x, y), checked, x, y)
        except _Returned as exc:
            raise exc.error from None
        except Exception as exc:
            raise raised(exc, user_file, "the function") from exc
        forward = OpWatcher()
        try:
            (out,), _ = _Evaluator(user_file, forward).evaluate(
                traced.jaxpr, traced.consts, [x, y])
        except Exception as exc:
            raise raised(exc, user_file, "the function") from exc
        result = CallResult(losses=np.asarray(out).astype(np.float64), events=forward.events)
        if upstream is None:
            return result
        # the upstream gradient reaches the losses in their own dtype
        seed = jnp.full(out.shape, upstream, dtype=out.dtype)

        def pulled_back(a: Any, b: Any, cotangent: Any) -> Any:
            return jax.vjp(lambda u: fn(u, b), a)[1](cotangent)

        backward = OpWatcher()
        try:
            joint = self._trace(jax, ("backward", fn, x, y), pulled_back, x, y, seed)
            (gradient,), _ = _Evaluator(user_file, backward, " (backward)").evaluate(
                joint.jaxpr, joint.consts, [x, y, seed])
        except Exception as exc:
            raise raised(exc, user_file, "the backward pass") from exc
        result.gradient = np.asarray(gradient).astype(np.float64)
        result.gradient_events = backward.events
        return result

    def _trace(self, jax: Any, key: tuple[Any, ...], fn: Any, *args: Any) -> Any:
        """``jax.make_jaxpr(fn)(*args)``, traced once per user function, pass and argument
        shapes and dtypes (as ``jax.jit`` caches its traces): limits and sweeps call a
        function many times on inputs of one shape."""
        what, user_fn, *arrays = key
        cache_key = (what, id(user_fn), bool(jax.config.jax_enable_x64),
                     *((a.shape, a.dtype.name) for a in arrays))
        entry = self._traces.get(cache_key)
        if entry is not None and entry[0] is user_fn:
            return entry[1]
        traced = jax.make_jaxpr(fn)(*args)
        if len(self._traces) >= _TRACES_KEPT:
            self._traces.pop(next(iter(self._traces)))
        self._traces[cache_key] = (user_fn, traced)
        return traced
