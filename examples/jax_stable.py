"""A softmax cross-entropy written in JAX the stable way: log-softmax by log-sum-exp.

Subtracting the row's maximum first keeps every ``exp`` at most 1, and the loss is taken
from log-probabilities, never from a probability that can round to 0 (what
``optax.softmax_cross_entropy_with_integer_labels`` does).
"""

import jax
import jax.numpy as jnp


def loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    z = logits - jnp.max(logits, axis=-1, keepdims=True)
    log_p = z - jnp.log(jnp.sum(jnp.exp(z), axis=-1, keepdims=True))
    return -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
