"""Convolutional networks: a small VGG-like family and a small ResNet."""

from __future__ import annotations

import torch
import torch.nn as nn

from kdray.models.base import MODELS, Classifier


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class VGGLike(Classifier):
    """Stages of ``convs`` 3x3 conv-BN-ReLU layers, each stage followed by 2x2 max-pooling (down to >= 2x2)."""

    family = "cnn"

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        widths: tuple[int, ...] = (32, 64),
        convs: int = 1,
        hidden: int = 128,
        dropout: float = 0.0,
        pooled: int = 2,
    ):
        super().__init__()
        stages, cin, size = [], in_channels, image_size
        for w in widths:
            pool = nn.MaxPool2d(2) if size >= 4 else nn.Identity()
            size = size // 2 if size >= 4 else size
            layers = [conv_bn(cin if i == 0 else w, w) for i in range(convs)]
            stages.append(nn.Sequential(*layers, pool))
            cin = w
        self.features = nn.Sequential(*stages)
        pooled = min(pooled, size)  # never upsample a small map (8x8 digits end at 2x2)
        self.pool = nn.AdaptiveAvgPool2d(pooled)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(cin * pooled * pooled, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)
        )
        self.classifier = nn.Linear(hidden, num_classes)
        self.feature_layers = tuple(f"features.{i}" for i in range(len(widths))) + ("head",)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


@MODELS.register("cnn_small", family="cnn")
def cnn_small(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, dropout: float = 0.0) -> VGGLike:
    """Two stages of one conv (32, 64 channels), the 7x7 map flattened into a 128-d embedding; 0.42M parameters."""
    return VGGLike(
        num_classes, in_channels, image_size, widths=(32, 64), convs=1, hidden=128, dropout=dropout, pooled=7
    )


@MODELS.register("cnn_large", family="cnn")
def cnn_large(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, dropout: float = 0.0) -> VGGLike:
    """Three stages of two convs (32, 64, 128 channels), pooled to 2x2, 256-d embedding; 0.42M parameters, 7x the compute."""
    return VGGLike(num_classes, in_channels, image_size, widths=(32, 64, 128), convs=2, hidden=256, dropout=dropout)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(Classifier):
    """A CIFAR-style ResNet: a 3x3 stem, then stages of BasicBlocks; global average pooling."""

    family = "cnn"

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        widths: tuple[int, ...] = (16, 32, 64),
        blocks: int = 1,
    ):
        super().__init__()
        self.stem = conv_bn(in_channels, widths[0])
        cin, layers = widths[0], []
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(cin, w, stride)] + [BasicBlock(w, w, 1) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(cin, num_classes)
        self.feature_layers = ("stem",) + tuple(f"layers.{i}" for i in range(len(widths)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(self.stem(x)))


@MODELS.register("resnet_small", family="cnn")
def resnet_small(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, blocks: int = 1) -> ResNet:
    """ResNet with stages of 16, 32, 64 channels (``blocks`` BasicBlocks each); about 0.08M parameters."""
    return ResNet(num_classes, in_channels, image_size, widths=(16, 32, 64), blocks=blocks)
