"""Layer rules (``layers:``): which rule selects each target tensor, and the optimizer groups they make."""

from __future__ import annotations

import fnmatch
from typing import Any

import torch.nn as nn

from kdray.core.errors import KdrayError
from kdray.models.hooks import unwrap
from kdray.transfer.mapping.keys import close_names, is_norm_affine, module_paths, quote_list
from kdray.transfer.mapping.specs import LayerRule, TransferSpec


def layer_actions(model: nn.Module, spec: TransferSpec) -> dict[str, tuple[int, LayerRule]]:
    """For each target state-dict key, the first layer rule that selects it (``(index, rule)``).

    A rule selects a tensor when its glob matches the tensor's key or any module path above it,
    so ``features.0``, ``features.0.*`` and ``features.0.0.weight`` all select
    ``features.0.0.weight``. A rule that selects nothing is an error listing close module paths.
    """
    model = unwrap(model)
    keys = list(model.state_dict().keys())
    modules = [name for name, _ in model.named_modules() if name]
    out: dict[str, tuple[int, LayerRule]] = {}
    for i, rule in enumerate(spec.layers):
        hit = [k for k in keys if any(fnmatch.fnmatchcase(c, rule.select) for c in module_paths(k))]
        if not hit:
            raise KdrayError(
                f"select {rule.select!r} matches no module or tensor of the target; close module paths: "
                f"{quote_list(close_names(rule.select, modules))}.",
                where=f"transfer.layers[{i}]",
                hint="Globs are matched against module paths such as 'features.0' (see model.named_modules()).",
            )
        for k in hit:
            out.setdefault(k, (i, rule))
    return out


def apply_layer_rules(target: nn.Module, spec: TransferSpec) -> list[dict[str, Any]]:
    """Freeze what the ``layers`` rules (and ``batchnorm: frozen``) freeze; return optimizer param groups.

    Frozen parameters get ``requires_grad=False`` and are left out of the groups (as are parameters
    that were already frozen). Returns ``[{"params": [...], "names": [...], "lr_scale": s}, ...]``,
    one group per distinct scale, scale 1.0 for parameters no ``lr_scale`` rule selects; the loop
    sets each group's ``lr = base_lr * lr_scale`` (and keeps the ratio under its scheduler).
    Call before wrapping the model in DDP, which needs to know which parameters train.
    """
    model = unwrap(target)
    actions = layer_actions(model, spec)
    keys = set(model.state_dict().keys())
    groups: dict[float, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        action = actions.get(name, (None, None))[1]
        if (action is not None and action.action == "freeze") or (
            spec.batchnorm == "frozen" and is_norm_affine(name, keys)
        ):
            p.requires_grad_(False)
            continue
        if not p.requires_grad:
            continue
        scale = float(action.lr_scale or 1.0) if action is not None and action.action == "lr_scale" else 1.0
        g = groups.setdefault(scale, {"params": [], "names": [], "lr_scale": scale})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())
