"""Small helpers over state-dict keys, globs and shapes that every part of the mapping shares."""

from __future__ import annotations

import difflib
import re
from typing import Iterable, Mapping, Sequence

import torch

STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def shape_str(shape: Sequence[int]) -> str:
    """``(512, 784)`` -> ``"512x784"``; a scalar is ``"scalar"``."""
    return "x".join(str(s) for s in shape) if len(shape) else "scalar"


def strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict saved from a DDP-wrapped model has every key prefixed with ``module.``."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def close_names(pattern: str, names: Iterable[str], n: int = 5) -> list[str]:
    """Names that look like ``pattern`` (a glob or key); falls back to names sharing its first part."""
    names = list(dict.fromkeys(names))
    plain = pattern.replace("*", "").strip(".")
    hits = difflib.get_close_matches(plain, names, n=n, cutoff=0.4)
    head = plain.split(".")[0]
    hits += [c for c in names if c not in hits and head and c.startswith(head)]
    return hits[:n] or names[:n]


def quote_list(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names) if names else "(none)"


def glob_regex(glob: str) -> re.Pattern[str]:
    """``"features.*.weight"`` -> a regex whose groups capture each ``*``."""
    return re.compile("^" + "(.*)".join(re.escape(part) for part in glob.split("*")) + "$")


def fill_glob(glob: str, captures: Sequence[str]) -> str:
    parts = glob.split("*")
    return "".join(p + (captures[i] if i < len(captures) else "") for i, p in enumerate(parts))


def anchors_of(keys: Iterable[str]) -> dict[str, str]:
    """Map each running-statistics key to the key it follows (its layer's ``weight``).

    A layer without an affine ``weight`` is anchored on its ``running_mean``. The keys come out in
    the order given (state-dict order), so the plan's notes and errors do not depend on string hashing.
    """
    ordered = list(keys)
    present = set(ordered)
    follows: dict[str, str] = {}
    for k in ordered:
        module, _, leaf = k.rpartition(".")
        if leaf not in STAT_SUFFIXES:
            continue
        prefix = f"{module}." if module else ""
        anchor = prefix + "weight" if prefix + "weight" in present else prefix + "running_mean"
        if anchor != k:
            follows[k] = anchor
    return follows


def is_norm_affine(key: str, keys: set[str]) -> bool:
    """Whether ``key`` is the weight/bias of a layer that keeps running statistics."""
    module, _, leaf = key.rpartition(".")
    prefix = f"{module}." if module else ""
    return leaf in ("weight", "bias") and prefix + "running_mean" in keys


def module_paths(key: str) -> list[str]:
    """A tensor key and every module path above it: ``a.b.w`` -> ``["a", "a.b", "a.b.w"]``."""
    parts = key.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]
