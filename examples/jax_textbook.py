"""A textbook softmax cross-entropy written in JAX, as it is often first written.

``exp`` of a logit past ln(max) is inf (88.72 in float32), and the probability is then
inf / inf = NaN: xentcheck names ``exp`` at the ``jnp.exp`` line. On CPU it breaks earlier
still: XLA evaluates the division by the broadcast row sum through the sum's reciprocal,
which is subnormal, so flushed to 0, once the sum passes 2**126. With C equal float32
logits that is past 126 ln 2 - ln C (86.24 for C = 3, where torch's textbook loss lasts
to 87.62): the loss is inf, and xentcheck names the ``div`` at the division's line.
"""

import jax
import jax.numpy as jnp


def loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    e = jnp.exp(logits)
    p = e / e.sum(axis=-1, keepdims=True)
    return -jnp.log(jnp.take_along_axis(p, labels[..., None], axis=-1)[..., 0])
