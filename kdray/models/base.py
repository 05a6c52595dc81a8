"""The shared shape of every kdray model: ``embed`` then ``classifier``."""

from __future__ import annotations

import torch
import torch.nn as nn

from kdray.core.registry import Registry

MODELS: Registry = Registry("model", group="kdray.models")


class Classifier(nn.Module):
    """Base class: subclasses define ``embed`` and set ``classifier`` and ``feature_layers``."""

    classifier_name = "classifier"
    feature_layers: tuple[str, ...] = ()
    family = "unknown"

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))  # type: ignore[operator]  # torch: Module.__getattr__
