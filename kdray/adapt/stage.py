"""The ``adapt`` stage: adapt a model from a labelled source domain to an unlabelled target domain.

Driver side (``run_adapt``): get the source-only baseline (the ``source`` stage, or a
``source_only`` run of the same recipe, reused from storage when it exists), ``fit`` the adapted
model, then evaluate both on the target test split and publish the adapted model with the gain.
Worker side (``Adapt``): wraps one ``ADAPT_METHODS`` entry; the loop iterates the source domain
(the target domain for a source-free method, labels removed) and the method draws target batches
from this rank's shard. Every epoch it computes the validators (``val_source_acc``,
``val_entropy``, ``val_snd``; the loop's ``val_acc``, on the target domain's labelled validation
split, is the oracle) and keeps a copy of the model that is best under the stage's ``selection``
rule: that copy is what the stage publishes. No rule reads a test split; the target test split is
read once, after training, for the reported accuracies.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
from pydantic import Field, field_validator, model_validator

from kdray.adapt.methods import ADAPT_METHODS, AdaptMethodSpec, build_adapt_method, entropy_score, snd_score
from kdray.contracts.checkpoint import Artifact, load_state_checked, open_artifact, read_artifact
from kdray.contracts.method import Method
from kdray.contracts.specs import DataSpec, ModelSpec, OptimSpec, StageBase, spec_hash
from kdray.contracts.stage import Job, Shard, StageContext, StageKind, stage_kind
from kdray.contracts.usermodels import build_model
from kdray.core import layout
from kdray.core.errors import KdrayError
from kdray.core.metrics import metrics_for, predict
from kdray.core.registry import did_you_mean
from kdray.data import datasets as kdata

VALIDATION_ROWS = 2000  # rows per rank scored by the validators each epoch

# How an epoch's model is scored for selection (higher is better); ``oracle`` reads target labels.
SELECTION_RULES: dict[str, Callable[[dict[str, Any]], float]] = {
    "source_val": lambda m: m["val_source_acc"],
    "entropy": lambda m: -m["val_entropy"],
    "snd": lambda m: m["val_snd"],
    "oracle": lambda m: m["val_acc"],  # target labels (of the target validation split): not deployable
}


class AdaptStage(StageBase):
    """Adapt ``model`` from the labelled ``source_domain`` to the unlabelled ``target_domain``.

    ``source`` (optional; required by source-free methods) is a model trained on the source
    domain: it initialises the model and is the source-only baseline. Without it, a source_only
    run of the same recipe is the baseline. Target labels are used for evaluation only (and for
    ``selection: oracle``, which every report flags as not deployable).
    """

    kind: Literal["adapt"] = "adapt"
    source: str | None = None
    model: ModelSpec
    source_domain: DataSpec = Field(default_factory=DataSpec)
    target_domain: DataSpec
    method: AdaptMethodSpec
    selection: str = "source_val"
    optim: OptimSpec = Field(default_factory=OptimSpec)
    target_batch_size: int | None = Field(None, ge=1)

    @property
    def data(self) -> DataSpec:
        """The data the model is built for (classes, channels, size): the source domain's."""
        return self.source_domain

    @field_validator("selection")
    @classmethod
    def _selection(cls, v: str) -> str:
        if v not in SELECTION_RULES:
            raise ValueError(f"unknown selection rule {v!r}; {did_you_mean(v, list(SELECTION_RULES))}")
        return v

    @model_validator(mode="after")
    def _adapt(self) -> "AdaptStage":
        for field in ("source_domain", "target_domain"):
            if getattr(self, field).stream:
                raise ValueError(
                    f"{field}.stream: an adapt stage keeps both domains in memory (its method draws random "
                    "target rows beside every source batch, and shot relabels all target rows each epoch), so "
                    f"it cannot stream; drop {field}.stream (the Parquet shards are then loaded into memory, "
                    "from a bucket too)"
                )
        t = self.target_domain
        if t.labels_per_class is not None or t.label_fraction < 1.0 or t.drop_unlabelled:
            raise ValueError(
                "target_domain: target labels are never used for training (only to evaluate, and for "
                "selection: oracle); remove labels_per_class / label_fraction / drop_unlabelled"
            )
        source_free = ADAPT_METHODS.meta(self.method.name).get("source_free", False)
        if source_free and not self.source:
            raise ValueError(
                f"method {self.method.name!r} is source-free: it adapts a trained source model, so "
                "give source: <a train stage on the source domain>"
            )
        if source_free and self.selection == "source_val":
            raise ValueError(
                f"selection: source_val needs source data, which source-free {self.method.name!r} "
                "never sees; use entropy or snd (or oracle, not deployable)"
            )
        return self

    def references(self) -> list[tuple[str, str]]:
        return [("source", self.source)] if self.source else []


def selection_score(rule: str, metrics: dict[str, Any]) -> float:
    """Higher is better for every rule (entropy is negated)."""
    return SELECTION_RULES[rule](metrics)


class Adapt(Method):
    def __init__(
        self,
        model: nn.Module,
        spec: Any,
        num_classes: int,
        x_tgt: torch.Tensor,
        source_val: tuple[torch.Tensor, torch.Tensor] | None,
        seed: int,
        rank: int,
    ):
        ADAPT_METHODS.get(spec.method.name).prepare_model(model)  # e.g. SHOT freezes the head, before DDP
        super().__init__(model)
        self.adapt = build_adapt_method(spec.method, model, num_classes)
        self.source_free = self.adapt.source_free
        self.selection = spec.selection
        self.x_tgt, self.source_val = x_tgt, source_val
        self.target_batch = spec.target_batch_size or max(1, spec.optim.batch_size)
        self.generator = torch.Generator().manual_seed(seed * 7919 + rank)
        self.best = copy.deepcopy(model)  # the selected model; checkpointed, so resume keeps it
        for p in self.best.parameters():
            p.requires_grad_(False)
        self.register_buffer("best_score", torch.tensor(float("-inf"), dtype=torch.float64))  # a tie stays a tie

    def to_device(self, device: torch.device) -> "Adapt":
        super().to_device(device)
        self.x_tgt = self.x_tgt.to(device)
        if self.source_val is not None:
            self.source_val = (self.source_val[0].to(device), self.source_val[1].to(device))
        return self

    def on_epoch_start(self, epoch: int, progress: float) -> None:
        if hasattr(self.adapt, "refresh_pseudo_labels"):
            self.adapt.refresh_pseudo_labels(self.x_tgt)  # type: ignore[operator]  # torch: Module.__getattr__

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        progress = min(float(batch.get("progress", 0.0)), 1.0)
        if self.source_free:  # the loop iterates the target domain itself
            return self.adapt({"x_tgt": batch["x"]}, progress)
        idx = torch.randint(len(self.x_tgt), (self.target_batch,), generator=self.generator)
        return self.adapt(
            {"x_src": batch["x"], "y_src": batch["y"], "x_tgt": self.x_tgt[idx.to(self.x_tgt.device)]}, progress
        )

    @torch.no_grad()
    def epoch_scores(self, device: torch.device) -> dict[str, float]:
        was = self.model.training
        self.model.eval()
        logits = predict(self.model, self.x_tgt[:VALIDATION_ROWS], 512)
        scores = {"val_entropy": entropy_score(logits), "val_snd": snd_score(logits, softmax=True)}
        if self.source_val is not None:
            x, y = self.source_val
            scores["val_source_acc"] = float((predict(self.model, x, 512).argmax(1) == y).float().mean())
        self.model.train(was)
        return scores

    def on_epoch_end(self, metrics: dict[str, Any]) -> None:
        score = selection_score(self.selection, metrics)
        metrics["selection_score"] = score
        metrics["selected"] = score > float(self.best_score)  # type: ignore[arg-type]  # torch: Module.__getattr__
        if metrics["selected"]:
            self.best.load_state_dict(self.model.state_dict())
            self.best_score.fill_(score)  # type: ignore[operator]  # torch: Module.__getattr__


# --------------------------------------------------------------------------- the driver side


def target_accuracy(model: nn.Module, spec: Any) -> float:
    test = kdata.load(spec.target_domain, "test")
    return metrics_for(predict(model, kdata.normalize(test.x, test), 512), test.y)["top1"]


def baseline(ctx: StageContext, job: Any) -> tuple[Artifact, str]:
    """The source-only model: the ``source`` stage, or a source_only run of this recipe (reused if stored)."""
    if ctx.stage.source:
        return ctx.parents[ctx.stage.source], "the source stage"
    stage = ctx.stage.model_copy(
        update={
            "name": "source-only",
            "selection": "source_val",
            "method": ctx.stage.method.model_validate({"name": "source_only"}),
        }
    )
    # Keyed by the recipe alone (not the method or the stage name): adapt stages that differ only in
    # their method share one baseline.
    key = spec_hash(
        {"spec": stage.model_dump(mode="json", exclude={"run", "name", "target_batch_size"}), "seed": ctx.run.seed}
    )[:12]
    store = layout.baseline(ctx.root, ctx.pipeline.name, key)
    art = read_artifact(store)
    if art is not None:
        ctx.log(f"[{ctx.stage.name}] source-only baseline: reused {store.uri()}")
        return art, "a source_only run of the same recipe (reused)"
    ctx.log(f"[{ctx.stage.name}] source-only baseline: training it -> {store.uri()}")
    base_job = job.replace(spec=stage, key=key)
    result = ctx.train(base_job)
    base_ctx = StageContext(ctx.pipeline, stage, key, store, ctx.root, {}, ctx.log, ctx.fit)
    return base_ctx.publish(base_job, result), "a source_only run of the same recipe"


def check_source(ctx: StageContext, kwargs: dict[str, Any]) -> None:
    if not ctx.stage.source:
        return
    record = ctx.parents[ctx.stage.source].manifest.get("model") or {}
    if (
        record.get("name") != ctx.stage.model.label  # a registry name, or a user model's import path
        or record.get("kwargs", {}).get("num_classes") != kwargs["num_classes"]
    ):
        raise KdrayError(
            f"stages.{ctx.stage.name}.source: {ctx.stage.source!r} is {record.get('name')} with "
            f"{record.get('kwargs', {}).get('num_classes')} classes, but this stage adapts "
            f"{ctx.stage.model.label} with {kwargs['num_classes']} classes",
            hint="Adapt the same architecture on data with the same classes as the source model.",
        )


@stage_kind
class AdaptKind(StageKind):
    """Adapt ``model`` from a labelled source domain to an unlabelled target domain; report the gain
    over the source-only baseline."""

    spec = AdaptStage

    def run(self, ctx: StageContext) -> Artifact:
        job = ctx.job(publish_prefix="best.")
        check_source(ctx, job.extras["model_kwargs"])
        if ctx.stage.source:
            job.extras["init_uri"] = ctx.parents[ctx.stage.source].pinned_uri  # the version read at planning
        base, how = baseline(ctx, job)
        result = ctx.train(job)
        adapted = build_model(ctx.stage.model, job.extras["model_kwargs"])
        adapted.load_state_dict(result.model_state)
        adapted_acc, base_acc = target_accuracy(adapted, ctx.stage), target_accuracy(base.build_model(), ctx.stage)
        selected = max((h for h in result.history if h.get("selected")), key=lambda h: h["epoch"])
        summary = {
            "target_acc": adapted_acc,
            "source_only_acc": base_acc,
            "gain": adapted_acc - base_acc,
            "selection": ctx.stage.selection,
            "selected_epoch": selected["epoch"],
            "deployable": ctx.stage.selection != "oracle",
            "baseline": {"uri": base.uri, "how": how},
        }
        flag = "" if summary["deployable"] else " (oracle selection uses target labels: NOT DEPLOYABLE)"
        ctx.log(
            f"[{ctx.stage.name}] {ctx.stage.method.name}: target accuracy {adapted_acc:.4f} vs source-only "
            f"{base_acc:.4f} ({summary['gain']:+.4f}), selected epoch {selected['epoch']} by "
            f"{ctx.stage.selection}{flag}"
        )
        return ctx.publish(job, result, extra={"adapt": summary, "metrics": {**result.metrics, **summary}})

    def method(self, job: Job, shard: Shard) -> Adapt:
        spec = job.spec
        model = build_model(spec.model, job.extras["model_kwargs"])
        if job.extras.get("init_uri"):
            load_state_checked(
                model,
                open_artifact(job.extras["init_uri"]).state_dict(),
                source=job.extras["init_uri"],
                target=spec.model.label,
            )
        rank, world = shard.rank, shard.world
        target = kdata.load(spec.target_domain, "train")
        x_tgt = kdata.normalize(target.x, target)
        per = len(x_tgt) // world
        source_val = None
        if not ADAPT_METHODS.meta(spec.method.name)["source_free"]:
            val = kdata.load(spec.source_domain, "val")
            rows = min(len(val) // world, VALIDATION_ROWS)  # this rank's share of the SOURCE validation rows
            part = slice(rank * rows, (rank + 1) * rows)
            source_val = (kdata.normalize(val.x, val)[part], val.y[part])
        return Adapt(
            model,
            spec,
            job.extras["model_kwargs"]["num_classes"],
            x_tgt[rank * per : (rank + 1) * per],
            source_val,
            job.run.seed,
            rank,
        )

    def data(self, job: Job) -> tuple[kdata.Split, kdata.Split]:
        """Train on the source domain (or, source-free, on the target domain without its labels);
        watch the target domain's validation split (only ``selection: oracle`` chooses by it)."""
        spec = job.spec
        val = kdata.load(spec.target_domain, "val")
        if ADAPT_METHODS.meta(spec.method.name)["source_free"]:
            target = kdata.load(spec.target_domain, "train")
            return dataclasses.replace(target, y=torch.full_like(target.y, -1)), val
        return kdata.load(spec.source_domain, "train"), val
