"""``Method``: what a stage optimises, one small ``nn.Module`` per stage kind.

A method's ``forward(batch)`` returns ``{"loss": scalar, "logits": [N, K], <named parts>}``; the
training loop owns the optimiser, schedule, AMP, clipping, DDP wrapping and checkpoints. The
trainable network is always ``method.model``; frozen helpers (a teacher) are kept out of the
module tree (``frozen`` below) so that DDP wraps, syncs and checkpoints only what trains.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


def frozen(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with no gradients (a teacher or a fixed source model)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class Method(nn.Module):
    """Base: holds ``model`` (trainable) and any frozen helpers, moved by ``to_device``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._frozen: dict[str, nn.Module] = {}

    def keep_frozen(self, name: str, module: nn.Module) -> nn.Module:
        """Keep ``module`` outside the module tree: not DDP-wrapped, not in checkpoints or the optimiser."""
        self._frozen[name] = frozen(module)
        return module

    def networks(self) -> dict[str, nn.Module]:
        """The trainable ``model`` and the frozen helpers, by name."""
        return {"model": self.model, **self._frozen}

    def to_device(self, device: torch.device) -> "Method":
        self.to(device)
        for m in self._frozen.values():
            m.to(device)
        return self

    def train(self, mode: bool = True) -> "Method":
        super().train(mode)
        for m in self._frozen.values():
            m.eval()  # a frozen helper never updates its BatchNorm statistics
        return self

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups (a group's ``lr_scale`` multiplies the lr): every trainable parameter by default."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def on_epoch_start(self, epoch: int, progress: float) -> None:
        """Hook for schedules (DANN's lambda, SHOT's pseudo-labels); nothing by default."""

    def epoch_scores(self, device: torch.device) -> dict[str, float]:
        """Extra per-epoch numbers (this rank's part; the loop averages them over ranks)."""
        return {}

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        """Hook after the epoch's metrics are known on every rank (model selection); nothing by default."""


def labelled_cross_entropy(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the rows whose label is known (``y >= 0``); 0, still on the graph, if none is."""
    if bool((y >= 0).any()):
        return F.cross_entropy(logits, y, ignore_index=-1, label_smoothing=label_smoothing)
    return logits.sum() * 0.0  # a batch without labels contributes nothing but keeps DDP's graph intact
