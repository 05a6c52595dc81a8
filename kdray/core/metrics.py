"""Predictions and their scores: shared by evaluation, adaptation's validators and the loop."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)])


@torch.no_grad()
def latency_ms(model: torch.nn.Module, x: torch.Tensor, batch_size: int, batches: int) -> float:
    """Median wall time of one forward pass on a batch, after two warm-up passes."""
    xb = x[:batch_size]
    for _ in range(2):
        model(xb)
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        model(xb)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def metrics_for(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    k = min(5, logits.shape[1])
    top5 = (logits.topk(k, dim=1).indices == y[:, None]).any(1).float().mean()
    return {
        "top1": float((logits.argmax(1) == y).float().mean()),
        "top5": float(top5),
        "loss": float(F.cross_entropy(logits, y)),
    }
