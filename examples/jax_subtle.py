"""A softmax cross-entropy in JAX with a subtle bug: the log of a softmax.

``jax.nn.softmax`` subtracts the maximum, so nothing overflows; but once the target's logit
is far enough below the largest (126 ln 2 = 87.34 in float32: XLA on CPU flushes subnormal
results to 0, so the edge is the smallest normal number's, earlier than torch's 103.97),
its probability rounds to 0 and the log of it is -inf.
xentcheck names the ``exp`` inside ``jax.nn.softmax``, located at the softmax line, as where
the target's probability underflowed, and the ``log`` line as where it hit the pole.
``jax.nn.log_softmax`` (``jax_stable.py``) has no such edge.
"""

import jax
import jax.numpy as jnp


def loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    p = jax.nn.softmax(logits, axis=-1)
    return -jnp.log(jnp.take_along_axis(p, labels[..., None], axis=-1)[..., 0])
