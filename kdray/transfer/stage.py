"""The ``transfer`` stage: initialise a target network from a source network, then train it.

Driver side (``TransferKind.run``): pick the source (a stage, a URI, or the best of ``candidates``
by LogME), plan the weight mapping on a fresh target model so that a mapping that cannot hold
fails before any worker starts, log the transfer report, train, and publish the model with
``transfer_report.json``. Worker side (``Transfer``): apply the mapping, the layer rules (freeze,
``lr_scale``, re-init), the BatchNorm mode after every ``train()``, and L2-SP toward the source.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from kdray.contracts.checkpoint import Artifact, open_artifact
from kdray.contracts.method import Method, labelled_cross_entropy
from kdray.contracts.specs import DataSpec, ModelSpec, OptimSpec, StageBase
from kdray.contracts.stage import Job, Shard, StageContext, StageKind, model_kwargs, stage_kind
from kdray.contracts.usermodels import build_model
from kdray.transfer.mapping import (
    L2SP,
    MappingRule,
    TransferReport,
    TransferSpec,
    apply_batchnorm_rules,
    apply_layer_rules,
    apply_transfer,
    plan_transfer,
)
from kdray.transfer.scoring import score_sources


class TransferStage(StageBase):
    """Initialise ``model`` (the target) from ``source`` and train it on ``data`` (the target task).

    ``source`` is a stage name, an artifact URI, or ``auto``: then every stage in ``candidates`` is
    scored on the target training data (LogME) and the best one is used.
    """

    kind: Literal["transfer"] = "transfer"
    source: str
    candidates: list[str] = Field(default_factory=list)
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    transfer: TransferSpec = Field(default_factory=TransferSpec)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    score: Literal["logme", "leep"] = "logme"

    @model_validator(mode="after")
    def _auto(self) -> "TransferStage":
        if self.source == "auto" and len(self.candidates) < 2:
            raise ValueError("source: auto picks the best of 'candidates'; list at least two source stages or URIs")
        if self.source != "auto" and self.candidates:
            raise ValueError("candidates are only read with source: auto; remove them or set source: auto")
        return self

    def references(self) -> list[tuple[str, str]]:
        if self.source == "auto":
            return [(f"candidates[{i}]", c) for i, c in enumerate(self.candidates)]
        return [("source", self.source)]


class Transfer(Method):
    """Cross-entropy on the target task, plus L2-SP toward the source weights when configured."""

    def __init__(
        self,
        model: nn.Module,
        spec: TransferSpec,
        source_state: dict[str, torch.Tensor],
        source_arch: str,
        target_arch: str,
        label_smoothing: float = 0.0,
    ):
        super().__init__(model)
        self.spec, self.label_smoothing = spec, label_smoothing
        plan = plan_transfer(source_state, model, spec, source_arch=source_arch, target_arch=target_arch)
        self.report: TransferReport = apply_transfer(model, source_state, plan)
        self.groups = apply_layer_rules(model, spec)
        self.l2sp = self.keep_frozen("l2sp", L2SP(model, source_state, plan)) if spec.l2sp else None

    def param_groups(self) -> list[dict[str, Any]]:
        return self.groups

    def train(self, mode: bool = True) -> "Transfer":
        super().train(mode)
        if mode:
            apply_batchnorm_rules(self.model, self.spec)  # eval/frozen BatchNorm stays so in training
        return self

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.model(batch["x"])
        ce = labelled_cross_entropy(logits, batch["y"], self.label_smoothing)
        out = {"logits": logits, "cross_entropy": ce.detach()}
        if self.l2sp is not None:
            reg = self.l2sp(self.model)
            out["l2sp"] = reg.detach()
            ce = ce + reg
        return {"loss": ce, **out}


def choose_source(ctx: StageContext) -> tuple[Artifact, list[dict[str, Any]]]:
    """The stage's source, or (``source: auto``) the candidate with the best score on the target data."""
    stage = ctx.stage
    if stage.source != "auto":
        return ctx.parents[stage.source], []
    rows = score_sources({ref: ctx.parents[ref] for ref in stage.candidates}, stage.data)
    rows.sort(key=lambda r: -r[stage.score])
    for r in rows:
        ctx.log(f"[{stage.name}] candidate {r['ref']:<16} LogME {r['logme']:+.4f}  LEEP {r['leep']:+.4f}")
    best = rows[0]["ref"]
    ctx.log(f"[{stage.name}] source: auto -> {best!r} (best {stage.score})")
    return ctx.parents[best], rows


def label_space(data: dict[str, Any]) -> tuple[Any, Any]:
    return data.get("name"), data.get("classes")


def with_new_head(ctx: StageContext, source: Artifact) -> Any:
    """The stage, with a rule that re-initialises the classifier when source and target label
    different things (another dataset or class subset) and the mapping does not decide it itself.

    A head trained for classes 0-4 has the right shape for classes 5-9 but the wrong meaning;
    copying it (what ``match: name`` alone would do) is never what a user means.
    """
    source_data = (source.manifest.get("spec") or {}).get("data") or {}
    target = ctx.stage.data.model_dump(mode="json")
    rules = ctx.stage.transfer.mapping
    kwargs = model_kwargs(ctx.stage.model, ctx.stage.data)
    same_width = source.manifest["model"]["kwargs"].get("num_classes") == kwargs["num_classes"]
    if not source_data or label_space(source_data) == label_space(target) or not same_width:
        return ctx.stage  # (a head of another width is re-initialised by the mapping, with that reason)
    # the target's head: "classifier" for a registry model, the adopted last nn.Linear for a user's model
    name = getattr(build_model(ctx.stage.model, kwargs, weights=False), "classifier_name", "classifier")
    if any(r.pairs and any(k.startswith(name) for k in r.pairs) for r in rules):
        return ctx.stage  # the mapping decides the head itself
    ctx.log(
        f"[{ctx.stage.name}] source labels {label_space(source_data)} differ from target labels "
        f"{label_space(target)}: the classifier head starts fresh (map {name}.* explicitly to change this)"
    )
    head = MappingRule(match="explicit", pairs={f"{name}.*": None}, op="reinit")
    transfer = ctx.stage.transfer.model_copy(update={"mapping": [head, *rules]})
    return ctx.stage.model_copy(update={"transfer": transfer})


@stage_kind
class TransferKind(StageKind):
    """Initialise ``model`` from a source network (``W_target = W_source``), then train it on ``data``."""

    spec = TransferStage
    uses_unlabelled = False  # cross-entropy: rows whose label is withheld are not iterated
    # data.stream: Ray Data feeds the loop (the method reads only the batch; source: auto scores the
    # candidates on the first rows of the training part, read shard by shard: scoring.streamed_target)
    streams = True

    def run(self, ctx: StageContext) -> Artifact:
        source, ranking = choose_source(ctx)
        ctx.stage = with_new_head(ctx, source)
        job = ctx.job(source_uri=source.uri)
        # Plan on the driver: a mapping that cannot hold fails here, naming both sides, before Ray starts.
        dry = Transfer(
            build_model(ctx.stage.model, job.extras["model_kwargs"]),
            ctx.stage.transfer,
            source.state_dict(),
            source.manifest["model"]["name"],
            ctx.stage.model.label,  # a registry name, or a user model's import path
        )
        ctx.log(
            f"[{ctx.stage.name}] transfer from {source.manifest['model']['name']} ({source.uri}):\n"
            + dry.report.to_table()
        )
        result = ctx.train(job)
        files = {"transfer_report.json": json.dumps(dry.report.to_json(), indent=2).encode()}
        if ranking:
            files["transferability.json"] = json.dumps(ranking, indent=2).encode()
        return ctx.publish(
            job,
            result,
            files,
            extra={
                "source": {"uri": source.uri, "model": source.manifest["model"]["name"], "ranking": ranking},
                "transfer": dry.report.summary(),
            },
        )

    def method(self, job: Job, shard: Shard) -> Transfer:
        source = open_artifact(job.extras["source_uri"])
        model = build_model(job.spec.model, job.extras["model_kwargs"])
        return Transfer(
            model,
            job.spec.transfer,
            source.state_dict(),
            source.manifest["model"]["name"],
            job.spec.model.label,
            job.spec.label_smoothing,
        )
