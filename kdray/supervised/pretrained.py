"""The ``pretrained`` stage: publish a model from weights, without training, so that it can be a teacher or a source.

    - kind: pretrained
      name: teacher
      model: {import: "my_nets:resnet", options: {width: 64}, weights: "s3://models/resnet.safetensors"}
      data: {name: fashion_mnist}      # sets num_classes/in_channels/image_size and the task it is checked on

A distill stage's ``teacher`` or a transfer stage's ``source`` then names it like any stage. Its
artifact holds the loaded weights and a manifest whose model record keeps the import path and the
sha256 of the source file (lineage). With ``evaluate: true`` the test accuracy is measured and recorded.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field

from kdray.contracts.checkpoint import Artifact, write_artifact
from kdray.contracts.specs import DataSpec, ModelSpec, StageBase
from kdray.contracts.stage import StageContext, StageKind, model_kwargs, model_record, stage_kind
from kdray.contracts.usermodels import build_model
from kdray.core.metrics import metrics_for, predict
from kdray.data import datasets as kdata


class PretrainedStage(StageBase):
    """A model initialised from ``model.weights`` (or by its own factory), published without training."""

    kind: Literal["pretrained"] = "pretrained"
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    evaluate: bool = False


@stage_kind
class PretrainedKind(StageKind):
    """Publish ``model`` with its pretrained weights as an artifact (no training)."""

    spec = PretrainedStage
    trains = False

    def run(self, ctx: StageContext) -> Artifact:
        t0 = time.perf_counter()
        stage: PretrainedStage = ctx.stage
        kwargs = model_kwargs(stage.model, stage.data)
        model = build_model(stage.model, kwargs).eval()
        metrics = {}
        if stage.evaluate:
            test = kdata.load(stage.data, "test")
            logits = predict(model, kdata.normalize(test.x, test), batch_size=256)
            metrics = metrics_for(logits, test.y)
        source = stage.model.hf or stage.model.weights or "its factory"
        ctx.log(f"[{stage.name}] pretrained {stage.model.label} from {source}")
        manifest = ctx.base_manifest() | {
            "model": model_record(stage.model, kwargs, model),
            "metrics": metrics,
            "history": [],
            "timings": {"seconds": round(time.perf_counter() - t0, 3)},
        }
        return write_artifact(ctx.store, manifest, model.state_dict())
