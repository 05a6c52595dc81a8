"""A small ViT-style encoder over image patches."""

from __future__ import annotations

import torch
import torch.nn as nn

from kdray.models.base import MODELS, Classifier


def default_patch(image_size: int) -> int:
    """The largest of 7, 4, 2, 1 that divides the image size (28 -> 7, 8 -> 4)."""
    return next(p for p in (7, 4, 2, 1) if image_size % p == 0)


class PatchTransformer(Classifier):
    family = "transformer"

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        patch: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        patch = patch or default_patch(image_size)
        if image_size % patch:
            raise ValueError(f"patch size {patch} does not divide image size {image_size}")
        n = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(
            *[
                nn.TransformerEncoderLayer(
                    dim, heads, dim * 2, dropout, activation="gelu", batch_first=True, norm_first=True
                )
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)
        self.feature_layers = tuple(f"blocks.{i}" for i in range(depth))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos  # traceable batch
        return self.norm(self.blocks(tokens)[:, 0])


@MODELS.register("vit_tiny", family="transformer")
def vit_tiny(
    num_classes: int = 10, in_channels: int = 1, image_size: int = 28, patch: int | None = None
) -> PatchTransformer:
    """4 blocks, width 64, 4 heads; about 0.14M parameters."""
    return PatchTransformer(num_classes, in_channels, image_size, dim=64, depth=4, heads=4, patch=patch)


@MODELS.register("vit_small", family="transformer")
def vit_small(
    num_classes: int = 10, in_channels: int = 1, image_size: int = 28, patch: int | None = None
) -> PatchTransformer:
    """6 blocks, width 128, 4 heads; about 0.8M parameters: a transformer teacher."""
    return PatchTransformer(num_classes, in_channels, image_size, dim=128, depth=6, heads=4, patch=patch)
