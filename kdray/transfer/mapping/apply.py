"""Carrying out a plan: copy, adapt or re-initialise every target tensor in place."""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import torch
import torch.nn as nn

from kdray.core.errors import KdrayError
from kdray.models.hooks import unwrap
from kdray.transfer.mapping.adapters import adapt_tensor
from kdray.transfer.mapping.keys import strip_module_prefix
from kdray.transfer.mapping.report import Entry, TransferReport


def apply_transfer(target: nn.Module, source_state: Mapping[str, torch.Tensor], plan: TransferReport) -> TransferReport:
    """Carry out ``plan`` on ``target`` in place and return the report.

    Tensors re-initialised by a ``reinit`` rule get their owning module's ``reset_parameters()``
    (other tensors of that module are restored afterwards); copied tensors are bit-equal to the
    source; adapted ones are computed by :func:`adapt_tensor`.
    """
    model = unwrap(target)
    source = strip_module_prefix(source_state)
    state = model.state_dict(keep_vars=True)
    planned = {e.key: e.shape for e in plan.entries}
    actual = {k: tuple(v.shape) for k, v in state.items()}
    if planned != actual:
        diff = sorted(set(planned.items()) ^ set(actual.items()))[:6]
        raise KdrayError(
            f"the transfer plan was made for a different target model; differing (key, shape): {diff}.",
            hint="Call plan_transfer on the same model you pass to apply_transfer.",
        )
    report = plan.copy()
    by_key = report.by_key()

    with torch.no_grad():
        reset = defaultdict(list)
        for e in report.entries:
            if e.reset:
                reset[e.key.rpartition(".")[0]].append(e.key)
        for path, keys in reset.items():
            module = model.get_submodule(path) if path else model
            if not hasattr(module, "reset_parameters"):
                for k in keys:
                    by_key[k].reason = (
                        by_key[k].reason or ""
                    ) + f"; module {path or '<root>'!r} has no reset_parameters(), target value kept"
                continue
            prefix = f"{path}." if path else ""
            others = {
                k: v.detach().clone()
                for k, v in state.items()
                if k.startswith(prefix) and "." not in k[len(prefix) :] and k not in keys
            }
            module.reset_parameters()  # type: ignore[operator]  # torch: Module.__getattr__
            for k, v in others.items():
                state[k].copy_(v)

        for e in report.entries:
            if e.status in ("copied", "adapted"):
                state[e.key].copy_(source_value(e, source))
    return report


def source_value(entry: Entry, source_state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The value ``entry``'s target tensor takes from ``source_state`` (copied or adapted)."""
    assert entry.source is not None, f"{entry.key} takes no source tensor"
    src = source_state[entry.source]
    if tuple(src.shape) != entry.shape:
        src, _ = adapt_tensor(entry.op or "copy", src, entry.shape)
    return src
