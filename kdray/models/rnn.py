"""Recurrent networks: a GRU that reads an image row by row (a sequence of H vectors of C*W values), or,
given ``vocab_size``, a sequence of integer token ids ``[N, T]`` (array shards, ``kdray.data.arrays``)
through an embedding."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn as nn
from pydantic import Field

from kdray.core.errors import DataError
from kdray.models.base import MODELS, Classifier


class RowEncoder(nn.Module):
    """[N, C, H, W] -> GRU outputs [N, H, hidden] (a tensor, so it can be hooked)."""

    def __init__(self, in_features: int, hidden: int, layers: int):
        super().__init__()
        self.gru = nn.GRU(in_features, hidden, num_layers=layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.permute(0, 2, 1, 3).flatten(2)  # rows become time steps
        out, _ = self.gru(seq)
        return out


class TokenEncoder(nn.Module):
    """Integer token ids [N, T] (any fixed shape, read flat as one sequence) -> GRU outputs [N, T, hidden]."""

    def __init__(self, vocab_size: int, hidden: int, layers: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, hidden)
        self.gru = nn.GRU(hidden, hidden, num_layers=layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            raise DataError(
                f"a model with vocab_size={self.vocab_size} reads integer token ids, but the data is {x.dtype}",
                hint="Import the token ids as integer arrays (kdray data import X.npz DEST --as arrays), or drop "
                "the model's vocab_size to read images.",
            )
        tokens = x.flatten(1)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            bad = int(tokens.max()) if int(tokens.max()) >= self.vocab_size else int(tokens.min())
            raise DataError(
                f"token id {bad} is outside the model's vocabulary 0..{self.vocab_size - 1} (vocab_size)",
                hint="Set the model's vocab_size above the largest id (dataset.json's value_range).",
            )
        out, _ = self.gru(self.embedding(tokens))
        return out


class RowGRU(Classifier):
    family = "rnn"

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        hidden: int = 128,
        layers: int = 1,
        vocab_size: int | None = None,
    ):
        super().__init__()
        self.encoder: nn.Module = (
            TokenEncoder(vocab_size, hidden, layers)
            if vocab_size
            else RowEncoder(in_channels * image_size, hidden, layers)
        )
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, num_classes)
        self.feature_layers = ("encoder", "norm")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.encoder(x)[:, -1])


@MODELS.register("gru_small", family="rnn")
def gru_small(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    vocab_size: Annotated[int, Field(ge=2)] | None = None,
) -> RowGRU:
    """One GRU layer of 128 units over image rows (or embedded token ids with ``vocab_size``); about 0.06M parameters."""
    return RowGRU(num_classes, in_channels, image_size, hidden=128, layers=1, vocab_size=vocab_size)


@MODELS.register("gru_large", family="rnn")
def gru_large(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    vocab_size: Annotated[int, Field(ge=2)] | None = None,
) -> RowGRU:
    """Two GRU layers of 256 units over image rows (or embedded token ids with ``vocab_size``); about 0.6M parameters."""
    return RowGRU(num_classes, in_channels, image_size, hidden=256, layers=2, vocab_size=vocab_size)
