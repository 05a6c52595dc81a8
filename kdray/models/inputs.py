"""A network's own inputs: the size, channels and normalisation it was pretrained for.

kdray hands every network the stage's inputs, normalised with the data's mean and std. A teacher
pretrained elsewhere (a Hugging Face folder's ``preprocessor_config.json``, or ``model.inputs`` in
the spec) expects another view of the same images: its own resolution, channel count and
mean/std. :class:`InputView` turns the stage's inputs into that view inside the network's
``forward`` (:mod:`kdray.models.outputs`), so the teacher sees its inputs while the student
keeps its own, in the training loop, the teacher cache, evaluation and export alike. The cost is
the network's forward at its own resolution (a 224x224 ViT reads 64x the pixels of a 28x28 input).

The view is a JSON-able dict (it travels in the stage's model keywords, ``inputs``, and in manifests)::

    {"size": [224, 224], "crop": null, "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
     "data_mean": 0.286, "data_std": 0.353, "source": "preprocessor_config.json"}
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.core.errors import DataError
from kdray.models.outputs import logits_only


def _per_channel(value: Any, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    return t.view(-1, 1, 1) if t.dim() else t


class InputView:
    """The stage's normalised images ``[N, C, H, W]`` -> the network's view (not a module: no state, no weights)."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = dict(spec)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point() or x.dim() != 4:  # token ids and flat rows pass as they are
            return x
        s = self.spec
        pixels = x * _per_channel(s.get("data_std", 1.0), x) + _per_channel(s.get("data_mean", 0.0), x)
        channels = s.get("channels")
        if channels and channels != pixels.shape[1]:
            if pixels.shape[1] == 1:
                pixels = pixels.expand(-1, channels, -1, -1)  # grey images for an RGB network
            elif channels == 1:
                pixels = pixels.mean(1, keepdim=True)
            else:
                raise DataError(
                    f"the network reads {channels}-channel images, the data has {pixels.shape[1]} channels",
                    hint="Set model.inputs.channels to the data's channel count, or use data of the network's.",
                )
        size = s.get("size")
        if size and tuple(pixels.shape[-2:]) != tuple(size):
            shrink = size[0] < pixels.shape[-2] or size[1] < pixels.shape[-1]  # as data.transforms' resize does
            pixels = F.interpolate(pixels, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)
        crop = s.get("crop")
        if crop and tuple(pixels.shape[-2:]) != tuple(crop):
            top, left = (pixels.shape[-2] - crop[0]) // 2, (pixels.shape[-1] - crop[1]) // 2
            pixels = pixels[..., top : top + crop[0], left : left + crop[1]]
        if s.get("mean") is not None:
            pixels = (pixels - _per_channel(s["mean"], pixels)) / _per_channel(s["std"], pixels)
        return pixels

    def __repr__(self) -> str:
        return f"InputView({self.spec})"


def with_inputs(model: nn.Module, view: dict[str, Any] | None) -> nn.Module:
    """``model`` reading its inputs through ``view`` (in place; no-op without one)."""
    if view:
        logits_only(model)  # its forward applies the view
        model.__dict__["kdray_input_view"] = InputView(view)  # a plain attribute: not in state_dict or modules()
    return model


def describe_view(view: dict[str, Any] | None) -> str:
    """One line for logs: ``224x224, 3 channels, mean [0.5, ...] (preprocessor_config.json)``."""
    if not view:
        return "the stage's inputs"
    parts = []
    if view.get("size"):
        parts.append("x".join(map(str, view["size"])))
    if view.get("crop"):
        parts.append(f"center crop {'x'.join(map(str, view['crop']))}")
    if view.get("channels"):
        parts.append(f"{view['channels']} channels")
    if view.get("mean") is not None:
        parts.append(f"mean {view['mean']} std {view['std']}")
    return ", ".join(parts) + f" ({view.get('source', 'spec')})"
