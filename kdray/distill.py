"""The ``distill`` stage: a student learns from a teacher through a weighted list of loss terms.

Driver side (``run_distill``): resolve the teacher artifact, check it fits the student's task,
decide whether to use the teacher-output cache (``teacher_cache: auto|on|off``), build the cache
if needed, then ``fit`` and publish. Worker side (``Distill``): the student is ``method.model``
(DDP-wrapped with the loss terms' own parameters); the teacher is replicated per worker, frozen,
outside the module tree; with a cache the teacher does not run at all.

Cache layout (``<root>/_cache/teacher/<key>/``): ``logits-<start>.safetensors`` chunks of
``CHUNK_ROWS`` rows in dataset order, then ``meta.json`` (written last: the commit point). The key
hashes the teacher's weights, the training data's fingerprint and the input transform, so a
changed teacher or a changed selection gets a new cache and a stale one is never used.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import torch
import torch.nn as nn

from kdray import data as kdata
from kdray.checkpoint import Artifact, bytes_to_state, open_artifact, state_to_bytes
from kdray.errors import KdrayError
from kdray.losses import Outputs, build_loss, forward_with_features
from kdray.methods import METHODS, Method
from kdray.models import create_model
from kdray.specs import spec_hash
from kdray.stages import STAGES, WORKER_DATA, WORKER_METHODS, StageContext, make_job, publish_trained
from kdray.storage import Storage

CHUNK_ROWS = 16384
CACHE_FORMAT = 1


@METHODS.register("distill")
class Distill(Method):
    """Weighted sum of distillation terms between ``model`` (student) and a frozen teacher.

    ``teacher`` runs online (per worker, eval mode, no grad) unless ``cached_logits`` holds its
    outputs for this rank's rows, looked up by ``batch["index"] - cache_start``.
    """

    def __init__(self, model: nn.Module, terms: list[tuple[str, float, nn.Module]], teacher: nn.Module | None,
                 cached_logits: torch.Tensor | None = None, cache_start: int = 0):
        super().__init__(model)
        self.names = [name for name, _, _ in terms]
        self.weights = [weight for _, weight, _ in terms]
        self.terms = nn.ModuleList(term for _, _, term in terms)  # projections train with the student
        self.teacher = self.keep_frozen("teacher", teacher) if teacher is not None else None
        self.cached_logits, self.cache_start = cached_logits, cache_start
        self.student_layers = tuple(dict.fromkeys(p for t in self.terms for p in t.student_layers))
        self.teacher_layers = tuple(dict.fromkeys(p for t in self.terms for p in t.teacher_layers))
        self.embedding = any(t.needs_embedding for t in self.terms)

    def to_device(self, device: torch.device) -> "Distill":
        super().to_device(device)
        if self.cached_logits is not None:
            self.cached_logits = self.cached_logits.to(device)
        return self

    def teacher_outputs(self, batch: dict[str, Any]) -> Outputs:
        if self.cached_logits is not None:
            return Outputs(logits=self.cached_logits[batch["index"].to(self.cached_logits.device) - self.cache_start])
        with torch.no_grad():
            return forward_with_features(self.teacher, batch["x"], self.teacher_layers, self.embedding, "teacher")

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        student = forward_with_features(self.model, batch["x"], self.student_layers, self.embedding, "student")
        teacher = self.teacher_outputs(batch)
        parts = {name: term(student, teacher, batch) for name, term in zip(self.names, self.terms)}
        loss = sum(w * v for w, v in zip(self.weights, parts.values()))
        return {"loss": loss, "logits": student.logits, **{k: v.detach() for k, v in parts.items()}}


def build_terms(spec: Any) -> list[tuple[str, float, nn.Module]]:
    names = [t.name for t in spec.losses]
    labels = [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
    return [(label, t.weight, build_loss(t.name, **t.options)) for label, t in zip(labels, spec.losses)]


def _worker_method(job: Any, spec: Any, train: kdata.Split, x_train: torch.Tensor, mine: torch.Tensor) -> Distill:
    student = create_model(spec.model.name, **job.extras["model_kwargs"])
    terms = build_terms(spec)
    cache_uri = job.extras.get("teacher_cache")
    teacher = None if cache_uri else open_artifact(job.parents[spec.teacher]).build_model()
    example = x_train[mine[:8]]
    for _, _, term in terms:
        term.setup(student, teacher, example)  # projections exist before the optimiser is built
    cached, start = None, 0
    if cache_uri:
        start, stop = int(mine[0]), int(mine[-1]) + 1
        cached = read_cache_rows(Storage(cache_uri), start, stop, expect_rows=len(train),
                                 expect_fingerprint=train.fingerprint)
    return Distill(student, terms, teacher, cached, start)


WORKER_METHODS["distill"] = _worker_method


def _stage_data(job: Any, spec: Any) -> tuple[kdata.Split, kdata.Split] | None:
    """Data-free: train on the synthesised inputs (already normalised), test on the real test split."""
    if not job.extras.get("datafree_uri"):
        return None
    store = Storage(job.extras["datafree_uri"])
    tensors = bytes_to_state(store.read_bytes("inputs.safetensors"), store.uri())
    test = kdata.load(spec.data, "test")
    synthetic = dataclasses.replace(test, x=tensors["x"], y=tensors["y"], mean=0.0, std=1.0,
                                    fingerprint=json.loads(store.read_bytes("meta.json"))["key"])
    return synthetic, test


WORKER_DATA["distill"] = _stage_data


def ensure_datafree(ctx: StageContext, teacher: Artifact, kwargs: dict[str, Any]) -> str:
    """The URI of the inputs synthesised from this teacher with these settings (built once, then reused)."""
    from kdray.datafree import synthesize

    df = ctx.stage.data_free
    key = spec_hash({"teacher": teacher.weights_sha256, "settings": df.model_dump(), "seed": ctx.run.seed})[:16]
    store = ctx.root.child(f"_cache/datafree/{key}")
    if store.exists("meta.json"):
        ctx.log(f"[{ctx.stage.name}] data-free inputs: reused {store.uri()}")
        return store.uri()
    ctx.log(f"[{ctx.stage.name}] data-free: synthesising {df.samples:,} inputs from the teacher -> {store.uri()}")
    device = torch.device("cuda" if ctx.run.use_gpu and torch.cuda.is_available() else "cpu")
    x, y, stats = synthesize(teacher.build_model(), samples=df.samples,
                             shape=(kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"]),
                             num_classes=kwargs["num_classes"], steps=df.steps, batch_size=df.batch_size, lr=df.lr,
                             bn_weight=df.bn_weight, tv_weight=df.tv_weight, l2_weight=df.l2_weight,
                             seed=ctx.run.seed, device=device, log=ctx.log)
    store.write_bytes("inputs.safetensors", state_to_bytes({"x": x, "y": y}))
    store.write_bytes("meta.json", json.dumps({"key": key, "teacher_uri": teacher.uri, **stats}, indent=2).encode())
    ctx.log(f"[{ctx.stage.name}] data-free: BatchNorm mismatch {stats['bn_loss_start']:.3f} -> {stats['bn_loss_end']:.3f}, "
            f"teacher agrees with the targets on {stats['teacher_agreement_with_targets']:.1%}")
    return store.uri()


# --------------------------------------------------------------------------- teacher-output cache


def cache_decision(spec: Any) -> tuple[bool, str]:
    """Whether to precompute the teacher's outputs, and why (said in the log)."""
    terms = [build_loss(t.name, **t.options) for t in spec.losses]
    online = [t.registry_name for t in terms if t.teacher_layers or t.needs_embedding]
    if spec.teacher_cache == "off":
        return False, "teacher_cache: off"
    if spec.data_free is not None:
        if spec.teacher_cache == "on":
            raise KdrayError(f"stages.{spec.name}.teacher_cache: on does not apply to data_free inputs",
                             hint="Use teacher_cache: auto or off with data_free.")
        return False, "data_free: the inputs are synthesised, the teacher runs online"
    if online:
        reason = f"loss terms {online} read teacher features or embeddings, which the cache does not hold"
        if spec.teacher_cache == "on":
            raise KdrayError(f"stages.{spec.name}.teacher_cache: on is impossible: {reason}",
                             hint="Use teacher_cache: auto or off for this stage.")
        return False, f"running the teacher online: {reason}"
    return True, "inputs are deterministic (no random augmentation), so the teacher runs once"


def cache_key(teacher: Artifact, train: kdata.Split) -> str:
    return spec_hash({"format": CACHE_FORMAT, "teacher": teacher.weights_sha256, "data": train.fingerprint,
                      "transform": {"normalize": [train.mean, train.std]}})[:16]


def read_cache_meta(store: Storage) -> dict[str, Any] | None:
    if not store.exists("meta.json"):
        return None
    return json.loads(store.read_bytes("meta.json"))


def build_cache(store: Storage, teacher: nn.Module, x: torch.Tensor, meta: dict[str, Any],
                batch_size: int = 1024, log=print) -> dict[str, Any]:
    """Run the teacher once over ``x`` and write its logits in chunks, then ``meta.json`` last."""
    teacher.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(x), CHUNK_ROWS):
            rows = x[start:start + CHUNK_ROWS]
            logits = torch.cat([teacher(rows[i:i + batch_size]).float() for i in range(0, len(rows), batch_size)])
            store.write_bytes(f"logits-{start:09d}.safetensors", state_to_bytes({"logits": logits}))
            log(f"  teacher cache: {min(start + CHUNK_ROWS, len(x)):,}/{len(x):,} rows")
    meta = {**meta, "rows": len(x), "chunk_rows": CHUNK_ROWS, "format": CACHE_FORMAT,
            "seconds": round(time.perf_counter() - t0, 3)}
    store.write_bytes("meta.json", json.dumps(meta, indent=2).encode())
    return meta


def read_cache_rows(store: Storage, start: int, stop: int, *, expect_rows: int, expect_fingerprint: str) -> torch.Tensor:
    """Logits of rows ``[start, stop)`` from the chunks that overlap them (a rank reads only its shard)."""
    meta = read_cache_meta(store)
    if meta is None or meta["rows"] != expect_rows or meta["data_fingerprint"] != expect_fingerprint:
        raise KdrayError(f"teacher cache at {store.uri()} does not match this data "
                         f"(rows {meta and meta['rows']} vs {expect_rows})",
                         hint="Rerun the stage: the driver rebuilds a cache that does not match.")
    chunk = meta["chunk_rows"]
    parts = []
    for c0 in range((start // chunk) * chunk, stop, chunk):
        logits = bytes_to_state(store.read_bytes(f"logits-{c0:09d}.safetensors"), store.uri())["logits"]
        parts.append(logits[max(start - c0, 0):stop - c0])
    return torch.cat(parts)


def ensure_cache(ctx: StageContext, teacher: Artifact) -> str:
    """The URI of a cache that matches this teacher and data, building it if needed."""
    train = kdata.load(ctx.stage.data, "train")
    key = cache_key(teacher, train)
    store = ctx.root.child(f"_cache/teacher/{key}")
    meta = read_cache_meta(store)
    if meta is not None and meta.get("rows") == len(train) and meta.get("data_fingerprint") == train.fingerprint:
        ctx.log(f"[{ctx.stage.name}] teacher cache hit: {store.uri()} ({meta['rows']:,} rows)")
        return store.uri()
    if meta is not None:
        ctx.log(f"[{ctx.stage.name}] teacher cache at {store.uri()} does not match; rebuilding it")
    ctx.log(f"[{ctx.stage.name}] building teacher cache at {store.uri()}")
    build_cache(store, teacher.build_model(), kdata.normalize(train.x, train),
                {"teacher_uri": teacher.uri, "teacher_sha256": teacher.weights_sha256,
                 "data_fingerprint": train.fingerprint, "num_classes": train.num_classes}, log=ctx.log)
    return store.uri()


# --------------------------------------------------------------------------- the stage


def check_teacher(ctx: StageContext, teacher: Artifact, student_kwargs: dict[str, Any]) -> None:
    record = teacher.manifest.get("model")
    if not record:
        raise KdrayError(f"stages.{ctx.stage.name}.teacher: {ctx.stage.teacher!r} ({teacher.uri}) is a "
                         f"{teacher.manifest.get('kind')} stage with no model",
                         hint="Point teacher at a train, distill, transfer or adapt stage.")
    t_kwargs = record["kwargs"]
    for field in ("num_classes", "in_channels", "image_size"):
        if t_kwargs.get(field) != student_kwargs.get(field):
            raise KdrayError(f"stages.{ctx.stage.name}: the teacher {ctx.stage.teacher!r} ({record['name']}) has "
                             f"{field}={t_kwargs.get(field)} but the student ({ctx.stage.model.name}) on "
                             f"{ctx.stage.data.name} has {field}={student_kwargs.get(field)}",
                             hint="Distil on the data the teacher was trained for (same classes and image size).")


@STAGES.register("distill")
def run_distill(ctx: StageContext) -> Artifact:
    from kdray.train import fit

    teacher = ctx.parents[ctx.stage.teacher]
    job = make_job(ctx)
    check_teacher(ctx, teacher, job.extras["model_kwargs"])
    use_cache, why = cache_decision(ctx.stage)
    ctx.log(f"[{ctx.stage.name}] teacher cache {'on' if use_cache else 'off'}: {why}")
    if use_cache:
        job.extras["teacher_cache"] = ensure_cache(ctx, teacher)
    if ctx.stage.data_free is not None:
        job.extras["datafree_uri"] = ensure_datafree(ctx, teacher, job.extras["model_kwargs"])
    result = fit(job, ctx.root)
    return publish_trained(ctx, job, result, extra={"teacher": {"uri": teacher.uri, "cache": job.extras.get("teacher_cache"),
                                                               "cache_reason": why}})
