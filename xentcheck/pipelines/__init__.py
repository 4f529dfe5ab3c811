"""Pipelines: each formulation of the loss, written once, generic over the precision.

:mod:`.base` holds what every pipeline is built from (the block of rows, the interface, the
shared batch reduction); :mod:`.textbook` the textbook formulations. Adding a formulation
means adding a class in a module of its own and registering it here; the evaluator, the
reference and the reports do not change.
"""

from __future__ import annotations

from ..errors import UsageError
from .base import Block, Pipeline, Saved, reduce_losses
from .jax_optax import SigmoidJax, SoftmaxJax
from .textbook import (
    KERAS_EPSILON,
    SigmoidNaive,
    SigmoidProbabilitiesClipped,
    SigmoidProbabilitiesNaive,
    SigmoidStable,
    SoftmaxNaive,
    SoftmaxProbabilitiesClipped,
    SoftmaxProbabilitiesNaive,
    SoftmaxShifted,
    SoftmaxStable,
)

__all__ = [
    "KERAS_EPSILON", "PIPELINES", "Block", "Pipeline", "Saved", "available", "reduce_losses",
    "select",
]

PIPELINES: tuple[Pipeline, ...] = (
    SoftmaxNaive(),
    SoftmaxShifted(),
    SoftmaxStable(),
    SoftmaxProbabilitiesNaive(),
    SoftmaxProbabilitiesClipped(),
    SigmoidNaive(),
    SigmoidStable(),
    SigmoidProbabilitiesNaive(),
    SigmoidProbabilitiesClipped(),
    SoftmaxJax(),
    SigmoidJax(),
)


# Pipelines named after the framework they emulate: run when named (``--pipeline jax``), not
# by default, so the default set stays the textbook one until the default layout is chosen.
FRAMEWORKS = frozenset({"torch", "fused", "jax", "keras"})


def available(family: str, from_logits: bool, *,
              frameworks: bool = False) -> tuple[Pipeline, ...]:
    """The pipelines that apply to a loss family and input kind, in display order (the
    framework pipelines too with ``frameworks``)."""
    return tuple(p for p in PIPELINES if p.family == family and p.from_logits == from_logits
                 and (frameworks or p.name not in FRAMEWORKS))


def select(family: str, from_logits: bool, names: list[str] | None) -> tuple[Pipeline, ...]:
    """The named pipelines (all applicable ones when ``names`` is empty or None)."""
    if not names:
        return available(family, from_logits)
    choices = available(family, from_logits, frameworks=True)
    by_name = {p.name: p for p in choices}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        kind = "logits" if from_logits else "probabilities"
        raise UsageError(
            f"unknown pipeline {unknown[0]!r} for {family} {kind}; "
            f"choose from {', '.join(by_name)}"
        )
    return tuple(by_name[n] for n in dict.fromkeys(names))
