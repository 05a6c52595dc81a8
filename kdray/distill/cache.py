"""The teacher-output cache: the teacher runs once over the training data, each rank reads its rows.

Layout (``<root>/_cache/teacher/<key>/``): ``logits-<start>.safetensors`` chunks of ``CHUNK_ROWS``
rows in dataset order, then ``meta.json`` (written last: the commit point, with each chunk's sha256,
checked on every read; a corrupt or unreadable ``meta.json`` makes the driver rebuild). The key hashes the
teacher's weights, the training data's fingerprint and the input transform, so a changed teacher
or a changed selection gets a new cache and a stale one is never used.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from kdray.contracts.checkpoint import Artifact, bytes_to_state, sha256, state_to_bytes
from kdray.contracts.specs import spec_hash
from kdray.contracts.stage import StageContext
from kdray.core import layout
from kdray.core.errors import KdrayError
from kdray.core.lease import Lease
from kdray.core.meter import Task, log_meter
from kdray.core.storage import Storage
from kdray.data import datasets as kdata
from kdray.data import stream

CHUNK_ROWS = 16384
CACHE_FORMAT = 2  # 2: meta.json records each chunk's sha256


def teacher_view(teacher: Artifact) -> dict[str, Any]:
    """The teacher's own input view (``kdray.models.inputs``), part of the cache key when it has one."""
    view = ((teacher.manifest.get("model") or {}).get("kwargs") or {}).get("inputs")
    return {"teacher_inputs": view} if view else {}


def cache_key(teacher: Artifact, train: kdata.Split) -> str:
    return spec_hash(
        {
            "format": CACHE_FORMAT,
            "teacher": teacher.weights_sha256,
            "data": train.fingerprint,
            "transform": {"normalize": [train.mean, train.std]},
            **teacher_view(teacher),
        }
    )[:16]


def read_cache_meta(store: Storage) -> dict[str, Any] | None:
    """The cache's ``meta.json``, or None when it is absent, not JSON or not of this format."""
    if not store.exists("meta.json"):
        return None
    try:
        meta = json.loads(store.read_bytes("meta.json"))
    except (ValueError, RecursionError):
        return None
    ok = (
        isinstance(meta, dict)
        and meta.get("format") == CACHE_FORMAT
        and isinstance(meta.get("rows"), int)
        and isinstance(meta.get("chunk_rows"), int)
        and meta["chunk_rows"] > 0
        and isinstance(meta.get("chunks"), dict)
    )
    return meta if ok else None


def chunk_name(start: int) -> str:
    return f"logits-{start:09d}.safetensors"


def build_cache(
    store: Storage,
    teacher: nn.Module,
    x: torch.Tensor,
    meta: dict[str, Any],
    batch_size: int = 1024,
    log=print,
    task: Task | None = None,
) -> dict[str, Any]:
    """Run the teacher once over ``x`` and write its logits in chunks, then ``meta.json`` last.

    ``task`` counts the rows done, batch by batch (``kdray.core.meter``; by default plain lines through ``log``)."""
    teacher.eval()
    t0 = time.perf_counter()
    chunks: dict[str, str] = {}  # chunk file name -> sha256
    width = None  # the teacher's real output width (its head may be wider than the data's classes)
    task = task or log_meter(log)("teacher cache", len(x), "rows")
    with torch.no_grad(), contextlib.closing(task):
        for start in range(0, len(x), CHUNK_ROWS):
            rows = x[start : start + CHUNK_ROWS]
            parts = []
            for i in range(0, len(rows), batch_size):
                parts.append(teacher(rows[i : i + batch_size]).float())
                task.update(start + min(i + batch_size, len(rows)), f"{len(chunks)} chunk(s) written")
            logits = torch.cat(parts)
            if not bool(torch.isfinite(logits).all()):
                raise KdrayError(
                    f"the teacher's outputs for rows {start:,}-{start + len(rows):,} are NaN or infinite: "
                    f"refusing to cache them at {store.uri()}",
                    hint="Check the teacher artifact (rerun its stage with --force) and the inputs.",
                )
            width = int(logits.shape[1])
            data = state_to_bytes({"logits": logits})
            store.write_bytes(chunk_name(start), data)
            chunks[chunk_name(start)] = sha256(data)
            task.update(start + len(rows), f"{len(chunks)} chunk(s) written")
    meta = {
        **meta,
        **({"num_classes": width} if width is not None else {}),
        "rows": len(x),
        "chunks": chunks,
        "chunk_rows": CHUNK_ROWS,
        "format": CACHE_FORMAT,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    store.write_bytes("meta.json", json.dumps(meta, indent=2).encode())
    return meta


def read_cache_rows(
    store: Storage, start: int, stop: int, *, expect_rows: int, expect_fingerprint: str
) -> torch.Tensor:
    """Logits of rows ``[start, stop)`` from the chunks that overlap them (a rank reads only its shard)."""
    meta = read_cache_meta(store)
    if meta is None or meta["rows"] != expect_rows or meta.get("data_fingerprint") != expect_fingerprint:
        raise KdrayError(
            f"teacher cache at {store.uri()} is unreadable or does not match this data "
            f"(rows {meta and meta['rows']} vs {expect_rows})",
            hint="Rerun the stage: the driver rebuilds a cache that does not match "
            "(or delete the cache folder and rerun with --force).",
        )
    chunk = meta["chunk_rows"]
    parts = []
    for c0 in range((start // chunk) * chunk, stop, chunk):
        parts.append(read_chunk(store, meta, c0)[max(start - c0, 0) : stop - c0])
    return torch.cat(parts)


def read_chunk(store: Storage, meta: dict[str, Any], c0: int) -> torch.Tensor:
    """One chunk, checked against its sha256 in ``meta.json`` and for its shape."""
    name = chunk_name(c0)
    data = store.read_bytes(name)
    rows = min(meta["chunk_rows"], meta["rows"] - c0)
    logits = None
    if sha256(data) == meta["chunks"].get(name):
        logits = bytes_to_state(data, store.uri(name)).get("logits")
    if logits is None or logits.ndim != 2 or len(logits) != rows:
        raise KdrayError(
            f"teacher cache chunk {store.uri(name)} is corrupt (its sha256 or row count does not match meta.json)",
            hint=f"Delete {store.uri()} and rerun the stage: the cache is rebuilt from the teacher.",
        )
    if logits.shape[1] != (meta.get("num_classes") or logits.shape[1]):
        raise KdrayError(
            f"teacher cache chunk {store.uri(name)} holds {logits.shape[1]} outputs per row but its meta.json "
            f"says {meta.get('num_classes')}: it was written by another kdray version",
            hint=f"Delete {store.uri()} and rerun the stage: the cache is rebuilt from the teacher.",
        )
    return logits


def ensure_cache(ctx: StageContext, teacher: Artifact) -> str:
    """The URI of a cache that matches this teacher and data, building it if needed."""
    train = kdata.load(ctx.stage.data, "train")
    key = cache_key(teacher, train)
    store = layout.teacher_cache(ctx.root, key)

    def current() -> dict[str, Any] | None:
        meta = read_cache_meta(store)
        ok = meta is not None and meta.get("rows") == len(train) and meta.get("data_fingerprint") == train.fingerprint
        return meta if ok else None

    with one_builder(ctx, store, current) as build:
        if build:
            _build_in_memory(ctx, teacher, train, store)
    return store.uri()


@contextlib.contextmanager
def one_builder(ctx: StageContext, store: Storage, current: Callable[[], dict[str, Any] | None]) -> Iterator[bool]:
    """Yield whether this run must build the cache at ``store``: False on a hit (also one that another run
    finished while this one waited for its lease); True holding the cache's lease (``kdray.core.lease``),
    so that two runs that need the same cache build it once."""
    meta = current()
    if meta is not None:
        ctx.log(f"[{ctx.stage.name}] teacher cache hit: {store.uri()} ({meta['rows']:,} rows)")
        yield False
        return
    lease = Lease(store, f"[{ctx.stage.name}] teacher cache", log=ctx.log)
    with lease.hold(ready=lambda: current() is not None) as mine:
        if not mine:
            ctx.log(f"[{ctx.stage.name}] teacher cache hit: {store.uri()} (built by another run while this one waited)")
            yield False
            return
        if read_cache_meta(store) is not None:
            ctx.log(f"[{ctx.stage.name}] teacher cache at {store.uri()} does not match; rebuilding it")
        yield True


def _build_in_memory(ctx: StageContext, teacher: Artifact, train: kdata.Split, store: Storage) -> None:
    ctx.log(f"[{ctx.stage.name}] building teacher cache at {store.uri()}")
    title = f"[{ctx.pipeline.name}/{ctx.stage.name}] teacher cache"
    build_cache(
        store,
        teacher.build_model(),
        kdata.normalize(train.x, train),
        {
            "teacher_uri": teacher.uri,
            "teacher_sha256": teacher.weights_sha256,
            "data_fingerprint": train.fingerprint,
            "num_classes": train.num_classes,
        },
        log=ctx.log,
        task=ctx.tasks()(title, len(train), "rows"),
    )


# --------------------------------------------------------------------------- streamed data (data.stream)
# The cache of a streamed dataset covers every row of its training shards, indexed by row id (the ``id``
# column), so that it does not depend on the selection; it is built by Ray Data batch inference
# (``ctx.stream_inference``) and read back inside the training pipeline, batch by batch: each rank
# receives the logits of the rows it streams, never the whole cache.


def stream_cache_key(teacher: Artifact, spec: Any, meta: dict[str, Any]) -> str:
    return spec_hash(
        {
            "format": CACHE_FORMAT,
            "teacher": teacher.weights_sha256,
            "data": f"{meta['fingerprint']}-train",
            "transforms": [t.model_dump(mode="json") for t in getattr(spec, "transforms", [])],
            **teacher_view(teacher),
        }
    )[:16]


class ChunkWriter:
    """Takes (row ids, logits) batches in row-id order and writes each chunk as soon as it is complete.

    ``logits`` may also be a dict of named tensors of one row count (a sequence cache's top-k ids and
    values, ``kdray.distill.seqcache``), each stored under its own name in the chunk; ``chunk_rows``
    sizes the chunks."""

    def __init__(self, store: Storage, rows: int, task: Task, chunk_rows: int | None = None):
        self.store, self.rows, self.task = store, rows, task
        self.chunk_rows = chunk_rows or CHUNK_ROWS  # read when built, not when defined
        self.parts: list[dict[str, torch.Tensor]] = []
        self.held = self.next_id = 0
        self.chunks: dict[str, str] = {}
        self.width: int | None = None

    def __call__(self, ids: Any, logits: Any) -> None:
        if len(ids) and (int(ids[0]) != self.next_id or int(ids[-1]) != self.next_id + len(ids) - 1):
            raise KdrayError(f"teacher cache at {self.store.uri()}: rows arrived out of order at row {self.next_id}")
        named = logits if isinstance(logits, dict) else {"logits": torch.as_tensor(logits).float()}
        named = {k: torch.as_tensor(v) for k, v in named.items()}
        if not all(bool(torch.isfinite(v).all()) for v in named.values() if v.is_floating_point()):
            raise KdrayError(
                f"the teacher's outputs for rows {self.next_id:,}-{self.next_id + len(ids):,} are NaN or infinite: "
                f"refusing to cache them at {self.store.uri()}",
                hint="Check the teacher artifact (rerun its stage with --force) and the inputs.",
            )
        out = named.get("logits")
        if out is not None and out.ndim == 2:
            self.width = int(out.shape[1])  # the teacher's real output width
        self.parts.append(named)
        self.held += len(ids)
        self.next_id += len(ids)
        while self.held >= self.chunk_rows or (self.held and self.next_id == self.rows):
            held = {k: torch.cat([p[k] for p in self.parts]) for k in self.parts[0]}
            start = self.next_id - self.held
            data = state_to_bytes({k: v[: self.chunk_rows].contiguous() for k, v in held.items()})
            self.store.write_bytes(chunk_name(start), data)
            self.chunks[chunk_name(start)] = sha256(data)
            rest = {k: v[self.chunk_rows :] for k, v in held.items()}
            self.held = max(self.held - self.chunk_rows, 0)
            self.parts = [rest] if self.held else []
        self.task.update(self.next_id, f"{len(self.chunks)} chunk(s) written")

    def finish(self, meta: dict[str, Any], seconds: float) -> dict[str, Any]:
        if self.next_id != self.rows:
            raise KdrayError(f"teacher cache at {self.store.uri()}: {self.next_id:,} of {self.rows:,} rows came back")
        if self.width is not None:
            meta = {**meta, "num_classes": self.width}
        meta = {**meta, "rows": self.rows, "chunks": self.chunks, "chunk_rows": self.chunk_rows, "format": CACHE_FORMAT}
        self.store.write_bytes("meta.json", json.dumps({**meta, "seconds": round(seconds, 3)}, indent=2).encode())
        return meta


def given(model: nn.Module) -> nn.Module:
    """``model`` itself: what each Ray Data inference actor builds. The teacher is read from storage here,
    on the driver, and shipped to the actors with its weights (they may not have the storage's settings)."""
    return model


def ensure_stream_cache(ctx: StageContext, teacher: Artifact) -> str:
    """The URI of the cache of the teacher's logits for every training-shard row of a streamed dataset,
    built by Ray Data batch inference if it is missing or does not match."""
    spec = ctx.stage.data
    plan = stream.plan(spec)
    store = layout.teacher_cache(ctx.root, stream_cache_key(teacher, spec, plan.meta))
    fingerprint = f"{plan.meta['fingerprint']}-train"

    def current() -> dict[str, Any] | None:
        meta = read_cache_meta(store)
        ok = meta is not None and meta.get("rows") == plan.rows and meta.get("data_fingerprint") == fingerprint
        return meta if ok else None

    with one_builder(ctx, store, current) as build:
        if build:
            _build_streamed(ctx, teacher, plan, store, fingerprint)
    return store.uri()


def _build_streamed(ctx: StageContext, teacher: Artifact, plan: Any, store: Storage, fingerprint: str) -> None:
    ctx.log(f"[{ctx.stage.name}] building teacher cache at {store.uri()} (Ray Data batch inference)")
    t0 = time.perf_counter()
    task = ctx.tasks()(f"[{ctx.pipeline.name}/{ctx.stage.name}] teacher cache", plan.rows, "rows")
    writer = ChunkWriter(store, plan.rows, task)
    with contextlib.closing(task):
        ctx.stream_inference(ctx.job(), functools.partial(given, teacher.build_model()), writer)
    writer.finish(
        {
            "teacher_uri": teacher.uri,
            "teacher_sha256": teacher.weights_sha256,
            "data_fingerprint": fingerprint,
            "num_classes": plan.meta["num_classes"],
        },
        time.perf_counter() - t0,
    )


_METAS: dict[str, dict[str, Any]] = {}  # a Ray Data task process keeps what it read: each cache's meta.json,
_CHUNKS: dict[tuple[str, int], Any] = {}  # and its last few chunks


def cached_meta(store: Storage) -> dict[str, Any]:
    """A cache's ``meta.json``, read once per process."""
    if store.uri() not in _METAS:
        meta = read_cache_meta(store)
        if meta is None:
            raise KdrayError(
                f"teacher cache at {store.uri()} has no readable meta.json",
                hint="Rerun the stage with --force: the cache is rebuilt from the teacher.",
            )
        _METAS[store.uri()] = meta
    return _METAS[store.uri()]


def cached_chunk(store: Storage, start: int) -> Any:
    """One checked chunk of a cache (numpy), read once per process (the last four are kept)."""
    key = (store.uri(), start)
    if key not in _CHUNKS:
        while len(_CHUNKS) >= 4:
            _CHUNKS.pop(next(iter(_CHUNKS)))
        _CHUNKS[key] = read_chunk(store, cached_meta(store), start).numpy()
    return _CHUNKS[key]


def attach_logits(batch: dict[str, Any], *, store: Storage) -> dict[str, Any]:
    """A streamed training batch with ``teacher_logits``: the cached rows of its row ids (``index``).
    ``store`` travels with its filesystem, so the Ray Data task needs no storage settings of its own."""
    ids = batch["index"]
    meta = cached_meta(store)
    starts = (ids // meta["chunk_rows"]) * meta["chunk_rows"]
    out = np.empty((len(ids), meta["num_classes"]), dtype=np.float32)
    for start in np.unique(starts):
        sel = starts == start
        out[sel] = cached_chunk(store, int(start))[ids[sel] - start]
    return {**batch, "teacher_logits": out}
