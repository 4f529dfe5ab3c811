"""jax losses the adapter tests call (each a user's file: lines are looked for here)."""

import jax
import jax.numpy as jnp
import optax


def _target(values, labels):
    return jnp.take_along_axis(values, labels[..., None], axis=-1)[..., 0]


def textbook(logits, labels):
    e = jnp.exp(logits)  # overflows past ln(max)
    p = e / e.sum(axis=-1, keepdims=True)
    return -jnp.log(_target(p, labels))


def library(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def log_of_softmax(logits, labels):
    p = jax.nn.softmax(logits, axis=-1)  # the target's probability flushes to 0
    return -jnp.log(_target(p, labels))  # log of an exact 0


def stable_log_softmax(logits, labels):
    return -_target(jax.nn.log_softmax(logits, axis=-1), labels)


def focal(logits, labels):
    # focal loss with gamma = 0.5: finite forward, but where p rounds to 1 the backward of
    # (1 - p) ** 0.5 is 0.5 * 0 ** -0.5 = inf, times 0: NaN
    logp = _target(jax.nn.log_softmax(logits, axis=-1), labels)
    weight = (1 - jnp.exp(logp)) ** 0.5
    return -weight * logp


def raises(logits, labels):
    return logits.reshape(7, -1)  # TypeError


def python_branch(logits, labels):
    if logits.sum() > 0:  # not traceable
        return logits.sum(-1)
    return -logits.sum(-1)


def returns_float(logits, labels):
    return 1.5


def returns_integers(logits, labels):
    return jnp.argmax(logits, axis=-1)


def returns_wrong_shape(logits, labels):
    return jnp.exp(logits.T)  # neither (2,), (2, 3) nor ()


def mean(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@jax.jit
def jitted(logits, labels):
    e = jnp.exp(logits)  # inside a jit: evaluated op by op all the same
    return jnp.log(e.sum(-1)) - _target(logits, labels)


def binary(logits, targets):
    return optax.sigmoid_binary_cross_entropy(logits, targets)


def chunked(logits, labels):
    # the exps summed chunk by chunk in a lax.scan (as large-vocabulary losses do)
    chunks = jnp.moveaxis(logits.reshape(logits.shape[0], -1, 1), 1, 0)

    def step(total, chunk):
        return total + jnp.exp(chunk[:, 0]), None

    total, _ = jax.lax.scan(step, jnp.zeros(logits.shape[0], logits.dtype), chunks)  # scan
    return jnp.log(total) - _target(logits, labels)
