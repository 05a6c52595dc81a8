"""Which knowledge to transfer: rank candidate sources (and their layers) on the target data.

``score_sources`` runs each candidate source model over the target training data (labelled rows,
at most ``limit``) and computes LogME on its pre-classifier embedding and LEEP on its softmax;
``score_layers`` computes LogME on every feature layer of one source (pooled to ``[N, C]``). Both
are cheap forward passes, so a sweep can pick its source before training anything.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kdray.core import data as kdata
from kdray.core.checkpoint import Artifact
from kdray.core.errors import KdrayError
from kdray.core.hooks import capture
from kdray.transfer.transferability import leep, logme


def labelled_target(data_spec: Any, limit: int) -> tuple[torch.Tensor, np.ndarray, int]:
    split = kdata.load(data_spec, "train")
    keep = (split.y >= 0).nonzero().flatten()[:limit]
    if len(keep) < 2 * split.num_classes:
        raise KdrayError(
            f"only {len(keep)} labelled target examples: too few to score sources ({split.num_classes} classes)",
            hint="Use more labels (data.labels_per_class) for scoring.",
        )
    return kdata.normalize(split.x[keep], split), split.y[keep].numpy(), split.num_classes


@torch.no_grad()
def _run(model: torch.nn.Module, x: torch.Tensor, paths: list[str], batch_size: int = 512):
    model.eval()
    logits, embeds = [], []
    feats: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    for i in range(0, len(x), batch_size):
        with capture(model, paths, "source") as got:
            e = model.embed(x[i : i + batch_size])  # type: ignore[operator]  # torch: Module.__getattr__
            logits.append(model.classifier(e))  # type: ignore[operator]  # torch: Module.__getattr__
        embeds.append(e)
        for p in paths:
            f = got[p]
            feats[p].append(f.mean(dim=(2, 3)) if f.dim() == 4 else f.mean(dim=1) if f.dim() == 3 else f)
    return torch.cat(logits), torch.cat(embeds), {p: torch.cat(v) for p, v in feats.items()}


def check_input(art: Artifact, x: torch.Tensor, ref: str) -> None:
    kw = art.manifest["model"]["kwargs"]
    if (kw["in_channels"], kw["image_size"]) != (x.shape[1], x.shape[-1]):
        raise KdrayError(
            f"source {ref!r} takes {kw['in_channels']}x{kw['image_size']}x{kw['image_size']} inputs but "
            f"the target data is {x.shape[1]}x{x.shape[-1]}x{x.shape[-1]}",
            hint="Score sources trained on inputs of the target's shape.",
        )


def score_sources(candidates: dict[str, Artifact], data_spec: Any, limit: int = 3000) -> list[dict[str, Any]]:
    """Rows ``{ref, uri, model, logme, leep, rank}`` best first (by LogME)."""
    x, y, k = labelled_target(data_spec, limit)
    rows = []
    for ref, art in candidates.items():
        check_input(art, x, ref)
        logits, emb, _ = _run(art.build_model(), x, [])
        rows.append(
            {
                "ref": ref,
                "uri": art.uri,
                "model": art.manifest["model"]["name"],
                "logme": logme(emb.double().numpy(), y),
                "leep": leep(torch.softmax(logits.double(), 1).numpy(), y, k),
            }
        )
    rows.sort(key=lambda r: -r["logme"])
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    return rows


def score_layers(art: Artifact, data_spec: Any, limit: int = 3000) -> list[dict[str, Any]]:
    """LogME of each of the source's feature layers (4-D maps pooled over space, sequences over time)."""
    x, y, _ = labelled_target(data_spec, limit)
    check_input(art, x, art.uri)
    model = art.build_model()
    paths = list(model.feature_layers)  # type: ignore[arg-type]  # torch: Module.__getattr__
    _, emb, feats = _run(model, x, paths)
    rows = [{"layer": p, "dims": int(f.shape[1]), "logme": logme(f.double().numpy(), y)} for p, f in feats.items()]
    rows.append({"layer": "embed", "dims": int(emb.shape[1]), "logme": logme(emb.double().numpy(), y)})
    return sorted(rows, key=lambda r: -r["logme"])
