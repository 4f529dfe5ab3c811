"""A softmax cross-entropy in PyTorch with a subtle bug: the log of a softmax.

``torch.softmax`` subtracts the maximum, so nothing overflows; but once the target's logit
is far enough below the largest (150 ln 2 = 103.97 in float32, where exp rounds to 0 below
half the smallest subnormal; 17.34 in float16), its probability rounds to 0 and the log of it
is -inf. xentcheck names the ``softmax`` line as where the
target's probability underflowed, and the ``log`` line as where it hit the pole.
``torch.log_softmax`` (``torch_stable.py``) has no such edge.
"""

import torch


def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits, dim=-1)
    return -torch.log(p.gather(-1, labels.unsqueeze(-1)).squeeze(-1))
