"""The ``train`` stage: plain supervised training of a source network, a teacher, or a scratch baseline."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from kdray.contracts.checkpoint import Artifact
from kdray.contracts.method import Method, labelled_cross_entropy
from kdray.contracts.specs import DataSpec, ModelSpec, OptimSpec, StageBase
from kdray.contracts.stage import Job, Shard, StageContext, StageKind, stage_kind
from kdray.contracts.usermodels import build_model
from kdray.models import lm


class TrainStage(StageBase):
    """Plain supervised training: a source network, a teacher, or a scratch baseline."""

    kind: Literal["train"] = "train"
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class Supervised(Method):
    """Cross-entropy on labelled examples (label -1 is ignored); optional label smoothing. A causal LM
    (logits ``[N, T, V]``) learns its rows' next tokens instead (``kdray.models.lm``)."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__(model)
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.model(batch["x"])
        if lm.is_sequence(logits):  # a causal LM on token rows: next-token loss (no per-row accuracy)
            return {"loss": lm.next_token_nll(logits, batch["x"])}
        return {"loss": labelled_cross_entropy(logits, batch["y"], self.label_smoothing), "logits": logits}


@stage_kind
class TrainKind(StageKind):
    """Train ``model`` on ``data`` with cross-entropy."""

    spec = TrainStage
    uses_unlabelled = False  # cross-entropy: rows whose label is withheld are not iterated
    streams = True  # data.stream: Ray Data feeds the loop

    def run(self, ctx: StageContext) -> Artifact:
        job = ctx.job()
        return ctx.publish(job, ctx.train(job))

    def method(self, job: Job, shard: Shard) -> Supervised:
        model = build_model(job.spec.model, job.extras["model_kwargs"])
        return Supervised(model, label_smoothing=job.spec.label_smoothing)
