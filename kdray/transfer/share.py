"""The ``share`` stage: parameter sharing ``W_shared = W_a ∩ W_b`` between two networks trained together."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from kdray.contracts.checkpoint import Artifact
from kdray.contracts.method import Method, labelled_cross_entropy
from kdray.contracts.specs import DataSpec, ModelSpec, OptimSpec, StageBase
from kdray.contracts.stage import Job, Shard, StageContext, StageKind, model_kwargs, stage_kind
from kdray.contracts.usermodels import build_model
from kdray.data import datasets as kdata
from kdray.transfer.mapping import tie_modules


class ShareStage(StageBase):
    """Parameter sharing ``W_shared = W_a ∩ W_b``: two networks of one architecture trained together
    on two tasks, the modules selected by ``shared`` tied (one tensor), each with its own head.

    Task A is ``data`` (iterated), task B is ``data_b`` (sampled alongside; its validation split is what
    the stage reports). The published model is network B, the one for the target task.
    """

    kind: Literal["share"] = "share"
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    data_b: DataSpec
    shared: list[str] = Field(default_factory=lambda: ["features.*"], min_length=1)
    weight_b: float = Field(1.0, gt=0)
    optim: OptimSpec = Field(default_factory=OptimSpec)


class Share(Method):
    """``CE_a(net_a(x_a)) + weight_b · CE_b(net_b(x_b))`` with the shared modules tied; ``model`` is net B."""

    def __init__(
        self,
        net_a: nn.Module,
        net_b: nn.Module,
        shared: list[str],
        x_b: torch.Tensor,
        y_b: torch.Tensor,
        weight_b: float,
        batch_size: int,
        seed: int,
    ):
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
        ce_a = labelled_cross_entropy(logits_a, batch["y"])
        ce_b = labelled_cross_entropy(logits_b, self.y_b[idx])
        return {"loss": ce_a + self.weight_b * ce_b, "logits": logits_a, "ce_a": ce_a.detach(), "ce_b": ce_b.detach()}


@stage_kind
class ShareKind(StageKind):
    """Train networks A (on ``data``) and B (on ``data_b``) jointly with the ``shared`` modules tied; publish B."""

    spec = ShareStage

    def run(self, ctx: StageContext) -> Artifact:
        job = ctx.job()
        job.extras["model_a_kwargs"] = job.extras["model_kwargs"]
        job.extras["model_kwargs"] = model_kwargs(ctx.stage.model, ctx.stage.data_b)
        # Tie on the driver first: a glob that matches nothing or modules that differ fail before Ray starts.
        tied = tie_modules(
            build_model(ctx.stage.model, job.extras["model_a_kwargs"]),
            build_model(ctx.stage.model, job.extras["model_kwargs"]),
            ctx.stage.shared,
        )
        ctx.log(f"[{ctx.stage.name}] tied modules (one tensor for both tasks): {', '.join(tied)}")
        return ctx.publish(job, ctx.train(job), extra={"shared": tied})

    def method(self, job: Job, shard: Shard) -> Share:
        spec = job.spec
        net_a = build_model(spec.model, job.extras["model_a_kwargs"])
        net_b = build_model(spec.model, job.extras["model_kwargs"])
        task_b = kdata.load(spec.data_b, "train")
        keep = task_b.y >= 0  # task B's labelled rows (it may have few)
        return Share(
            net_a,
            net_b,
            spec.shared,
            kdata.normalize(task_b.x, task_b)[keep],
            task_b.y[keep],
            spec.weight_b,
            max(1, spec.optim.batch_size),
            job.run.seed,
        )

    def data(self, job: Job) -> tuple[kdata.Split, kdata.Split]:
        """Iterate task A's training split; watch task B's validation split (what the stage is for)."""
        return kdata.load(job.spec.data, "train"), kdata.load(job.spec.data_b, "val")
