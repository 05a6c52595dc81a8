"""The teacher cache of a causal LM: its top-k next-token log-probabilities at every position of every row.

A full-logit cache of a language model holds ``rows × positions × vocab`` floats, far more than the
tokens themselves; offline LM distillation keeps the teacher's ``k`` most likely next tokens instead.
The cache lives where the classifier cache does (``<root>/_cache/teacher/<key>/``, the same chunk
writer, ``meta.json`` as the commit point and a sha256 per chunk checked on every read:
``kdray.distill.cache``); each chunk holds, for its rows and each position ``t < T - 1`` (positions
that have a next token):

* ``ids``: the teacher's top-k token ids, most likely first (int16 when the vocabulary fits, else int32);
* ``values``: their log-probabilities at temperature 1, as ``float32``, ``float16`` or ``int8``
  (``quantize``; int8 maps each position's ``[lo, hi]`` to 255 steps and stores ``lo`` and ``hi`` as
  float16).

It is built once per (teacher weights, data, ``k``, quantisation) by Ray Data batch inference over the
streamed shards (``data.stream``) or, for in-memory data, by the teacher on the driver, batch by batch:
either way the teacher's top-k is taken where it runs (:class:`TopK`) and only ids and values travel.
Every student of a sweep on the same data and teacher reads the same cache; with ``data.stream`` each
Ray Data training batch gets its rows' ``teacher_logits`` (values) and ``teacher_topk_ids`` beside the
tokens (:func:`attach_topk`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from kdray.contracts.checkpoint import Artifact, bytes_to_state, sha256
from kdray.contracts.specs import Spec, spec_hash
from kdray.contracts.stage import StageContext
from kdray.core import layout
from kdray.core.errors import KdrayError
from kdray.core.storage import Storage
from kdray.data import datasets as kdata
from kdray.data import stream
from kdray.distill.cache import CACHE_FORMAT, ChunkWriter, cached_meta, chunk_name, given, read_cache_meta

CHUNK_BYTES = 8 << 20  # about 8 MiB a chunk
BATCH = 64  # rows a driver-side teacher batch


class TopKCacheSpec(Spec):
    """``teacher_topk`` of a distill stage on a text dataset: what the sequence cache keeps per position."""

    k: int = Field(32, ge=1, le=4096)
    quantize: Literal["none", "fp16", "int8"] = "fp16"


class TopK(nn.Module):
    """A causal LM's top-k next-token log-probabilities, packed as one float tensor ``[N, T - 1, 2k]``
    (ids as floats, exact below 2**24, then values), which is what batch inference hands back."""

    def __init__(self, teacher: nn.Module, k: int):
        super().__init__()
        self.teacher, self.k = teacher, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.teacher(x)[:, :-1].float()
        values, ids = F.log_softmax(logits, -1).topk(min(self.k, logits.shape[-1]), -1)
        return torch.cat([ids.float(), values], -1)


def encode(packed: Any, vocab: int, quantize: str) -> dict[str, torch.Tensor]:
    """Packed ``[n, L, 2k]`` -> the chunk's tensors (``ids``, ``values`` and for int8 ``lo``/``hi``)."""
    packed = torch.as_tensor(packed).float()
    k = packed.shape[-1] // 2
    ids = packed[..., :k].round().to(torch.int16 if vocab <= 2**15 else torch.int32)
    values = packed[..., k:]
    if quantize == "fp16":
        return {"ids": ids, "values": values.half()}
    if quantize == "int8":
        lo, hi = values.amin(-1, keepdim=True), values.amax(-1, keepdim=True)
        steps = ((values - lo) / (hi - lo).clamp_min(1e-6) * 255).round() - 128
        return {"ids": ids, "values": steps.to(torch.int8), "lo": lo.half(), "hi": hi.half()}
    return {"ids": ids, "values": values}


def decode(chunk: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk's tensors -> (ids int32, log-probabilities float32), both ``[n, L, k]``."""
    values = chunk["values"]
    if values.dtype == torch.int8:
        lo, hi = chunk["lo"].float(), chunk["hi"].float()
        values = (values.float() + 128) / 255 * (hi - lo) + lo
    return chunk["ids"].int(), values.float()


def bytes_per_token(meta: dict[str, Any]) -> float:
    """Stored bytes of a cached position (ids, values and int8 scales)."""
    k = meta["topk"]["k"]
    id_bytes = 2 if meta["num_classes"] <= 2**15 else 4
    value_bytes = {"none": 4, "fp16": 2, "int8": 1}[meta["topk"]["quantize"]]
    return k * (id_bytes + value_bytes) + (4 if meta["topk"]["quantize"] == "int8" else 0)


def seq_cache_key(teacher: Artifact, data_fingerprint: str, topk: TopKCacheSpec) -> str:
    return spec_hash(
        {
            "format": CACHE_FORMAT,
            "kind": "topk",
            "teacher": teacher.weights_sha256,
            "data": data_fingerprint,
            "topk": topk.model_dump(),
        }
    )[:16]


def ensure_seq_cache(ctx: StageContext, teacher: Artifact, topk: TopKCacheSpec) -> str:
    """The URI of the top-k cache of this teacher on this stage's training rows, built if missing or stale."""
    spec = ctx.stage.data
    if spec.stream:
        plan = stream.plan(spec)
        rows, fingerprint, seq_len = plan.rows, f"{plan.meta['fingerprint']}-train", plan.meta["shape"][0]
        vocab = plan.meta["num_classes"]
    else:
        train = kdata.load(spec, "train")
        rows, fingerprint, seq_len, vocab = len(train), train.fingerprint, train.x.shape[1], train.num_classes
    store = layout.teacher_cache(ctx.root, seq_cache_key(teacher, fingerprint, topk))
    meta = read_cache_meta(store)
    if meta is not None and meta.get("rows") == rows and meta.get("data_fingerprint") == fingerprint:
        ctx.log(f"[{ctx.stage.name}] teacher top-k cache hit: {store.uri()} ({rows:,} rows)")
        return store.uri()
    how = "Ray Data batch inference" if spec.stream else "the teacher on the driver"
    ctx.log(f"[{ctx.stage.name}] building teacher top-k cache (k={topk.k}, {topk.quantize}) at {store.uri()} ({how})")
    k = min(topk.k, vocab)
    per_row = (seq_len - 1) * k * 8
    writer = ChunkWriter(
        store,
        rows,
        ctx.tasks()(f"[{ctx.pipeline.name}/{ctx.stage.name}] teacher top-k cache", rows, "rows"),
        max(1, CHUNK_BYTES // per_row),
    )

    def sink(ids: Any, packed: Any) -> None:
        writer(ids, encode(packed, vocab, topk.quantize))

    model = TopK(teacher.build_model(), k)
    t0 = time.perf_counter()
    with contextlib.closing(writer.task):
        if spec.stream:
            ctx.stream_inference(ctx.job(), functools.partial(given, model), sink)
        else:
            model.eval()
            with torch.no_grad():
                for i in range(0, rows, BATCH):
                    sink(np.arange(i, min(i + BATCH, rows)), model(train.x[i : i + BATCH]))
    seconds = time.perf_counter() - t0
    meta = writer.finish(
        {
            "kind": "topk",
            "teacher_uri": teacher.uri,
            "teacher_sha256": teacher.weights_sha256,
            "data_fingerprint": fingerprint,
            "num_classes": vocab,
            "positions": seq_len - 1,
            "topk": {"k": k, "quantize": topk.quantize},
        },
        seconds,
    )
    per_token = bytes_per_token(meta)
    ctx.log(
        f"[{ctx.stage.name}] teacher top-k cache: {rows * (seq_len - 1):,} positions in {seconds:.1f}s, "
        f"{per_token:.0f} bytes/token ({per_token / (vocab * 4):.2%} of full float32 logits)"
    )
    return store.uri()


def cache_stats(uri: str) -> dict[str, Any]:
    """What a manifest records of a sequence cache: k, quantisation, bytes per token, build time."""
    meta = read_cache_meta(Storage(uri)) or {}
    if meta.get("kind") != "topk":
        return {}
    return {**meta["topk"], "bytes_per_token": bytes_per_token(meta), "build_seconds": meta.get("seconds")}


def is_seq_cache(uri: str) -> bool:
    return cached_meta(Storage(uri)).get("kind") == "topk"


def read_chunk_tensors(store: Storage, meta: dict[str, Any], c0: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of a sequence cache, checked against its sha256 and shape, decoded."""
    name = chunk_name(c0)
    data = store.read_bytes(name)
    rows = min(meta["chunk_rows"], meta["rows"] - c0)
    chunk = bytes_to_state(data, store.uri(name)) if sha256(data) == meta["chunks"].get(name) else {}
    if "ids" not in chunk or "values" not in chunk or chunk["ids"].shape[:2] != (rows, meta["positions"]):
        raise KdrayError(
            f"teacher top-k cache chunk {store.uri(name)} is corrupt (its sha256 or shape does not match meta.json)",
            hint=f"Delete {store.uri()} and rerun the stage with --force: the cache is rebuilt from the teacher.",
        )
    return decode(chunk)


def read_topk_rows(
    store: Storage, start: int, stop: int, *, expect_rows: int, expect_fingerprint: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, log-probabilities) of rows ``[start, stop)``: a rank reads only the chunks of its shard."""
    meta = read_cache_meta(store)
    if meta is None or meta["rows"] != expect_rows or meta.get("data_fingerprint") != expect_fingerprint:
        raise KdrayError(
            f"teacher top-k cache at {store.uri()} is unreadable or does not match this data "
            f"(rows {meta and meta['rows']} vs {expect_rows})",
            hint="Rerun the stage: the driver rebuilds a cache that does not match.",
        )
    chunk = meta["chunk_rows"]
    ids, values = [], []
    for c0 in range((start // chunk) * chunk, stop, chunk):
        i, v = read_chunk_tensors(store, meta, c0)
        ids.append(i[max(start - c0, 0) : stop - c0])
        values.append(v[max(start - c0, 0) : stop - c0])
    return torch.cat(ids), torch.cat(values)


_CHUNKS: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}  # a Ray Data task keeps its last few chunks


def attach_topk(batch: dict[str, Any], *, store: Storage) -> dict[str, Any]:
    """A streamed training batch with its rows' ``teacher_topk_ids`` and ``teacher_logits`` (log-probabilities)."""
    ids = batch["index"]
    meta = cached_meta(store)
    starts = (ids // meta["chunk_rows"]) * meta["chunk_rows"]
    shape = (len(ids), meta["positions"], meta["topk"]["k"])
    out_ids, out_values = np.empty(shape, np.int32), np.empty(shape, np.float32)
    for start in np.unique(starts):
        key = (store.uri(), int(start))
        if key not in _CHUNKS:
            while len(_CHUNKS) >= 4:
                _CHUNKS.pop(next(iter(_CHUNKS)))
            i, v = read_chunk_tensors(store, meta, int(start))
            _CHUNKS[key] = (i.numpy(), v.numpy())
        sel = starts == start
        out_ids[sel] = _CHUNKS[key][0][ids[sel] - start]
        out_values[sel] = _CHUNKS[key][1][ids[sel] - start]
    return {**batch, "teacher_topk_ids": out_ids, "teacher_logits": out_values}
