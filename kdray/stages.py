"""STAGES: what each stage kind does, on the driver (run and publish) and on the workers (its method).

A stage runner takes a ``StageContext`` (the spec, its key, its output folder, its parents'
artifacts) and publishes one artifact. Training kinds go through ``kdray.train.fit``; the
worker side calls ``build_method(job, ...)`` to get the ``nn.Module`` the loop optimises.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kdray import data as kdata
from kdray.checkpoint import Artifact, write_artifact
from kdray.methods import METHODS
from kdray.models import count_parameters, create_model
from kdray.registry import Registry
from kdray.storage import Storage

STAGES: Registry = Registry("stage kind")
WORKER_METHODS: dict[str, Callable[..., Any]] = {}


@dataclass
class StageContext:
    pipeline: Any                    # PipelineSpec
    stage: Any                       # the stage's spec
    key: str                         # hash of the stage spec and its parents' keys
    store: Storage                   # the artifact folder <root>/<pipeline>/<stage>/<key>
    root: Storage                    # the storage root (Ray's run folders live under it)
    parents: dict[str, Artifact] = field(default_factory=dict)  # reference -> finished artifact
    log: Callable[[str], None] = print

    @property
    def run(self) -> Any:
        return self.pipeline.run_for(self.stage)

    def base_manifest(self) -> dict[str, Any]:
        return {
            "kind": self.stage.kind, "pipeline": self.pipeline.name, "stage": self.stage.name, "key": self.key,
            "spec": self.stage.model_dump(mode="json"), "run": self.run.model_dump(mode="json"),
            "parents": [{"ref": ref, "uri": art.uri, "key": art.manifest.get("key"),
                         "weights_sha256": art.weights_sha256} for ref, art in self.parents.items()],
        }


def model_kwargs(model_spec: Any, data_spec: Any) -> dict[str, Any]:
    """Builder keywords for a model on a dataset: classes, channels and size come from the data."""
    facts = kdata.describe(data_spec)
    return {"num_classes": model_spec.num_classes or facts["num_classes"], "in_channels": facts["in_channels"],
            "image_size": facts["image_size"], **model_spec.options}


def model_record(model_spec: Any, kwargs: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    return {"name": model_spec.name, "kwargs": kwargs, "family": getattr(model, "family", "unknown"),
            "parameters": count_parameters(model), "feature_layers": list(getattr(model, "feature_layers", ())),
            "classifier": getattr(model, "classifier_name", "classifier")}


def publish_trained(ctx: StageContext, job: Any, result: Any, extra_files: dict[str, bytes] | None = None,
                    extra: dict[str, Any] | None = None) -> Artifact:
    """Write a trained model's artifact: weights, history, then the manifest."""
    kwargs = job.extras["model_kwargs"]
    model = create_model(ctx.stage.model.name, **kwargs)
    manifest = ctx.base_manifest() | {
        "model": model_record(ctx.stage.model, kwargs, model),
        "metrics": result.metrics, "history": result.history, "ray_run": result.run_path,
        "timings": {"fit_seconds": round(result.seconds, 3)}, **(extra or {}),
    }
    files = {"history.json": json.dumps(result.history, indent=1).encode(), **(extra_files or {})}
    return write_artifact(ctx.store, manifest, result.model_state, files)


def make_job(ctx: StageContext, **extras: Any) -> Any:
    """The worker's view of this stage. ``KDRAY_INJECT_FAULT`` (JSON, with a ``stage`` name) adds a
    one-time fault for resilience tests of whole flows; see ``kdray.train.inject_fault``."""
    import os

    from kdray.train import Job

    fault = json.loads(os.environ.get("KDRAY_INJECT_FAULT") or "null")
    if fault and fault.get("stage") == ctx.stage.name:
        extras.setdefault("fault", fault)
    return Job(pipeline=ctx.pipeline.name, stage=ctx.stage.model_dump(mode="json"),
               run=ctx.run.model_dump(mode="json"), key=ctx.key,
               parents={ref: art.uri for ref, art in ctx.parents.items()},
               extras={"model_kwargs": model_kwargs(ctx.stage.model, ctx.stage.data), **extras})


# --------------------------------------------------------------------------- train


@STAGES.register("train")
def run_train(ctx: StageContext) -> Artifact:
    from kdray.train import fit

    job = make_job(ctx)
    result = fit(job, ctx.root)
    return publish_trained(ctx, job, result)


def _train_method(job: Any, spec: Any, train: kdata.Split, x_train: torch.Tensor, mine: torch.Tensor):
    model = create_model(spec.model.name, **job.extras["model_kwargs"])
    return METHODS.build("train", model, label_smoothing=spec.label_smoothing)


WORKER_METHODS["train"] = _train_method


def build_method(job: Any, spec: Any, train: kdata.Split, x_train: torch.Tensor, mine: torch.Tensor):
    """Worker side: the ``nn.Module`` the loop optimises for this stage kind."""
    return WORKER_METHODS[spec.kind](job, spec, train, x_train, mine)


WORKER_DATA: dict[str, Callable[[Any, Any], tuple[kdata.Split, kdata.Split] | None]] = {}


def stage_data(job: Any, spec: Any) -> tuple[kdata.Split, kdata.Split]:
    """Worker side: (training split, test split for monitoring); most kinds read ``spec.data``."""
    if spec.kind in WORKER_DATA:
        splits = WORKER_DATA[spec.kind](job, spec)
        if splits is not None:
            return splits
    return kdata.load(spec.data, "train"), kdata.load(spec.data, "test")


# --------------------------------------------------------------------------- evaluate


@STAGES.register("evaluate")
def run_evaluate(ctx: StageContext) -> Artifact:
    from kdray.evaluate import evaluate_stage

    t0 = time.perf_counter()
    report, files = evaluate_stage(ctx)
    manifest = ctx.base_manifest() | {"metrics": {"models": {r["stage"]: {k: r[k] for k in ("top1", "top5", "loss")}
                                                             for r in report["models"]}},
                                      "timings": {"seconds": round(time.perf_counter() - t0, 3)}}
    return write_artifact(ctx.store, manifest, None, files)


# Stage kinds defined in their own modules register themselves on import.
from kdray import adapt_stage, distill, transfer_stage  # noqa: E402,F401
