"""Multi-layer perceptrons over flattened images: the usual compact students."""

from __future__ import annotations

import torch
import torch.nn as nn

from kdray.models.base import MODELS, Classifier


class MLP(Classifier):
    family = "mlp"

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        hidden: tuple[int, ...] = (512, 512),
        dropout: float = 0.0,
    ):
        super().__init__()
        dims = [in_channels * image_size * image_size, *hidden]
        self.layers = nn.Sequential(
            *[
                nn.Sequential(nn.Linear(a, b), nn.ReLU(inplace=True), nn.Dropout(dropout))
                for a, b in zip(dims[:-1], dims[1:])
            ]
        )
        self.classifier = nn.Linear(dims[-1], num_classes)
        self.feature_layers = tuple(f"layers.{i}" for i in range(len(hidden)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))


def _register(width: int, depth: int = 2) -> None:
    @MODELS.register(f"mlp_{width}", family="mlp", hidden=(width,) * depth)
    def build(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, dropout: float = 0.0) -> MLP:
        return MLP(num_classes, in_channels, image_size, hidden=(width,) * depth, dropout=dropout)

    build.__doc__ = f"MLP with {depth} hidden layers of {width} units."


for _w in (32, 64, 128, 256, 512, 1024):
    _register(_w)
