"""Record PyTorch's losses and gradients on logits with -inf masks (float32, CPU).

Regenerates ``tests/fixtures/torch_masked.json``, which ``tests/test_masked_logits.py``
reads (so the suite does not need torch)::

    python tests/record_torch_masked.py

Each case is recorded for the formulations xentcheck's pipelines write: ``stable`` is
``F.cross_entropy`` (log-softmax and NLL; its probability-target form for soft labels),
``naive`` and ``shifted`` are autograd of the textbook formulas (``p = exp(z) / sum(exp(z))``
with ``z = x`` or ``x - max x``; ``-log(p)[t]`` for integer labels (the log of every
probability, then the target's, as ``F.nll_loss(torch.log(p), t)``), ``-sum(y log p)`` for
one-hot or soft labels), and for sigmoid ``stable`` is ``F.binary_cross_entropy_with_logits``'s
gradient and ``naive`` autograd of ``-(z log s + (1 - z) log(1 - s))``, ``s = 1 / (1 + exp(-x))``.
Losses are per example (``reduction='none'``); gradients are those of the mean over the
counted examples (integer labels: not ``ignore_index``), as xentcheck's default ``mean``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

INF = float("inf")
IGNORE = -100

# name: (logits, labels, options)
SOFTMAX_CASES: dict[str, tuple[list[list[float]], Any, dict[str, Any]]] = {
    "masked_other": ([[0.0, -INF, 1.0, -2.0], [2.0, -INF, -INF, -INF]], [0, 0], {}),
    "masked_target": ([[0.0, -INF, 1.0], [0.5, 0.25, -1.0]], [1, 0], {}),
    "all_masked_row": ([[-INF, -INF, -INF], [0.5, -INF, 1.0]], [1, 2], {}),
    "ignored_all_masked_row": ([[-INF, -INF, -INF], [0.0, 1.0, 2.0]], [IGNORE, 1],
                               {"ignore_index": IGNORE}),
    "soft_zero_weight": ([[0.0, -INF, 1.0], [3.0, 1.0, -INF]],
                         [[0.5, 0.0, 0.5], [0.25, 0.75, 0.0]], {}),
    "onehot": ([[0.0, -INF, 1.0]], [[1.0, 0.0, 0.0]], {}),
}
SIGMOID_CASES: dict[str, tuple[list[float], list[float]]] = {
    "sigmoid_masked": ([-INF, -INF, 0.5, -3.0], [0.0, 1.0, 1.0, 0.0]),
}


def _text(values: torch.Tensor) -> Any:
    return [repr(float(v)) for v in values.reshape(-1).tolist()]


def _softmax(formulation: str, x: torch.Tensor, labels: Any,
             options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    dense = isinstance(labels[0], list)
    y = torch.tensor(labels, dtype=torch.float32 if dense else torch.int64)
    if formulation == "stable":
        return F.cross_entropy(x, y, reduction="none", **options), y
    z = x if formulation == "naive" else x - x.max(dim=-1, keepdim=True).values
    e = torch.exp(z)
    p = e / e.sum(dim=-1, keepdim=True)
    if dense:
        return -(y * torch.log(p)).sum(dim=-1), y
    keep = y != options.get("ignore_index", IGNORE)
    safe = torch.where(keep, y, torch.zeros_like(y))
    losses = -torch.log(p).gather(-1, safe[:, None])[:, 0]  # log of every p, as F.nll_loss(log(p))
    return torch.where(keep, losses, torch.zeros_like(losses)), y


def record() -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.__version__, "dtype": "float32", "cases": {}}
    for name, (logits, labels, options) in SOFTMAX_CASES.items():
        entry: dict[str, Any] = {"family": "softmax", "logits": logits, "labels": labels,
                                 "options": options, "pipelines": {}}
        for formulation in ("naive", "shifted", "stable"):
            x = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
            losses, y = _softmax(formulation, x, labels, options)
            counted = (torch.ones(len(labels), dtype=torch.bool) if y.dtype.is_floating_point
                       else y != options.get("ignore_index", IGNORE))
            losses[counted].sum().div(int(counted.sum())).backward()
            entry["pipelines"][formulation] = {"losses": _text(losses.detach()),
                                               "gradient": _text(x.grad)}
        out["cases"][name] = entry
    for name, (logits, targets) in SIGMOID_CASES.items():
        entry = {"family": "sigmoid", "logits": logits, "labels": targets, "options": {},
                 "pipelines": {}}
        z = torch.tensor(targets, dtype=torch.float32)
        x = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
        losses = F.binary_cross_entropy_with_logits(x, z, reduction="none")
        losses.mean().backward()
        entry["pipelines"]["stable"] = {"losses": _text(losses.detach()),
                                        "gradient": _text(x.grad)}
        x = torch.tensor(logits, dtype=torch.float32, requires_grad=True)
        s = 1 / (1 + torch.exp(-x))
        losses = -(z * torch.log(s) + (1 - z) * torch.log(1 - s))
        losses.mean().backward()
        entry["pipelines"]["naive"] = {"losses": _text(losses.detach()),
                                       "gradient": _text(x.grad)}
        out["cases"][name] = entry
    return out


def main() -> None:
    torch.set_num_threads(1)
    path = Path(__file__).parent / "fixtures" / "torch_masked.json"
    path.write_text(json.dumps(record(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
