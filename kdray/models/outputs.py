"""Model outputs as the zoos return them, turned into logits where a model is adopted.

kdray's loop, losses, cache, evaluation, latency measurement and exporters call ``model(x)`` and
read a logits tensor ``[N, K]``. A Hugging Face model returns a ``ModelOutput`` (``.logits``),
other code a dict with ``"logits"`` or a tuple whose first item is the logits. :func:`logits_only`
changes such a model, in place, into an instance of a subclass of its own class whose ``forward``
returns the logits tensor: the module tree, the parameter names (``state_dict`` keys, so a Hugging
Face model's weights stay loadable by ``from_pretrained``), ``isinstance`` and every attribute are
those of the user's class. It is applied once, by :func:`kdray.models.user.adopt`, where every
stage builds its networks. The same ``forward`` first applies the network's own input view when it
has one (``kdray_input_view``: :mod:`kdray.models.inputs`).

The subclass also gives the network kdray's ``embed`` (the classifier's input, read with a hook). It
is made once per class and pickles (Ray ships a teacher to its inference actors) and
deep-copies as "the user's class, made logits-only" (:func:`_rebuild`), so the class itself never
needs to be importable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from kdray.core.errors import KdrayError

_CLASSES: dict[type, type] = {}


def as_logits(out: Any, where: str = "model") -> torch.Tensor:
    """A forward's result as its logits: a tensor itself, ``out["logits"]`` of a mapping (a Hugging Face
    ``ModelOutput`` is one), or the first item of a tuple or list."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        logits = out.get("logits")
        if isinstance(logits, torch.Tensor):
            return logits
        raise KdrayError(
            f"{where} returns a {type(out).__name__} without a 'logits' tensor (it has {', '.join(map(str, out))})",
            hint="A model's forward must return the class scores: a tensor [N, classes], a dict or Hugging Face "
            "ModelOutput with 'logits', or a tuple whose first item is the logits.",
        )
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise KdrayError(
        f"{where} returns a {type(out).__name__}, not logits",
        hint="A model's forward must return the class scores: a tensor [N, classes], a dict or Hugging Face "
        "ModelOutput with 'logits', or a tuple whose first item is the logits.",
    )


def _forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    base = type(self).kdray_outputs_of  # type: ignore[attr-defined]  # set on the subclass below
    view = self.__dict__.get("kdray_input_view")  # the network's own input size/normalisation (models/inputs.py)
    if view is not None and args:
        args = (view(args[0]), *args[1:])
    return as_logits(base.forward(self, *args, **kwargs), f"model {base.__name__}")


def _embed(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The classifier's input (read with a pre-hook while the network runs its own forward)."""
    from kdray.models.hooks import classifier_name, resolve_modules

    name = classifier_name(self)  # looked up on ``self``: a deep copy hooks its own classifier
    module = resolve_modules(self, [name], "model")[name]
    captured: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        self(x)
    finally:
        handle.remove()
    return captured[-1]


def _own_embed(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A kdray model's own ``embed``, on the network's view of the inputs."""
    view = self.__dict__.get("kdray_input_view")
    return type(self).kdray_outputs_of.embed(self, view(x) if view is not None else x)  # type: ignore[attr-defined]


def _reduce_ex(self: nn.Module, protocol: Any) -> tuple[Any, ...]:
    return (_rebuild, (type(self).kdray_outputs_of,), self.__dict__)  # type: ignore[attr-defined]


def _rebuild(base: type) -> nn.Module:
    """An empty instance of ``base`` made logits-only (pickle then sets its ``__dict__``)."""
    cls = logits_class(base)
    return object.__new__(cls)  # no __init__: pickle restores the state


def logits_class(base: type) -> type:
    """The subclass of ``base`` whose ``forward`` returns the logits tensor (one per class)."""
    if getattr(base, "kdray_outputs_of", None) is not None:
        return base
    if base not in _CLASSES:
        kdray_model = isinstance(getattr(base, "classifier_name", None), str) and callable(getattr(base, "embed", None))
        _CLASSES[base] = type(
            base.__name__,  # the user's class name: messages, and config.json's architectures, stay the same
            (base,),
            {
                "forward": _forward,
                "embed": _own_embed if kdray_model else _embed,
                "__reduce_ex__": _reduce_ex,
                "kdray_outputs_of": base,
                "__module__": base.__module__,
                "__qualname__": base.__qualname__,
                "__doc__": base.__doc__,
            },
        )
    return _CLASSES[base]


def logits_only(model: nn.Module) -> nn.Module:
    """``model`` with a ``forward`` that returns the logits tensor (in place; the same object)."""
    model.__class__ = logits_class(type(model))
    return model


def original_class(model: nn.Module) -> type:
    """The user's class of a model made logits-only (``type(model)`` otherwise)."""
    return getattr(type(model), "kdray_outputs_of", None) or type(model)


def is_transformers_model(model: nn.Module) -> bool:
    """A ``transformers`` ``PreTrainedModel`` (told without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers") for c in type(model).__mro__)


def block_layers(model: nn.Module) -> tuple[str, ...]:
    """The module paths of a network's blocks, shallow to deep: the children of its longest ``nn.ModuleList``
    (a transformer's ``encoder.layer``, a ResNet's ``encoder.stages``); empty when it has none."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return ()
    name, blocks = max(lists, key=lambda item: len(item[1]))  # the first of the longest: the main stack
    return tuple(f"{name}.{i}" for i in range(len(blocks)))
