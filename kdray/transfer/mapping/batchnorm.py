"""Batch-norm modes (``batchnorm: train | eval | frozen``) and the eval mode of frozen layers."""

from __future__ import annotations

import fnmatch
from typing import Sequence

import torch.nn as nn

from kdray.core.errors import KdrayError
from kdray.models.hooks import unwrap
from kdray.transfer.mapping.keys import module_paths
from kdray.transfer.mapping.layers import layer_actions
from kdray.transfer.mapping.specs import TransferSpec


def _bn_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_batchnorm_mode(model: nn.Module, mode: str, select_globs: Sequence[str] | None = None) -> list[str]:
    """Put batch-norm layers in ``mode``; call it after every ``model.train()``, which undoes it.

    * ``train``: leave them as ``model.train()/eval()`` set them;
    * ``eval``: normalise with the running statistics and stop updating them (affine still trains);
    * ``frozen``: ``eval`` plus ``requires_grad=False`` on the affine weight and bias.

    ``select_globs`` limits the change to layers whose path (or a path above it) matches a glob;
    None selects every batch-norm layer. Returns the module paths changed.
    """
    if mode not in ("train", "eval", "frozen"):
        raise KdrayError(f"batchnorm mode {mode!r} is not one of train, eval, frozen.", where="transfer.batchnorm")
    if mode == "train":
        return []
    done = []
    for name, m in _bn_modules(unwrap(model)):
        if select_globs is not None and not any(
            fnmatch.fnmatchcase(c, g) for g in select_globs for c in module_paths(name)
        ):
            continue
        m.eval()
        if mode == "frozen":
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
        done.append(name)
    return done


def apply_batchnorm_rules(model: nn.Module, spec: TransferSpec) -> list[str]:
    """Apply ``spec.batchnorm`` to every batch-norm layer, and ``eval`` to those inside frozen layers.

    A frozen layer must compute the same function throughout training; its batch-norm layers would
    otherwise keep updating their running statistics. Returns the module paths set to eval/frozen.
    """
    inner = unwrap(model)
    done = set(set_batchnorm_mode(inner, spec.batchnorm))
    if spec.layers:
        actions = layer_actions(inner, spec)
        frozen = []
        for n, m in _bn_modules(inner):
            rule = actions.get(f"{n}.weight" if m.affine else f"{n}.running_mean", (None, None))[1]
            if rule is not None and rule.action == "freeze":
                frozen.append(n)
        if frozen:
            done |= set(set_batchnorm_mode(inner, "eval", frozen))
    return sorted(done)
