"""A softmax cross-entropy written in PyTorch the stable way: log-softmax by log-sum-exp.

Subtracting the row's maximum first keeps every ``exp`` at most 1, and the loss is taken
from log-probabilities, never from a probability that can round to 0. This is what
``F.cross_entropy`` computes.
"""

import torch


def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    z = logits - logits.max(dim=-1, keepdim=True).values
    log_p = z - torch.log(torch.exp(z).sum(dim=-1, keepdim=True))
    return -log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
