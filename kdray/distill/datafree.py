"""Data-free distillation: when the training data is unavailable, synthesise inputs from the teacher.

DeepInversion (Yin et al., CVPR 2020, "Dreaming to Distill"): start from noise ``x`` and optimise
it so that the teacher classifies it as chosen targets ``y`` while the statistics of every
BatchNorm layer's input match the running statistics the teacher stored during training::

    L(x) = CE(f_T(x), y) + a_bn · Σ_l (‖μ_l(x) − μ̂_l‖₂ + ‖σ²_l(x) − σ̂²_l‖₂) + a_tv · TV(x) + a_l2 · ‖x‖²

``x`` lives in the teacher's input space (normalised pixels), ``[N, C, H, W]``; ``TV`` is the mean
absolute difference between neighbouring pixels. The student then distils on ``x`` as usual. The
teacher needs BatchNorm layers: their statistics are the only trace of the data it saw.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.core.errors import KdrayError


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


class BatchNormMatch:
    """Forward hooks that measure how far each BatchNorm layer's input statistics are from its running ones."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not self.layers:
            raise KdrayError(
                f"data-free distillation matches the teacher's BatchNorm statistics, but the teacher "
                f"({type(model).__name__}) has no BatchNorm layer",
                hint="Use a teacher with BatchNorm (cnn_small, cnn_large, resnet_small).",
            )
        self.losses: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        self.losses.append(torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2))  # type: ignore[operator]  # torch: Module.__getattr__

    def take(self) -> torch.Tensor:
        total = torch.stack(self.losses).sum()
        self.losses = []
        return total

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def synthesize(
    teacher: nn.Module,
    *,
    samples: int,
    shape: tuple[int, int, int],
    num_classes: int,
    steps: int = 200,
    batch_size: int = 256,
    lr: float = 0.1,
    bn_weight: float = 1.0,
    tv_weight: float = 1e-4,
    l2_weight: float = 1e-5,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    log: Callable[[str], None] = print,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """``samples`` inputs of ``shape`` (in normalised-pixel space) and their target classes, plus stats."""
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    bn = BatchNormMatch(teacher)
    xs, ys, first, last = [], [], [], []
    t0 = time.perf_counter()
    try:
        for start in range(0, samples, batch_size):
            n = min(batch_size, samples - start)
            y = (torch.arange(start, start + n) % num_classes).to(device)  # balanced classes
            x = torch.randn(n, *shape, generator=gen).to(device).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            for step in range(steps):
                ce = F.cross_entropy(teacher(x), y)
                bn_loss = bn.take()
                loss = ce + bn_weight * bn_loss + tv_weight * total_variation(x) + l2_weight * x.pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step == 0:
                    first.append(float(bn_loss.detach()))
            with torch.no_grad():
                teacher(x)
                last.append(float(bn.take()))
            xs.append(x.detach().cpu())
            ys.append(y.cpu())
            log(f"  data-free: {start + n:,}/{samples:,} inputs synthesised ({time.perf_counter() - t0:.1f} s)")
    finally:
        bn.close()
    x, y = torch.cat(xs), torch.cat(ys)
    with torch.no_grad():
        agree = float(
            (torch.cat([teacher(x[i : i + 512].to(device)).argmax(1).cpu() for i in range(0, len(x), 512)]) == y)
            .float()
            .mean()
        )
    stats = {
        "bn_loss_start": sum(first) / len(first),
        "bn_loss_end": sum(last) / len(last),
        "teacher_agreement_with_targets": agree,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return x, y, stats
