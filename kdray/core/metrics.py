"""Predictions and their scores: shared by evaluation, adaptation's validators and the loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)])


def metrics_for(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy and loss; top-5 only when there are more than 5 classes (else it is always 1)."""
    out = {"top1": float((logits.argmax(1) == y).float().mean()), "loss": float(F.cross_entropy(logits, y))}
    if logits.shape[1] > 5:
        out["top5"] = float((logits.topk(5, dim=1).indices == y[:, None]).any(1).float().mean())
    return out
