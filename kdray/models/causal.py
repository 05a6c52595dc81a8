"""kdray's own small decoder-only transformer: a causal language model over token-id rows.

``model(x)`` maps token ids ``[N, T]`` (integers; ``-1`` marks padding, read as id 0: with causal
attention and padding only at the end of a row, no real position ever attends to it) to next-token
logits ``[N, T, vocab]``: position ``t`` scores the token at ``t + 1``. ``num_classes`` is the
vocabulary (a text dataset's ``num_classes``) and ``in_channels`` the row length (its ``seq_len``:
the learned positions), so the model is built from the data like every other. ``embed`` returns the
final hidden states ``[N, T, D]`` and ``classifier`` (the LM head) maps them to logits.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn as nn
from pydantic import Field

from kdray.models.base import MODELS, Classifier


def token_ids(x: torch.Tensor) -> torch.Tensor:
    """Token ids as a model reads them: int64, padding (``-1``) read as id 0."""
    return x.long().clamp(min=0)


class CausalTransformer(Classifier):
    family = "causal_lm"

    def __init__(
        self,
        num_classes: int = 256,
        in_channels: int = 128,
        image_size: int = 1,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.vocab_size, self.max_len = num_classes, in_channels
        self.tokens = nn.Embedding(num_classes, dim)
        self.pos = nn.Parameter(torch.randn(1, in_channels, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, dim * 4, dropout, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        self.feature_layers = tuple(f"blocks.{i}" for i in range(depth))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        ids = token_ids(x)
        t = ids.shape[1]
        if t > self.max_len:
            raise ValueError(f"a row of {t} tokens is longer than the model's {self.max_len} positions")
        h = self.tokens(ids) + self.pos[:, :t]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=h.device, dtype=h.dtype)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.norm(h)


@MODELS.register("lm_tiny", family="causal_lm")
def lm_tiny(
    num_classes: int = 256,
    in_channels: int = 128,
    image_size: int = 1,
    dim: Annotated[int, Field(ge=8)] = 64,
    depth: Annotated[int, Field(ge=1)] = 2,
    heads: Annotated[int, Field(ge=1)] = 4,
) -> CausalTransformer:
    """A decoder-only transformer, 2 blocks of width 64 by default: a student (or, wider, a teacher)."""
    return CausalTransformer(num_classes, in_channels, image_size, dim=dim, depth=depth, heads=heads)


@MODELS.register("lm_small", family="causal_lm")
def lm_small(
    num_classes: int = 256,
    in_channels: int = 128,
    image_size: int = 1,
    dim: Annotated[int, Field(ge=8)] = 192,
    depth: Annotated[int, Field(ge=1)] = 4,
    heads: Annotated[int, Field(ge=1)] = 6,
) -> CausalTransformer:
    """A decoder-only transformer, 4 blocks of width 192 by default: a teacher."""
    return CausalTransformer(num_classes, in_channels, image_size, dim=dim, depth=depth, heads=heads)
