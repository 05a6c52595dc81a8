"""Reading inside a model: forward hooks by module path, and the pre-classifier embedding.

Model outputs travel as :class:`Outputs`: logits ``[N, K]``, the hooked outputs of the module
paths asked for, and optionally the embedding ``[N, D]`` (the classifier's input, read with a
pre-hook so the model runs through its own ``forward`` and DDP still syncs).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from kdray.core.errors import KdrayError
from kdray.core.registry import close_matches


@dataclass
class Outputs:
    """What one forward pass of a model hands to the losses.

    Attributes:
        logits: ``[N, K]`` class scores.
        features: module path -> that module's output (``[N, C, H, W]``, ``[N, L, D]`` or ``[N, D]``).
        embedding: ``model.embed(x)``, ``[N, D]``; ``None`` when not asked for (or a cached teacher).
        topk_ids: a causal LM teacher's top-k token ids ``[N, T, k]`` from a sequence cache; ``logits``
            then holds their log-probabilities ``[N, T, k]`` (``kdray.distill.seqcache``).
    """

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    embedding: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Hooks: read intermediate outputs by module path.


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel wrappers (whose parameter names carry ``module.``)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def resolve_modules(model: nn.Module, paths: Sequence[str], role: str = "model") -> dict[str, nn.Module]:
    """Map each path to its module, or raise a KdrayError listing the close names.

    Args:
        model: the network (DDP wrappers are looked through).
        paths: keys of ``dict(model.named_modules())``, e.g. ``"features.1"``.
        role: how the error names the model ("student", "teacher").
    """
    if not paths:  # the common case, called every step: no module walk at all
        return {}
    inner = unwrap(model)
    modules = dict(inner.named_modules())
    found = {}
    for path in paths:
        if path not in modules or path == "":
            names = [n for n in modules if n]
            close = close_matches(path, names)
            layers = tuple(getattr(inner, "feature_layers", ()))
            # Not did_you_mean's full list: a ViT has hundreds of module paths; the close ones and
            # the model's declared feature layers are what the user needs.
            raise KdrayError(
                f"{role} {type(inner).__name__} has no module {path!r}; "
                + (f"did you mean {' or '.join(map(repr, close))}? " if close else "")
                + (f"Its feature layers are: {', '.join(layers)}. " if layers else "")
                + "Any key of dict(model.named_modules()) can be hooked."
            )
        found[path] = modules[path]
    return found


def find_classifier(model: nn.Module, name: str | None = None, role: str = "model") -> str:
    """The classifier's module path: ``name``, the model's ``classifier_name``, or its last ``nn.Linear``."""
    inner = unwrap(model)
    name = name or getattr(inner, "classifier_name", None)
    if name:
        module = resolve_modules(inner, [name], role)[name]
        if not any(True for _ in module.parameters()) and not isinstance(module, nn.Linear):
            raise KdrayError(f"{role}: classifier {name!r} is a {type(module).__name__} with no parameters")
        return name
    linears = [n for n, m in inner.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise KdrayError(
            f"{role} {type(inner).__name__} has no nn.Linear, so its classifier cannot be found; set "
            "model.classifier to the module path of the layer that maps the embedding to the class scores "
            "(see `kdray inspect SPEC --stage NAME`)."
        )
    return linears[-1]


def classifier_name(model: nn.Module) -> str:
    """The module path of a model's classifier (kdray models and adopted user models set ``classifier_name``)."""
    return getattr(unwrap(model), "classifier_name", None) or find_classifier(model)


def _as_tensor(output: Any, path: str) -> torch.Tensor:
    # Recurrent modules return (sequence, hidden): the sequence is the feature; a Hugging Face block or
    # backbone returns a ModelOutput (a mapping): its first tensor (last_hidden_state) is.
    if isinstance(output, Mapping):
        output = next((v for v in output.values() if isinstance(v, torch.Tensor)), output)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise KdrayError(
            f"module {path!r} returns {type(output).__name__}, not a tensor; hook a module whose output "
            "is a tensor (see the model's feature_layers)."
        )
    return output


@contextmanager
def capture(model: nn.Module, paths: Sequence[str], role: str = "model") -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks on ``paths`` for the duration of the ``with`` block.

    Yields a dict that fills with ``path -> output tensor`` as the model runs (a module called twice
    keeps its last output; a tuple output keeps its first element, e.g. a GRU's sequence). The hooks
    are removed on exit, also when the forward raises.

        with capture(model, ["features.1"]) as feats:
            logits = model(x)
        feats["features.1"]  # [N, 64, 7, 7]

    Raises:
        KdrayError: a path is not a module of the model (the message lists close names).
    """
    modules = resolve_modules(model, paths, role)
    store: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(path: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            store[path] = _as_tensor(output, path)

        return hook

    try:
        for path, module in modules.items():
            handles.append(module.register_forward_hook(hook_for(path)))
        yield store
    finally:
        for h in handles:
            h.remove()


def forward_with_features(
    model: nn.Module, x: torch.Tensor, paths: Sequence[str] = (), embedding: bool = False, role: str = "model"
) -> Outputs:
    """Run ``model(x)`` once and collect logits, hooked features and (optionally) the embedding.

    The embedding is read with a pre-hook on ``model.classifier`` (its input is ``model.embed(x)``
    by the model contract), so the model runs through its own ``forward`` and DDP still syncs.

    Args:
        model: a kdray model (or a DDP wrapper of one).
        x: inputs ``[N, C, H, W]``.
        paths: module paths to hook (a loss's ``student_layers`` / ``teacher_layers``).
        embedding: also return the pre-classifier features ``[N, D]``.
        role: how errors name the model.

    Returns:
        Outputs(logits [N, K], features {path: tensor}, embedding [N, D] or None).
    """
    paths = list(dict.fromkeys(paths))
    head = classifier_name(model)
    modules = resolve_modules(model, paths + ([head] if embedding else []), role)
    emb: list[torch.Tensor] = []
    handle = modules[head].register_forward_pre_hook(lambda _m, inputs: emb.append(inputs[0])) if embedding else None
    try:
        with capture(model, paths, role) as feats:
            logits = model(x)
    finally:
        if handle is not None:
            handle.remove()
    missing = [p for p in paths if p not in feats]
    if missing:
        raise KdrayError(
            f"{role} modules {missing} did not run during forward, so they have no output to distil; "
            "choose paths from the model's feature_layers."
        )
    return Outputs(logits=logits, features=dict(feats), embedding=emb[-1] if emb else None)


def embedding_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``model(x)`` call returning ``(embedding [N, D], logits [N, K])``; the classifier must run once."""
    head = classifier_name(model)
    classifier = resolve_modules(model, [head])[head]
    captured: list[torch.Tensor] = []
    hook = classifier.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        logits = model(x)
    finally:
        hook.remove()
    if len(captured) != 1:
        raise KdrayError(
            f"the classifier {head!r} ran {len(captured)} times in one forward; it must run exactly "
            "once (model(x) == classifier(embedding))."
        )
    return captured[0], logits
