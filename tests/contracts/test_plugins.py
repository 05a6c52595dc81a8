"""Every pluggable kind is one decorated definition: a stage kind, a loss, a model, a shift, an
adaptation method and a transfer strategy, each defined here in the test and used through the
same path as the built-in ones (spec validation, the pipeline, the training loop)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pytest
import torch
import torch.nn as nn
from helpers import synthetic_pipeline
from pydantic import Field

from kdray.adapt.methods import ADAPT_METHODS, AdaptMethod, AdaptMethodSpec
from kdray.contracts.checkpoint import Artifact, open_artifact
from kdray.contracts.specs import DataSpec, ModelSpec, OptimSpec, StageBase
from kdray.contracts.stage import STAGE_KINDS, Job, Shard, StageContext, StageKind, stage_kind
from kdray.core.errors import SpecError
from kdray.data.shifts import SHIFTS, Shift, compose
from kdray.distill.losses import LOSSES, DistillLoss, LossTerm
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import json_schema, parse_pipeline
from kdray.models import MODELS, Classifier, create_model
from kdray.supervised import Supervised
from kdray.transfer.mapping import MATCH_STRATEGIES, PlanState, TransferSpec, plan_transfer


@pytest.fixture
def registered():
    """Names registered by a test, removed afterwards so other tests see the built-in tables."""
    added: list[tuple[Any, str]] = []
    yield added
    for registry, name in added:
        registry.unregister(name)


def test_a_stage_kind_is_one_class(tmp_path, registered):
    class FewerLabelsStage(StageBase):
        """Supervised training with every fifth label withheld (a toy kind)."""

        kind: Literal["fewer-labels"] = "fewer-labels"
        model: ModelSpec
        data: DataSpec = Field(default_factory=DataSpec)
        optim: OptimSpec = Field(default_factory=OptimSpec)

    @stage_kind
    class FewerLabels(StageKind):
        spec = FewerLabelsStage

        def run(self, ctx: StageContext) -> Artifact:
            job = ctx.job()
            return ctx.publish(job, ctx.train(job), extra={"toy": True})

        def method(self, job: Job, shard: Shard) -> Supervised:
            return Supervised(create_model(job.spec.model.name, **job.extras["model_kwargs"]))

        def data(self, job: Job):
            train, test = super().data(job)
            y = train.y.clone()
            y[torch.arange(len(y)) % 5 == 4] = -1  # every fifth row keeps its image, loses its label
            return type(train)(**{**train.__dict__, "y": y}), test

    registered.append((STAGE_KINDS, "fewer-labels"))
    doc = synthetic_pipeline(tmp_path, workers=0, epochs=4)
    doc["stages"][0]["kind"] = "fewer-labels"
    spec = parse_pipeline(doc)
    assert isinstance(spec.stages[0], FewerLabelsStage)
    assert "fewer-labels" in str(json_schema()), "the JSON Schema lists the new kind"
    [outcome] = run_pipeline(spec, log=lambda m: None)
    art = open_artifact(outcome.uri)
    assert art.manifest["kind"] == "fewer-labels" and art.manifest["toy"] is True
    assert art.manifest["history"][-1]["val_acc"] > 0.6, "it trains through the same loop"

    doc["stages"][0]["kind"] = "fewer-label"
    with pytest.raises(SpecError, match="unknown stage kind 'fewer-label'.*fewer-labels"):
        parse_pipeline(doc)


def test_a_loss_is_one_class(registered):
    @LOSSES.register("logit_l1")
    class LogitL1(DistillLoss):
        """Mean absolute difference of the logits."""

        def __init__(self, scale: Annotated[float, Field(gt=0)] = 1.0):
            super().__init__()
            self.scale = scale

        def forward(self, student, teacher, batch):
            return self.scale * (student.logits - self._teacher(teacher).logits.detach()).abs().mean()

    registered.append((LOSSES, "logit_l1"))
    term = LossTerm.model_validate({"name": "logit_l1", "weight": 0.5, "scale": 2})
    assert term.params == {"scale": 2.0}
    assert isinstance(term.build(), LogitL1) and term.build().scale == 2.0
    with pytest.raises(ValueError, match="parameter 'scale' = -1 is invalid"):
        LossTerm.model_validate({"name": "logit_l1", "scale": -1})


def test_a_model_is_one_function(registered):
    @MODELS.register("toy_linear", family="toy")
    def toy_linear(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, bias: bool = True) -> Classifier:
        class Linear(Classifier):
            def __init__(self):
                super().__init__()
                self.flat = nn.Flatten()
                self.classifier = nn.Linear(in_channels * image_size**2, num_classes, bias=bias)

            def embed(self, x):
                return self.flat(x)

        return Linear()

    registered.append((MODELS, "toy_linear"))
    spec = ModelSpec.model_validate({"name": "toy_linear", "bias": False})
    assert spec.params == {"bias": False}
    model = create_model("toy_linear", num_classes=3, in_channels=1, image_size=4, **spec.params)
    assert model(torch.zeros(2, 1, 4, 4)).shape == (2, 3) and model.classifier.bias is None
    with pytest.raises(ValueError, match="has no parameter 'biass'; did you mean 'bias'"):
        ModelSpec.model_validate({"name": "toy_linear", "biass": False})


def test_a_shift_is_one_class(registered):
    @SHIFTS.register("brighten")
    class Brighten(Shift):
        def __init__(self, amount: Annotated[float, Field(ge=0, le=1)] = 0.2):
            self.amount = amount

        def apply(self, x, y, seed):
            return (x + self.amount).clamp(0, 1), y

    registered.append((SHIFTS, "brighten"))
    data = DataSpec.model_validate({"name": "synthetic", "shifts": [{"name": "brighten", "amount": 0.5}]})
    x, _ = compose(data.shifts)(torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), 0)
    assert torch.allclose(x, torch.full_like(x, 0.5))
    with pytest.raises(ValueError, match="'amount' = 2"):
        DataSpec.model_validate({"name": "synthetic", "shifts": [{"name": "brighten", "amount": 2}]})


def test_an_adaptation_method_is_one_class(registered):
    @ADAPT_METHODS.register("mean_match", source_free=False)
    class MeanMatch(AdaptMethod):
        """Cross-entropy on the source plus the squared distance of the two domains' mean logits."""

        def forward(self, batch, progress):
            s, t = self.model(batch["x_src"]), self.model(batch["x_tgt"])
            ce = nn.functional.cross_entropy(s, batch["y_src"])
            gap = (s.mean(0) - t.mean(0)).pow(2).sum()
            return {"loss": ce + self.weight * gap, "logits": s, "gap": gap.detach()}

    registered.append((ADAPT_METHODS, "mean_match"))
    spec = AdaptMethodSpec.model_validate({"name": "mean_match", "weight": 0.3})
    method = spec.build(create_model("mlp_32", num_classes=4, image_size=8), 4)
    out = method(
        {"x_src": torch.randn(5, 1, 8, 8), "y_src": torch.arange(5) % 4, "x_tgt": torch.randn(6, 1, 8, 8)}, 0.5
    )
    assert out["loss"].ndim == 0 and float(out["gap"]) >= 0 and method.weight == 0.3


def test_a_transfer_strategy_is_one_function(registered):
    @MATCH_STRATEGIES.register("reversed_shape", ops=("copy",))
    def reversed_shape(state: PlanState, rule, i: int) -> None:
        """Pair open target tensors with same-shaped source tensors, the last source first."""
        used = {e.source for e in state.claims.values() if e.source}
        pool = [k for k in reversed(state.s_anchor) if k not in used]
        for k in state.t_anchor:
            match = next((s for s in pool if state.src[s] == state.tgt[k]), None)
            if k not in state.claims and match:
                pool.remove(match)
                state.claim_transfer(k, match, "copy", f"mapping[{i}] reversed_shape")

    registered.append((MATCH_STRATEGIES, "reversed_shape"))
    src, tgt = create_model("mlp_32", image_size=8), create_model("mlp_32", image_size=8)
    plan = plan_transfer(src.state_dict(), tgt, TransferSpec.model_validate({"mapping": [{"match": "reversed_shape"}]}))
    by_key = plan.by_key()
    assert all(e.status == "copied" for e in plan.entries)
    assert any(e.rule == "mapping[0] reversed_shape" for e in by_key.values())
    with pytest.raises(ValueError, match="unknown match strategy 'reversed_shap'"):
        TransferSpec.model_validate({"mapping": [{"match": "reversed_shap"}]})
