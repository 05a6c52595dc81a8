"""Which knowledge to transfer: rank candidate sources (and their layers) on the target data.

``score_sources`` runs each candidate source model over the target training data (labelled rows,
at most ``limit``) and computes LogME on its pre-classifier embedding and LEEP on its softmax;
``score_layers`` computes LogME on every feature layer of one source (pooled to ``[N, C]``). Both
are cheap forward passes, so a sweep can pick its source before training anything. For a streamed
dataset (``data.stream: true``) the scored rows are the same ones, read from the shards one at a time
(:func:`streamed_target`), so scoring never holds more than one shard and the scored rows.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from kdray.contracts.checkpoint import Artifact
from kdray.core.errors import DataError, KdrayError
from kdray.data import datasets as kdata
from kdray.data import stream
from kdray.data.files import FORMAT, decode
from kdray.models.hooks import capture, embedding_and_logits
from kdray.transfer.transferability import leep, logme


def streamed_target(data_spec: Any, limit: int) -> kdata.Split | None:
    """The first ``limit`` labelled rows of a streamed dataset's training part (the rows, labels and
    order the in-memory path scores), decoded from only the shards that hold them, one at a time.

    None for shards of PNG images with ``data.transforms`` or for shards of arrays: those are
    scored as in memory (the whole training split is loaded on the driver) until this reads them too."""
    if getattr(data_spec, "transforms", None):
        return None
    plan = stream.plan(data_spec)
    if plan.meta.get("format") != FORMAT:
        return None
    ids = plan.train.x[plan.train.y >= 0][:limit]
    slot = {int(i): j for j, i in enumerate(ids.tolist())}  # row id -> position in the scored rows
    c, size = plan.meta["channels"], plan.meta["image_size"]
    x = torch.zeros(len(ids), c, size, size)
    first = 0
    for rel in plan.shards:
        with plan.store.fs.open_input_file(plan.store.path(rel)) as f:
            shard = pq.ParquetFile(f)
            n = shard.metadata.num_rows
            if any(first <= i < first + n for i in slot):
                table = shard.read(columns=["id", "image"])
                for row_id, data in zip(table.column("id").to_pylist(), table.column("image").to_pylist()):
                    if row_id in slot:
                        where = f"{plan.store.uri(rel)} row id {row_id}"
                        arr = decode(data, where, c)
                        if arr.shape != (size, size, c):
                            raise DataError(f"{where}: image {arr.shape}, dataset.json says {(size, size, c)}")
                        x[slot[row_id]] = torch.tensor(arr).permute(2, 0, 1).float().div_(255.0)
        first += n
    return replace(plan.train, x=x, y=plan.train.y[plan.train.y >= 0][:limit])


def labelled_target(data_spec: Any, limit: int) -> tuple[torch.Tensor, np.ndarray, int]:
    split = streamed_target(data_spec, limit) if getattr(data_spec, "stream", False) else None
    if split is None:
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
        with capture(model, paths, "source") as got:  # a user's model has no .classifier: hook its head
            e, z = embedding_and_logits(model, x[i : i + batch_size])
        logits.append(z)
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
