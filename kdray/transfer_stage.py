"""The ``transfer`` stage: initialise a target network from a source network, then train it.

Driver side (``run_transfer``): pick the source (a stage, a URI, or the best of ``candidates`` by
LogME), plan the weight mapping on a fresh target model so that a mapping that cannot hold fails
before any worker starts, log the transfer report, ``fit``, and publish the model with
``transfer_report.json``. Worker side (``Transfer``): apply the mapping, the layer rules (freeze,
``lr_scale``, re-init), the BatchNorm mode after every ``train()``, and L2-SP toward the source.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray import data as kdata
from kdray.checkpoint import Artifact, open_artifact
from kdray.methods import METHODS, Method
from kdray.models import create_model
from kdray.scoring import score_sources
from kdray.stages import STAGES, WORKER_DATA, WORKER_METHODS, StageContext, make_job, model_kwargs, publish_trained
from kdray.transfer import (L2SP, MappingRule, TransferReport, TransferSpec, apply_batchnorm_rules,
                            apply_layer_rules, apply_transfer, plan_transfer, tie_modules)


@METHODS.register("transfer")
class Transfer(Method):
    """Cross-entropy on the target task, plus L2-SP toward the source weights when configured."""

    def __init__(self, model: nn.Module, spec: TransferSpec, source_state: dict[str, torch.Tensor],
                 source_arch: str, target_arch: str, label_smoothing: float = 0.0):
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
        y = batch["y"]
        ce = (F.cross_entropy(logits, y, ignore_index=-1, label_smoothing=self.label_smoothing)
              if bool((y >= 0).any()) else logits.sum() * 0.0)
        out = {"logits": logits, "cross_entropy": ce.detach()}
        if self.l2sp is not None:
            reg = self.l2sp(self.model)
            out["l2sp"] = reg.detach()
            ce = ce + reg
        return {"loss": ce, **out}


def _worker_method(job: Any, spec: Any, train: kdata.Split, x_train: torch.Tensor, mine: torch.Tensor) -> Transfer:
    source = open_artifact(job.extras["source_uri"])
    model = create_model(spec.model.name, **job.extras["model_kwargs"])
    return Transfer(model, spec.transfer, source.state_dict(), source.manifest["model"]["name"], spec.model.name,
                    spec.label_smoothing)


WORKER_METHODS["transfer"] = _worker_method


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


def label_space(data: dict[str, Any]) -> tuple[str, Any]:
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
    mentions_head = any(r.pairs and any(k.startswith("classifier") for k in r.pairs) for r in rules)
    same_width = source.manifest["model"]["kwargs"].get("num_classes") == model_kwargs(ctx.stage.model, ctx.stage.data)["num_classes"]
    if not source_data or label_space(source_data) == label_space(target) or mentions_head or not same_width:
        return ctx.stage  # (a head of another width is re-initialised by the mapping, with that reason)
    ctx.log(f"[{ctx.stage.name}] source labels {label_space(source_data)} differ from target labels "
            f"{label_space(target)}: the classifier head starts fresh (map classifier.* explicitly to change this)")
    head = MappingRule(match="explicit", pairs={"classifier.*": None}, op="reinit")
    transfer = ctx.stage.transfer.model_copy(update={"mapping": [head, *rules]})
    return ctx.stage.model_copy(update={"transfer": transfer})


@STAGES.register("transfer")
def run_transfer(ctx: StageContext) -> Artifact:
    from kdray.train import fit

    source, ranking = choose_source(ctx)
    ctx.stage = with_new_head(ctx, source)
    job = make_job(ctx, source_uri=source.uri)
    # Plan on the driver: a mapping that cannot hold fails here, naming both sides, before Ray starts.
    dry = Transfer(create_model(ctx.stage.model.name, **job.extras["model_kwargs"]), ctx.stage.transfer,
                   source.state_dict(), source.manifest["model"]["name"], ctx.stage.model.name)
    ctx.log(f"[{ctx.stage.name}] transfer from {source.manifest['model']['name']} ({source.uri}):\n"
            + dry.report.to_table())
    result = fit(job, ctx.root)
    files = {"transfer_report.json": json.dumps(dry.report.to_json(), indent=2).encode()}
    if ranking:
        files["transferability.json"] = json.dumps(ranking, indent=2).encode()
    return publish_trained(ctx, job, result, files, extra={
        "source": {"uri": source.uri, "model": source.manifest["model"]["name"], "ranking": ranking},
        "transfer": dry.report.summary()})


# --------------------------------------------------------------------------- joint parameter sharing


@METHODS.register("share")
class Share(Method):
    """``CE_a(net_a(x_a)) + weight_b · CE_b(net_b(x_b))`` with the shared modules tied; ``model`` is net B."""

    def __init__(self, net_a: nn.Module, net_b: nn.Module, shared: list[str], x_b: torch.Tensor, y_b: torch.Tensor,
                 weight_b: float, batch_size: int, seed: int):
        super().__init__(net_b)
        self.net_a = net_a
        self.shared = tie_modules(net_a, net_b, shared)
        self.x_b, self.y_b, self.weight_b, self.batch_size = x_b, y_b, weight_b, batch_size
        self.generator = torch.Generator().manual_seed(seed * 7919 + 1)

    def to_device(self, device: torch.device) -> "Share":
        super().to_device(device)
        self.x_b, self.y_b = self.x_b.to(device), self.y_b.to(device)
        return self

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        idx = torch.randint(len(self.y_b), (self.batch_size,), generator=self.generator).to(self.x_b.device)
        logits_a, logits_b = self.net_a(batch["x"]), self.model(self.x_b[idx])
        ce_a = F.cross_entropy(logits_a, batch["y"], ignore_index=-1)
        ce_b = F.cross_entropy(logits_b, self.y_b[idx], ignore_index=-1)
        return {"loss": ce_a + self.weight_b * ce_b, "logits": logits_a, "ce_a": ce_a.detach(), "ce_b": ce_b.detach()}


def _share_method(job: Any, spec: Any, train: kdata.Split, x_train: torch.Tensor, mine: torch.Tensor) -> Share:
    net_a = create_model(spec.model.name, **job.extras["model_a_kwargs"])
    net_b = create_model(spec.model.name, **job.extras["model_kwargs"])
    task_b = kdata.load(spec.data_b, "train")
    keep = task_b.y >= 0  # task B's labelled rows (it may have few)
    return Share(net_a, net_b, spec.shared, kdata.normalize(task_b.x, task_b)[keep], task_b.y[keep], spec.weight_b,
                 max(1, spec.optim.batch_size), job.run["seed"])


WORKER_METHODS["share"] = _share_method
WORKER_DATA["share"] = lambda job, spec: (kdata.load(spec.data, "train"), kdata.load(spec.data_b, "test"))


@STAGES.register("share")
def run_share(ctx: StageContext) -> Artifact:
    from kdray.train import fit

    job = make_job(ctx)
    job.extras["model_a_kwargs"] = job.extras["model_kwargs"]
    job.extras["model_kwargs"] = model_kwargs(ctx.stage.model, ctx.stage.data_b)
    # Tie on the driver first: a glob that matches nothing or modules that differ fail before Ray starts.
    tied = tie_modules(create_model(ctx.stage.model.name, **job.extras["model_a_kwargs"]),
                       create_model(ctx.stage.model.name, **job.extras["model_kwargs"]), ctx.stage.shared)
    ctx.log(f"[{ctx.stage.name}] tied modules (one tensor for both tasks): {', '.join(tied)}")
    result = fit(job, ctx.root)
    return publish_trained(ctx, job, result, extra={"shared": tied})
