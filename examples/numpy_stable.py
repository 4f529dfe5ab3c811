"""A numerically stable softmax cross-entropy in numpy: log-softmax by log-sum-exp.

The row maximum is subtracted first, so exp never overflows and the target's
log-probability is a difference, never the log of an underflowed probability. numpy has no
autodiff: ``loss.gradient`` says how to differentiate it (softmax minus one-hot), and
xentcheck checks that gradient against its reference too.
Check it with: xentcheck run examples/numpy_stable.yaml
"""

import numpy as np


def loss(logits, labels):
    z = logits - logits.max(axis=-1, keepdims=True)
    log_softmax = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_softmax, labels[..., None], axis=-1)[..., 0]


def gradient(logits, labels):
    """d loss[i] / d logits[i]: softmax(logits[i]) - onehot(labels[i])."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    onehot = np.arange(logits.shape[-1]) == labels[..., None]
    return p - onehot.astype(logits.dtype)


loss.gradient = gradient
