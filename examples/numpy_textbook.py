"""A textbook softmax cross-entropy in numpy: exp, then divide by the sum, then log.

It overflows: exp(1000) is inf in float32 (and float64), and inf / inf is NaN.
Check it with: xentcheck run examples/numpy_textbook.yaml
"""

import numpy as np


def loss(logits, labels):
    e = np.exp(logits)
    p = e / e.sum(axis=-1, keepdims=True)
    picked = np.take_along_axis(p, labels[..., None], axis=-1)[..., 0]
    return -np.log(picked)
