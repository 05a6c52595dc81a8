"""Adapters: make a source tensor fit a target shape (``slice``, ``repeat_channels``), or say why not."""

from __future__ import annotations

from typing import Sequence

import torch

from kdray.transfer.mapping.keys import shape_str


def uniform_indices(n_source: int, n_target: int) -> torch.Tensor:
    """``n_target`` indices spread evenly over ``range(n_source)``: ``i * n_source // n_target``.

    512 -> 256 takes every other index (0, 2, ..., 510). The same formula on both sides of a
    hidden layer picks the same units as rows of layer l and columns of layer l+1, so a network
    sliced this way keeps a consistent sub-network of the source. When the source width is an
    integer multiple k of the target's, packed blocks (GRU gates ``[3H, .]``, attention
    ``in_proj [3D, D]``) stay aligned too: block g unit j of the target is block g unit j·k of the source.
    """
    return torch.arange(n_target) * n_source // n_target


def cannot_adapt(op: str, source_shape: Sequence[int], target_shape: Sequence[int]) -> str | None:
    """Why ``op`` cannot turn a source tensor of ``source_shape`` into ``target_shape`` (None: it can)."""
    s, t = tuple(source_shape), tuple(target_shape)
    if s == t:
        return None
    if op == "copy":
        return "copy needs equal shapes"
    if len(s) != len(t):
        return f"{op} needs tensors with the same number of dimensions ({len(s)} vs {len(t)})"
    if op == "slice":
        bigger = [f"dim {d}: target {t[d]} > source {s[d]}" for d in range(len(t)) if t[d] > s[d]]
        return (
            f"slice needs the target no larger than the source on every dim ({'; '.join(bigger)})" if bigger else None
        )
    if op == "repeat_channels":
        other = [d for d in range(len(t)) if d != 1 and t[d] != s[d]]
        if len(t) < 2 or other:
            return (
                "repeat_channels changes only dim 1 (input channels) of a weight [out, in, ...]; "
                f"dims {other} differ too"
            )
        return None
    return f"op {op!r} does not adapt shapes"


def adapt_tensor(op: str, source: torch.Tensor, target_shape: Sequence[int]) -> tuple[torch.Tensor, str | None]:
    """Produce a tensor of ``target_shape`` from ``source``; returns it and how (None: a plain copy).

    * ``slice``: along every dim where the target is smaller, keep :func:`uniform_indices`.
      A Linear 512->256 (weight 512x784 -> 256x784) keeps rows 0, 2, ..., 510.
    * ``repeat_channels``: a conv weight ``[O, C_src, kh, kw]`` becomes ``[O, C_tgt, kh, kw]`` by
      averaging over the source input channels, repeating the mean ``C_tgt`` times and scaling by
      ``C_src / C_tgt``: ``w_tgt[:, j] = (1 / C_tgt) · Σ_c w_src[:, c]``. For an input whose
      channels are all equal (a grey image fed as RGB, or RGB as grey) the target layer then gives
      exactly the source layer's output, so activations keep their scale (3 -> 1 sums the RGB
      filters; 1 -> 3 splits the grey filter in thirds).
    """
    s, t = tuple(source.shape), tuple(target_shape)
    reason = cannot_adapt(op, s, t)
    if reason is not None:
        raise ValueError(reason)
    if s == t:
        return source, None
    if op == "slice":
        out = source
        for d in range(len(t)):
            if t[d] < s[d]:
                out = out.index_select(d, uniform_indices(s[d], t[d]).to(out.device))
        return out, f"slice {shape_str(s)} -> {shape_str(t)}"
    if op == "repeat_channels":
        c_src, c_tgt = s[1], t[1]
        mean = source.mean(dim=1, keepdim=True) * (c_src / c_tgt)
        out = mean.expand(*t[:1], c_tgt, *t[2:]).contiguous()
        return out, f"repeat_channels {c_src}->{c_tgt}"
    raise ValueError(f"op {op!r} does not adapt shapes")


def adapt_description(op: str, source_shape: Sequence[int], target_shape: Sequence[int]) -> str:
    """The ``how`` text of an adapted tensor, without computing it."""
    if op == "repeat_channels":
        return f"repeat_channels {source_shape[1]}->{target_shape[1]}"
    return f"{op} {shape_str(source_shape)} -> {shape_str(target_shape)}"
