"""MODELS: one registry for every network family.

Every model follows one small contract so that distillation, transfer and adaptation can treat
all families alike:

* ``model(x)`` maps images ``[N, C, H, W]`` (float, normalised) to logits ``[N, num_classes]``;
* ``model.embed(x)`` returns the pre-classifier features ``[N, D]``, and
  ``model(x) == model.classifier(model.embed(x))`` with ``model.classifier`` an ``nn.Linear``;
* ``model.feature_layers`` lists module paths (``dict(model.named_modules())`` keys) whose outputs
  are tensors usable for feature hints and attention transfer, shallow to deep;
* ``model.classifier_name`` is the module path of the classifier (``"classifier"``).

Builders are registered as ``<family>_<size>`` and take ``num_classes``, ``in_channels`` and
``image_size`` plus family-specific keywords::

    model = create_model("cnn_small", num_classes=10, in_channels=1, image_size=28)
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from kdray.core.errors import SpecError
from kdray.models import causal, cnn, mlp, rnn, transformer  # noqa: F401  (importing a family registers it)
from kdray.models.base import MODELS, Classifier
from kdray.models.hf import from_record as transformers_from_record
from kdray.models.inputs import with_inputs
from kdray.models.user import adopt, build_user_model, import_target


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``; unknown keywords raise with the builder's name."""
    try:
        return MODELS.build(name, **kwargs)
    except TypeError as e:  # a spec passed a keyword that this family does not take
        raise SpecError(f"model {name!r} does not accept these options: {e}") from None


def model_from_record(record: dict[str, Any]) -> nn.Module:
    """Rebuild the architecture an artifact's manifest records (a registry name, a user import path or a
    transformers config), reading its inputs through the view it was published with (``kwargs.inputs``)."""
    if record.get("hf"):
        return transformers_from_record(record)
    kwargs = {k: v for k, v in record["kwargs"].items() if k != "inputs"}
    if record.get("import"):
        model = build_user_model(record["import"], kwargs, record.get("classifier"))
    else:
        model = create_model(record["name"], **kwargs)
    return with_inputs(model, record["kwargs"].get("inputs"))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MODELS",
    "Classifier",
    "adopt",
    "build_user_model",
    "count_parameters",
    "create_model",
    "import_target",
    "model_from_record",
]
