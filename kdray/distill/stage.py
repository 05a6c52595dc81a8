"""The ``distill`` stage: a student learns from a teacher through a weighted list of loss terms.

Driver side (``DistillKind.run``): resolve the teacher artifact, check it fits the student's task,
decide whether to use the teacher-output cache (``teacher_cache: auto|on|off``), build the cache
if needed (``kdray.distill.cache``), then train and publish. Worker side (``Distill``): the student
is ``method.model`` (DDP-wrapped with the loss terms' own parameters); the teacher is replicated
per worker, frozen, outside the module tree; with a cache the teacher does not run at all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, field_validator

from kdray.contracts.checkpoint import Artifact, bytes_to_state, open_artifact, state_to_bytes
from kdray.contracts.method import Method
from kdray.contracts.specs import DataSpec, ModelSpec, OptimSpec, Spec, StageBase, spec_hash
from kdray.contracts.stage import Job, Shard, StageContext, StageKind, stage_kind
from kdray.contracts.usermodels import build_model
from kdray.core import layout
from kdray.core.errors import KdrayError
from kdray.core.storage import Storage
from kdray.data import datasets as kdata
from kdray.data import transforms
from kdray.data.text import is_token_data
from kdray.distill.cache import attach_logits, ensure_cache, ensure_stream_cache, read_cache_rows
from kdray.distill.datafree import synthesize
from kdray.distill.losses import LossTerm
from kdray.distill.seqcache import (
    TopKCacheSpec,
    attach_topk,
    cache_stats,
    ensure_seq_cache,
    is_seq_cache,
    read_topk_rows,
)
from kdray.models import lm
from kdray.models.hooks import Outputs, forward_with_features


class DataFreeSpec(Spec):
    """Synthesise the distillation inputs from the teacher (DeepInversion) instead of reading data."""

    samples: int = Field(4096, ge=1)
    steps: int = Field(200, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.1, gt=0)
    bn_weight: float = Field(1.0, ge=0)
    tv_weight: float = Field(1e-4, ge=0)
    l2_weight: float = Field(1e-5, ge=0)


class DistillStage(StageBase):
    """Train ``model`` (the student) from ``teacher`` (a stage name or an artifact URI)."""

    kind: Literal["distill"] = "distill"
    teacher: str
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    losses: list[LossTerm] = Field(
        default_factory=lambda: [LossTerm(name="cross_entropy", weight=0.1), LossTerm(name="hinton_kl", weight=0.9)]
    )
    teacher_cache: Literal["auto", "on", "off"] = "auto"
    data_free: DataFreeSpec | None = None
    # a causal LM on a text dataset: what its teacher cache keeps (top-k per position; absent from the key when unset)
    teacher_topk: TopKCacheSpec | None = Field(None, exclude_if=lambda v: v is None)

    @field_validator("losses")
    @classmethod
    def _losses(cls, v: list[LossTerm]) -> list[LossTerm]:
        if not v:
            raise ValueError("give at least one loss term, e.g. [{name: hinton_kl, weight: 1.0}]")
        if sum(t.weight for t in v) <= 0:
            raise ValueError("the loss weights sum to 0: nothing would be optimised")
        return v

    def references(self) -> list[tuple[str, str]]:
        return [("teacher", self.teacher)]


class Distill(Method):
    """Weighted sum of distillation terms between ``model`` (student) and a frozen teacher.

    ``teacher`` runs online (per worker, eval mode, no grad) unless ``cached_logits`` holds its
    outputs for this rank's rows, looked up by ``batch["index"] - cache_start``.
    """

    def __init__(
        self,
        model: nn.Module,
        terms: list[tuple[str, float, nn.Module]],
        teacher: nn.Module | None,
        cached_logits: torch.Tensor | None = None,
        cache_start: int = 0,
        cached_ids: torch.Tensor | None = None,
    ):
        super().__init__(model)
        self.names = [name for name, _, _ in terms]
        self.weights = [weight for _, weight, _ in terms]
        self.terms = nn.ModuleList(term for _, _, term in terms)  # projections train with the student
        self.teacher = self.keep_frozen("teacher", teacher) if teacher is not None else None
        self.cached_logits, self.cache_start = cached_logits, cache_start
        self.cached_ids = cached_ids  # a causal LM teacher's top-k ids (cached_logits: their log-probabilities)
        self.student_layers = tuple(dict.fromkeys(p for t in self.terms for p in t.student_layers))  # type: ignore[union-attr]  # torch: Module.__getattr__
        self.teacher_layers = tuple(dict.fromkeys(p for t in self.terms for p in t.teacher_layers))  # type: ignore[union-attr]  # torch: Module.__getattr__
        self.embedding = any(t.needs_embedding for t in self.terms)
        self.needs_teacher = any(t.needs_teacher for t in self.terms)  # cross-entropy alone never runs it

    def to_device(self, device: torch.device) -> "Distill":
        super().to_device(device)
        if self.cached_logits is not None:
            self.cached_logits = self.cached_logits.to(device)
        if self.cached_ids is not None:
            self.cached_ids = self.cached_ids.to(device)
        return self

    def teacher_outputs(self, batch: dict[str, Any]) -> Outputs:
        if "teacher_logits" in batch:  # streamed data with a cache: the pipeline attached them
            return Outputs(logits=batch["teacher_logits"], topk_ids=batch.get("teacher_topk_ids"))
        if self.cached_logits is not None:
            rows = batch["index"].to(self.cached_logits.device) - self.cache_start
            ids = self.cached_ids[rows] if self.cached_ids is not None else None
            return Outputs(logits=self.cached_logits[rows], topk_ids=ids)
        with torch.no_grad():
            return forward_with_features(self.teacher, batch["x"], self.teacher_layers, self.embedding, "teacher")  # type: ignore[arg-type]  # torch: Module.__getattr__

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        student = forward_with_features(self.model, batch["x"], self.student_layers, self.embedding, "student")
        teacher = self.teacher_outputs(batch) if self.needs_teacher else None
        parts = {name: term(student, teacher, batch) for name, term in zip(self.names, self.terms)}
        loss = sum(w * v for w, v in zip(self.weights, parts.values()))
        scored = {} if lm.is_sequence(student.logits) else {"logits": student.logits}  # no per-row accuracy for an LM
        return {"loss": loss, **scored, **{k: v.detach() for k, v in parts.items()}}


def build_terms(spec: DistillStage) -> list[tuple[str, float, nn.Module]]:
    """(label, weight, loss module) per term; a name used twice is labelled by its position."""
    names = [t.name for t in spec.losses]
    labels = [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
    return [(label, t.weight, t.build()) for label, t in zip(labels, spec.losses)]


def ensure_datafree(ctx: StageContext, teacher: Artifact, kwargs: dict[str, Any]) -> str:
    """The URI of the inputs synthesised from this teacher with these settings (built once, then reused)."""
    df = ctx.stage.data_free
    key = spec_hash({"teacher": teacher.weights_sha256, "settings": df.model_dump(), "seed": ctx.run.seed})[:16]
    store = layout.datafree_cache(ctx.root, key)
    if store.exists("meta.json"):
        ctx.log(f"[{ctx.stage.name}] data-free inputs: reused {store.uri()}")
        return store.uri()
    ctx.log(f"[{ctx.stage.name}] data-free: synthesising {df.samples:,} inputs from the teacher -> {store.uri()}")
    device = torch.device("cuda" if ctx.run.use_gpu and torch.cuda.is_available() else "cpu")
    x, y, stats = synthesize(
        teacher.build_model(),
        samples=df.samples,
        shape=(kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"]),
        num_classes=kwargs["num_classes"],
        steps=df.steps,
        batch_size=df.batch_size,
        lr=df.lr,
        bn_weight=df.bn_weight,
        tv_weight=df.tv_weight,
        l2_weight=df.l2_weight,
        seed=ctx.run.seed,
        device=device,
        log=ctx.log,
    )
    store.write_bytes("inputs.safetensors", state_to_bytes({"x": x, "y": y}))
    store.write_bytes("meta.json", json.dumps({"key": key, "teacher_uri": teacher.uri, **stats}, indent=2).encode())
    ctx.log(
        f"[{ctx.stage.name}] data-free: BatchNorm mismatch {stats['bn_loss_start']:.3f} -> {stats['bn_loss_end']:.3f}, "
        f"teacher agrees with the targets on {stats['teacher_agreement_with_targets']:.1%}"
    )
    return store.uri()


# --------------------------------------------------------------------------- the stage


def cache_decision(spec: DistillStage) -> tuple[bool, str]:
    """Whether to precompute the teacher's outputs, and why (said in the log)."""
    terms = [term for _, _, term in build_terms(spec)]
    online = [term.name for term in terms if term.teacher_layers or term.needs_embedding]
    if spec.teacher_cache == "off":
        return False, "teacher_cache: off"
    if spec.data.stream and spec.data_free is not None:
        raise KdrayError(
            f"stages.{spec.name}: data.stream: true cannot be combined with data_free (its inputs are synthesised)",
            hint="Drop data.stream or data_free.",
        )
    if spec.data_free is not None:
        if spec.teacher_cache == "on":
            raise KdrayError(
                f"stages.{spec.name}.teacher_cache: on does not apply to data_free inputs",
                hint="Use teacher_cache: auto or off with data_free.",
            )
        return False, "data_free: the inputs are synthesised, the teacher runs online"
    if not any(term.needs_teacher for term in terms):
        return False, "no loss term reads the teacher's outputs, so the teacher never runs"
    augment = transforms.random_names(spec.data.transforms)
    if augment:  # a cache holds the teacher's outputs for fixed inputs; augmented inputs change every epoch
        if spec.teacher_cache == "on":
            raise KdrayError(
                f"stages.{spec.name}.teacher_cache: on is impossible with random augmentation: the cache holds the "
                f"teacher's outputs for fixed inputs, but data.transforms ({', '.join(augment)}) changes the "
                "training inputs every epoch",
                hint=f"Use teacher_cache: auto or off (the teacher then runs online on each augmented batch), or "
                f"remove {' and '.join(augment)} from stages.{spec.name}.data.transforms.",
            )
        return False, (
            f"running the teacher online: data.transforms has random augmentation ({', '.join(augment)}), "
            "so the inputs differ every epoch and cached outputs would not match them"
        )
    if online:
        reason = f"loss terms {online} read teacher features or embeddings, which the cache does not hold"
        if spec.teacher_cache == "on":
            raise KdrayError(
                f"stages.{spec.name}.teacher_cache: on is impossible: {reason}",
                hint="Use teacher_cache: auto or off for this stage.",
            )
        return False, f"running the teacher online: {reason}"
    how = " (Ray Data batch inference over the streamed shards)" if spec.data.stream else ""
    return True, f"inputs are deterministic (no random augmentation), so the teacher runs once{how}"


def warm_cache(ctx: StageContext, teacher: Artifact) -> None:
    """Build the stage's teacher cache before its trials run (a sweep): the top-k cache of a causal LM on
    in-memory text, else the classifier cache of its in-memory training split."""
    if not is_token_data(ctx.stage.data):
        ensure_cache(ctx, teacher)
    elif not ctx.stage.data.stream and not any(t.name == "weighted_output_mse" for t in ctx.stage.losses):
        ensure_seq_cache(ctx, teacher, ctx.stage.teacher_topk or TopKCacheSpec())


def check_teacher(ctx: StageContext, teacher: Artifact, student_kwargs: dict[str, Any]) -> None:
    record = teacher.manifest.get("model")
    if not record:
        raise KdrayError(
            f"stages.{ctx.stage.name}.teacher: {ctx.stage.teacher!r} ({teacher.uri}) is a "
            f"{teacher.manifest.get('kind')} stage with no model",
            hint="Point teacher at a train, distill, transfer or adapt stage.",
        )
    t_kwargs = record["kwargs"]
    for field in ("num_classes", "in_channels", "image_size"):
        if t_kwargs.get(field) != student_kwargs.get(field):
            raise KdrayError(
                f"stages.{ctx.stage.name}: the teacher {ctx.stage.teacher!r} ({record['name']}) has "
                f"{field}={t_kwargs.get(field)} but the student ({ctx.stage.model.name}) on "
                f"{ctx.stage.data.name} has {field}={student_kwargs.get(field)}",
                hint="Distil on the data the teacher was trained for (same classes and image size).",
            )


@stage_kind
class DistillKind(StageKind):
    """Distil a teacher (a stage or an artifact URI) into ``model``."""

    spec = DistillStage
    streams = True  # data.stream: Ray Data feeds the loop; a cache is built by Ray Data batch inference

    def prepare_trials(self, trials: list[StageContext]) -> None:
        """Build each distinct teacher cache of a sweep's trials once (trials of one teacher and data share it)."""
        done = set()
        for ctx in trials:
            shared = (ctx.stage.teacher, json.dumps(ctx.stage.data.model_dump(mode="json")))
            if shared in done or not cache_decision(ctx.stage)[0]:
                continue
            warm_cache(ctx, ctx.parents[ctx.stage.teacher])
            done.add(shared)

    def run(self, ctx: StageContext) -> Artifact:
        teacher = ctx.parents[ctx.stage.teacher]
        job = ctx.job()
        check_teacher(ctx, teacher, job.extras["model_kwargs"])
        use_cache, why = cache_decision(ctx.stage)
        tokens = is_token_data(ctx.stage.data)  # a causal LM: the cache keeps the teacher's top-k per position
        full = [t.name for t in ctx.stage.losses if t.name == "weighted_output_mse"]
        if tokens and use_cache and full:
            use_cache, why = (
                False,
                f"running the teacher online: {full[0]} regresses full logits, a top-k cache holds k",
            )
        ctx.log(f"[{ctx.stage.name}] teacher cache {'on' if use_cache else 'off'}: {why}")
        if use_cache and tokens:
            job.extras["teacher_cache"] = ensure_seq_cache(ctx, teacher, ctx.stage.teacher_topk or TopKCacheSpec())
        elif use_cache:
            build = ensure_stream_cache if ctx.stage.data.stream else ensure_cache
            job.extras["teacher_cache"] = build(ctx, teacher)
        if ctx.stage.data_free is not None:
            job.extras["datafree_uri"] = ensure_datafree(ctx, teacher, job.extras["model_kwargs"])
        result = ctx.train(job)
        return ctx.publish(
            job,
            result,
            extra={
                "teacher": {
                    "uri": teacher.uri,
                    "cache": job.extras.get("teacher_cache"),
                    "cache_reason": why,
                    **({"cache_topk": cache_stats(job.extras["teacher_cache"])} if tokens and use_cache else {}),
                }
            },
        )

    def stream_columns(self, job: Job) -> Any:
        """With a cache of streamed data, each training batch gets its rows' ``teacher_logits`` in Ray Data."""
        cache_uri = job.extras.get("teacher_cache")
        if not cache_uri:
            return None
        return functools.partial(attach_topk if is_seq_cache(cache_uri) else attach_logits, store=Storage(cache_uri))

    def method(self, job: Job, shard: Shard) -> Distill:
        spec = job.spec
        student = build_model(spec.model, job.extras["model_kwargs"])
        terms = build_terms(spec)
        cache_uri = job.extras.get("teacher_cache")
        teacher = None if cache_uri else open_artifact(job.parents[spec.teacher]).build_model()
        example = shard.x[shard.rows[:8]]
        for _, _, term in terms:
            term.setup(student, teacher, example)  # type: ignore[operator]  # projections exist before the optimiser
        cached, ids, start = None, None, 0
        if cache_uri and not spec.data.stream:  # streamed: each batch brings its logits (stream_columns)
            start, stop = int(shard.rows[0]), int(shard.rows[-1]) + 1
            read = read_topk_rows if is_seq_cache(cache_uri) else read_cache_rows
            got = read(
                Storage(cache_uri),
                start,
                stop,
                expect_rows=len(shard.train),
                expect_fingerprint=shard.train.fingerprint,
            )
            ids, cached = got if isinstance(got, tuple) else (None, got)
        return Distill(student, terms, teacher, cached, start, ids)

    def data(self, job: Job) -> tuple[kdata.Split, kdata.Split]:
        """Data-free: train on the synthesised inputs (already normalised), validate on the real validation split."""
        if not job.extras.get("datafree_uri"):
            return super().data(job)
        store = Storage(job.extras["datafree_uri"])
        tensors = bytes_to_state(store.read_bytes("inputs.safetensors"), store.uri())
        val = kdata.load(job.spec.data, "val")
        synthetic = dataclasses.replace(
            val,
            x=tensors["x"],
            y=tensors["y"],
            mean=0.0,
            std=1.0,
            fingerprint=json.loads(store.read_bytes("meta.json"))["key"],
        )
        return synthetic, val
