"""A user's own networks for kdray: plain ``nn.Module`` classes with no kdray base class or contract.

kdray finds the classifier (the last ``nn.Linear``, here ``head``), reads the embedding with a hook
on its input, and can hook any module path (``kdray inspect`` lists them with their output shapes).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.skip(x)


class WideCNN(nn.Module):
    """Two residual stages and a linear head; ``width`` scales the channels."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.stem = Block(in_channels, width)
        self.stage1 = nn.Sequential(Block(width, width), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(Block(width, 2 * width), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stage2(self.stage1(self.stem(x)))).flatten(1))
