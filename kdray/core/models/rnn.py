"""Recurrent networks: a GRU that reads an image row by row (a sequence of H vectors of C*W values)."""

from __future__ import annotations

import torch
import torch.nn as nn

from kdray.core.models.base import MODELS, Classifier


class RowEncoder(nn.Module):
    """[N, C, H, W] -> GRU outputs [N, H, hidden] (a tensor, so it can be hooked)."""

    def __init__(self, in_features: int, hidden: int, layers: int):
        super().__init__()
        self.gru = nn.GRU(in_features, hidden, num_layers=layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.permute(0, 2, 1, 3).flatten(2)  # rows become time steps
        out, _ = self.gru(seq)
        return out


class RowGRU(Classifier):
    family = "rnn"

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, hidden: int = 128, layers: int = 1
    ):
        super().__init__()
        self.encoder = RowEncoder(in_channels * image_size, hidden, layers)
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, num_classes)
        self.feature_layers = ("encoder", "norm")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.encoder(x)[:, -1])


@MODELS.register("gru_small", family="rnn")
def gru_small(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> RowGRU:
    """One GRU layer of 128 units over image rows; about 0.06M parameters."""
    return RowGRU(num_classes, in_channels, image_size, hidden=128, layers=1)


@MODELS.register("gru_large", family="rnn")
def gru_large(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> RowGRU:
    """Two GRU layers of 256 units over image rows; about 0.6M parameters."""
    return RowGRU(num_classes, in_channels, image_size, hidden=256, layers=2)
