"""A subtle bug: the log of a softmax. The softmax is shifted (no overflow), but a target far
below the largest logit gets a probability that underflows to 0, and log(0) = -inf: the
loss is inf where log-softmax would give a finite number (about the gap itself).
Check it with: xentcheck run examples/numpy_subtle.yaml
"""

import numpy as np


def loss(logits, labels):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    target = np.take_along_axis(p, labels[..., None], axis=-1)[..., 0]
    return -np.log(target)
