"""Watching a framework's operations one at a time: which one first *created* trouble.

The numpy, torch and jax adapters hand every operation they see to one :class:`OpWatcher`,
as numpy views of its floating operands and outputs. The rules are those of :mod:`xentcheck.stages`,
restated for operations the watcher knows only by name:

``overflow``
    an infinite output where every operand was finite;
``nan``
    a NaN output where no operand was NaN;
``log_of_zero``
    a logarithm (``log``, ``log2``, ``log10``) of an exact zero, or ``log1p`` of exactly -1;
``division_by_zero``
    a division (``div``, ``reciprocal``, ``remainder``, ``fmod``) whose divisor is an exact
    zero, giving inf or NaN;
``underflow``
    an operation whose exact result cannot be zero (``exp`` or ``softmax`` of a finite value;
    ``mul``, ``div``, ``pow`` of finite non-zero operands) returned an exact zero, *and that
    zero later reached a logarithm or a divisor* (the ``log_of_zero`` / ``division_by_zero``
    above). A flush nobody takes the log of or divides by (the probability of a class that is
    not the target) is harmless and is not reported; subnormal results are not flushes here.
    The zero is followed through any later operation whose output still holds a zero (an
    index, a view, a copy), so ``log(softmax(x)[target])`` reports the ``softmax``.

Where an operand has the output's shape or broadcasts to it (an elementwise operation), the
rules hold position by position. Otherwise (a reduction, an index, a matrix product) they
hold for the operation as a whole: an output is "created" trouble when no operand held any.
An adapter that knows better (numpy's reductions along an axis) says how an operand's flags
map to the output's positions (``project``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .adapter import OpEvent

Array = np.ndarray[Any, Any]

LOG_OPS = frozenset({"log", "log2", "log10", "log1p"})
# operation -> which operand is the divisor (a power's 0 ** -1 stays an overflow, as the
# torch and jax adapters have always named it)
DIVISION_OPS = {"div": 1, "true_divide": 1, "divide": 1, "reciprocal": 0, "floor_divide": 1,
                "remainder": 1, "fmod": 1}
# where a logarithm's or a division's pole is, when it is not at 0: log1p(-1) = log(0)
POLES = {"log1p": -1.0}
# The exact result is positive for any finite operand.
POSITIVE_OPS = frozenset({"exp", "exp2", "softmax", "_softmax", "sigmoid", "logistic"})
# The exact result is non-zero for finite, non-zero operands.
NONZERO_OPS = frozenset({"mul", "multiply", "div", "true_divide", "divide", "pow",
                         "integer_pow", "square"})


def base_name(op: str) -> str:
    """``aten::exp_`` -> ``exp``: the operation without namespace, in-place mark or the
    autograd node named after it (``aten::div (DivBackward0)``)."""
    name = op.split(" ", 1)[0].rsplit("::", 1)[-1]
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def _first(mask: Array) -> tuple[int, ...] | None:
    flat = np.flatnonzero(mask)
    if not flat.size:
        return None
    return tuple(int(i) for i in np.unravel_index(int(flat[0]), mask.shape))


def _as_array(value: Array) -> Array:
    # judged in its own dtype (numpy's and ml_dtypes' isfinite, isnan and == 0 work on every
    # format): a float64 copy of each operand would cost more than the operation
    return np.asarray(value)


@dataclass
class Flush:
    """A flush to zero that becomes an ``underflow`` event once a pole meets its zero."""

    order: int
    event: OpEvent
    owner: object  # the watcher of the pass that flushed: a pass reports only its own


@dataclass
class OpWatcher:
    """Collects the events of one pass (forward, or backward) in execution order."""

    _events: list[tuple[int, OpEvent]] = field(default_factory=list)
    _seen: set[tuple[str, str, str | None]] = field(default_factory=set)
    _order: int = 0

    @property
    def events(self) -> list[OpEvent]:
        return [event for _, event in sorted(self._events, key=lambda pair: pair[0])]

    def _emit(self, order: int, event: OpEvent) -> None:
        key = (event.op, event.kind, event.source)
        if key not in self._seen:
            self._seen.add(key)
            self._events.append((order, event))

    def inspect(
        self,
        op: str,
        operands: Sequence[Array | None],
        outputs: Sequence[Array],
        taints: Sequence[Flush | None],
        locate: Callable[[], str | None],
        project: Callable[[Array, tuple[int, ...]], Array] | None = None,
    ) -> Flush | None:
        """Check one operation. ``operands``: the floating operands as numpy arrays (None for
        a non-floating or non-array operand, kept so positions match the operation's own);
        ``taints``: for each operand, the flush to zero it carries (what this method
        returned for the operation that produced it); ``locate``: the user's ``FILE:LINE``,
        asked only when there is an event; ``project``: maps an operand's boolean flags to
        an output's shape (a reduction: any flag along the reduced axes), replacing the
        elementwise-or-whole choice. Returns the flush the outputs carry on."""
        self._order += 1
        order = self._order
        name = base_name(op)
        present = [_as_array(o) for o in operands if o is not None and np.size(o)]
        source: list[str | None] = []

        def where() -> str | None:
            if not source:
                source.append(locate())
            return source[0]

        taints = [t if t is not None and t.owner is self else None for t in taints]
        carried = next((t for t in taints if t is not None), None)
        result: Flush | None = None
        for raw in outputs:
            out = _as_array(raw)
            if not out.size:
                continue
            elementwise = all(_broadcasts(o.shape, out.shape) for o in present)

            def per_output(flags: Callable[[Array], Array], *, elementwise: bool = elementwise,
                           shape: tuple[int, ...] = out.shape) -> Array:
                combined = np.zeros(shape, dtype=bool)
                for o in present:
                    f = flags(o)
                    if project is not None:
                        combined |= project(f, shape)
                    else:
                        combined |= np.broadcast_to(f, shape) if elementwise else bool(f.any())
                return combined

            nonfinite_out = ~np.isfinite(out)
            if nonfinite_out.any():
                new_nan = np.isnan(out) & ~per_output(np.isnan)
                new_inf = np.isinf(out) & ~per_output(lambda o: ~np.isfinite(o))
                pole_kind, at_pole, pole_operand = self._pole(name, operands, out.shape) \
                    if project is None else (None, np.zeros(out.shape, dtype=bool), -1)
                if pole_kind is not None:
                    hit = (new_inf | new_nan) & at_pole
                    index = _first(hit)
                    if index is not None:
                        taint = taints[pole_operand] if pole_operand < len(taints) else None
                        if taint is not None:
                            self._emit(taint.order, taint.event)
                        self._emit(order, OpEvent(op, pole_kind, index, where(), out.shape))
                    new_nan &= ~at_pole
                    new_inf &= ~at_pole
                for kind, mask in (("overflow", new_inf), ("nan", new_nan)):
                    index = _first(mask)
                    if index is not None:
                        self._emit(order, OpEvent(op, kind, index, where(), out.shape))

            zeros = out == 0
            if not zeros.any():
                continue
            if name in POSITIVE_OPS or name in NONZERO_OPS:
                clean = ~per_output(lambda o: ~np.isfinite(o))
                if name in NONZERO_OPS:
                    clean &= ~per_output(lambda o: o == 0)
                index = _first(zeros & clean)
                if index is not None and result is None:
                    result = Flush(order, OpEvent(op, "underflow", index, where(), out.shape),
                                   self)
            if result is None and carried is not None:
                result = carried  # the zero travels on (an index, a view, a copy)
        return result

    def record(self, event: OpEvent) -> None:
        """An event found outside :meth:`inspect` (numpy's floating-point flags), in the
        order it was found."""
        self._order += 1
        self._emit(self._order, event)

    @staticmethod
    def _pole(name: str, operands: Sequence[Array | None],
              shape: tuple[int, ...]) -> tuple[str | None, Array, int]:
        """(event kind, positions of the output whose pole operand is an exact zero, which
        operand) for a logarithm or a division; (None, ..., -1) for any other operation."""
        if name in LOG_OPS:
            kind, which = "log_of_zero", 0
        elif name in DIVISION_OPS:
            kind, which = "division_by_zero", DIVISION_OPS[name]
        else:
            return None, np.zeros(shape, dtype=bool), -1
        operand = operands[which] if which < len(operands) else None
        if operand is None or not _broadcasts(np.shape(operand), shape):
            return None, np.zeros(shape, dtype=bool), -1
        return kind, np.broadcast_to(_as_array(operand) == POLES.get(name, 0.0), shape), which


def _broadcasts(operand: tuple[int, ...], out: tuple[int, ...]) -> bool:
    """Whether an operand of shape ``operand`` broadcasts to ``out`` (elementwise)."""
    if len(operand) > len(out):
        return False
    return all(o in (1, n) for o, n in zip(reversed(operand), reversed(out), strict=False))
