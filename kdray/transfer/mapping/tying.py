"""Parameter sharing: tie modules of two networks so that they hold one tensor per shared weight."""

from __future__ import annotations

import fnmatch
from typing import Sequence

import torch.nn as nn

from kdray.core.errors import KdrayError
from kdray.models.hooks import unwrap
from kdray.transfer.mapping.keys import close_names, quote_list


def tie_modules(net_a: nn.Module, net_b: nn.Module, globs: Sequence[str]) -> list[str]:
    """Make the modules of ``net_b`` selected by ``globs`` the very module objects of ``net_a``.

    ``W_shared = W_a ∩ W_b``: after tying, both networks hold one tensor per shared weight, so a
    step through either network updates what the other sees. A selected path must exist in both
    networks with the same class and the same tensor names and shapes. When a path and paths below
    it are selected, the highest one is tied. Returns the tied module paths.
    """
    a, b = unwrap(net_a), unwrap(net_b)
    mods_a, mods_b = dict(a.named_modules()), dict(b.named_modules())
    selected: list[str] = []
    for g in globs:
        hit = [p for p in mods_b if p and fnmatch.fnmatchcase(p, g)]
        if not hit:
            raise KdrayError(
                f"shared glob {g!r} matches no module of the second network; close module paths: "
                f"{quote_list(close_names(g, [p for p in mods_b if p]))}.",
                where="shared",
            )
        selected += [p for p in hit if p not in selected]
    top = [p for p in selected if not any(p.startswith(q + ".") for q in selected if q != p)]
    for p in top:
        if p not in mods_a:
            raise KdrayError(
                f"module {p!r} of the second network has no counterpart in the first; close paths there: "
                f"{quote_list(close_names(p, [q for q in mods_a if q]))}.",
                where="shared",
            )
        ma, mb = mods_a[p], mods_b[p]
        sa = {k: tuple(v.shape) for k, v in ma.state_dict().items()}
        sb = {k: tuple(v.shape) for k, v in mb.state_dict().items()}
        if type(ma) is not type(mb) or sa != sb:
            diff = sorted(set(sa.items()) ^ set(sb.items()))[:6]
            raise KdrayError(
                f"cannot tie {p!r}: first network has {type(ma).__name__} with "
                f"{len(sa)} tensors, second has {type(mb).__name__} with {len(sb)}; differing "
                f"(name, shape): {diff}.",
                where="shared",
                hint="Tie only modules whose tensors have the same names and shapes in both networks.",
            )
    for p in top:
        parent, _, attr = p.rpartition(".")
        setattr(b.get_submodule(parent) if parent else b, attr, mods_a[p])
    return top
