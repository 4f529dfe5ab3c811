"""Pipelines: each formulation of the loss, written once, generic over the precision.

:mod:`.base` holds what every pipeline is built from (the block of rows, the interface, the
shared batch reduction); :mod:`.textbook` the textbook formulations; :mod:`.large_vocab` the
log1p, online and chunked log-sum-exp of large-vocabulary losses. Adding a formulation
means adding a class in a module of its own and registering it here; the evaluator, the
reference and the reports do not change.
"""

from __future__ import annotations

from ..errors import UsageError
from .base import Block, Pipeline, Saved, reduce_losses
from .fused import SoftmaxFused
from .jax_optax import SigmoidJax, SoftmaxJax
from .keras3 import KerasSigmoid, KerasSoftmax, KerasSoftmaxProbabilities
from .large_vocab import SoftmaxAccurate, SoftmaxChunked, SoftmaxOnline
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
from .torch_eager import TorchBinary, TorchBinaryWithLogits, TorchCrossEntropy

__all__ = [
    "KERAS_EPSILON", "PIPELINES", "Block", "Pipeline", "Saved", "available", "reduce_losses",
    "select", "textbook",
]

# Display order. Framework emulations (``framework = True``) follow the textbook formulations;
# those with ``default = False`` run only when named (``--pipeline``, a scenario's
# ``pipelines:``).
PIPELINES: tuple[Pipeline, ...] = (
    SoftmaxNaive(),
    SoftmaxShifted(),
    SoftmaxStable(),
    SoftmaxAccurate(),
    SoftmaxOnline(),
    SoftmaxChunked(),
    SoftmaxProbabilitiesNaive(),
    SoftmaxProbabilitiesClipped(),
    SigmoidNaive(),
    SigmoidStable(),
    SigmoidProbabilitiesNaive(),
    SigmoidProbabilitiesClipped(),
    TorchCrossEntropy(),
    TorchBinaryWithLogits(),
    TorchBinary(),
    SoftmaxJax(),
    SigmoidJax(),
    SoftmaxFused(),
    KerasSoftmax(),
    KerasSoftmaxProbabilities(),
    KerasSigmoid(),
)


def available(family: str, from_logits: bool, *, every: bool = False) -> tuple[Pipeline, ...]:
    """The pipelines that apply to a loss family and input kind, in display order: those run
    by default, or (``every``) also those run only when named."""
    return tuple(p for p in PIPELINES if p.family == family and p.from_logits == from_logits
                 and (every or p.default))


def textbook(family: str, from_logits: bool) -> tuple[Pipeline, ...]:
    """The textbook formulations that apply (run by default, no framework emulation), in
    display order; the large-vocabulary ones (:mod:`.large_vocab`) run when named."""
    return tuple(p for p in available(family, from_logits) if not p.framework)


def select(family: str, from_logits: bool, names: list[str] | None) -> tuple[Pipeline, ...]:
    """The named pipelines (the default applicable ones when ``names`` is empty or None)."""
    if not names:
        return available(family, from_logits)
    by_name = {p.name: p for p in available(family, from_logits, every=True)}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        kind = "logits" if from_logits else "probabilities"
        raise UsageError(
            f"unknown pipeline {unknown[0]!r} for {family} {kind}; "
            f"choose from {', '.join(by_name)}"
        )
    return tuple(by_name[n] for n in dict.fromkeys(names))
