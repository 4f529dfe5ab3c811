"""torch losses the adapter tests call (each a user's file: lines are looked for here)."""

import torch
import torch.nn.functional as F


def textbook(logits, labels):
    e = torch.exp(logits)  # overflows past ln(max)
    p = e / e.sum(dim=-1, keepdim=True)
    return -torch.log(p.gather(-1, labels.unsqueeze(-1)).squeeze(-1))


def library(logits, labels):
    return F.cross_entropy(logits, labels, reduction="none")


def log_of_softmax(logits, labels):
    p = torch.softmax(logits, dim=-1)  # the target's probability flushes to 0
    return -torch.log(p.gather(-1, labels.unsqueeze(-1)).squeeze(-1))  # log of an exact 0


def stable_log_softmax(logits, labels):
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def focal(logits, labels):
    # focal loss with gamma = 0.5: finite forward, but where p rounds to 1 the backward of
    # (1 - p) ** 0.5 is 0.5 * 0 ** -0.5 = inf, times 0: NaN
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    weight = (1 - logp.exp()) ** 0.5
    return -weight * logp


def raises(logits, labels):
    return logits[:, labels.numel() + 5]  # IndexError


def in_place(logits, labels):
    e = logits.clone()
    e.exp_()  # the in-place exp overflows
    return torch.log(e.sum(-1)) - e.gather(-1, labels.unsqueeze(-1)).squeeze(-1).log()


def returns_numpy(logits, labels):
    return logits.detach().numpy().sum(-1)


def returns_integers(logits, labels):
    return logits.argmax(-1)


def returns_wrong_shape(logits, labels):
    return logits.t().exp()  # neither (2,), (2, 3) nor ()


def detached(logits, labels):
    return F.cross_entropy(logits, labels, reduction="none").detach()


def mean(logits, labels):
    return F.cross_entropy(logits, labels)


def binary(logits, targets):
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
