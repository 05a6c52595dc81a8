"""Stage kinds as plug-ins: one class per kind holds its spec, its driver side and its worker side.

    @stage_kind
    class DistillKind(StageKind):
        spec = DistillStage                         # a StageBase with kind: Literal["distill"]

        def run(self, ctx: StageContext) -> Artifact:        # driver: decide, ctx.fit(job), publish
            ...
        def method(self, job: Job, shard: Shard) -> Method:  # worker: what the loop optimises
            ...
        def data(self, job: Job) -> tuple[Split, Split]:     # worker: (training, validation) splits
            ...

``STAGE_KINDS`` is the only table of kinds: the pipeline spec's ``Stage`` union, the CLI's kind
list, the flows' kind table and the docs are all read from it. The engine hands a driver-side
``run`` everything it needs in a :class:`StageContext`, including ``ctx.fit`` (the engine's way to
run the training loop), so a technique never imports the engine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar

import torch

from kdray.contracts.checkpoint import Artifact, write_artifact
from kdray.contracts.hffolder import network_view, open_folder, preprocessor_view
from kdray.contracts.method import Method
from kdray.contracts.specs import DataSpec, ModelSpec, RunSpec, StageBase
from kdray.contracts.usermodels import build_model, weights_record
from kdray.core.meter import Meter, log_meter
from kdray.core.registry import Registry
from kdray.core.storage import Storage
from kdray.data import datasets as kdata
from kdray.models import count_parameters
from kdray.models.hf import model_config, transformers_task

Log = Callable[[str], None]


# --------------------------------------------------------------------------- what crosses to the workers


@dataclass
class Job:
    """Everything a worker needs to train one stage. Typed here; JSON only across processes."""

    pipeline: str
    spec: Any  # the stage's spec: an instance of its kind's ``StageKind.spec`` (a StageBase)
    run: RunSpec
    key: str
    parents: dict[str, str] = field(default_factory=dict)  # reference -> artifact URI
    extras: dict[str, Any] = field(default_factory=dict)  # stage-specific inputs (e.g. a teacher cache URI)

    @property
    def run_name(self) -> str:
        return run_name(self.pipeline, self.spec.name, self.key)

    def to_config(self) -> dict[str, Any]:
        """The job as JSON-able values, for a Ray worker in another process."""
        return {
            "job": {
                "pipeline": self.pipeline,
                "spec": self.spec.model_dump(mode="json"),
                "run": self.run.model_dump(mode="json"),
                "key": self.key,
                "parents": dict(self.parents),
                "extras": json.loads(json.dumps(self.extras)),
            }
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Job":
        doc = config["job"]
        spec = STAGE_KINDS.get(doc["spec"]["kind"]).spec.model_validate(doc["spec"])
        return cls(doc["pipeline"], spec, RunSpec.model_validate(doc["run"]), doc["key"], doc["parents"], doc["extras"])

    def replace(self, **changes: Any) -> "Job":
        return dataclasses.replace(self, **changes)


def run_name(pipeline: str, stage: str, key: str) -> str:
    """Ray's run name for a stage: deterministic, so a rerun of the same stage resumes its run."""
    return f"{pipeline}-{stage}-{key}"


@dataclass
class Shard:
    """What one worker trains on: the training split and the rows of it that are this rank's."""

    train: kdata.Split  # the whole (selected) training split, pixels in [0, 1]
    x: torch.Tensor  # its inputs, normalised
    rows: torch.Tensor  # this rank's row indices
    rank: int = 0
    world: int = 1


@dataclass
class FitResult:
    """What ``ctx.fit(job)`` returns: the weights to publish and the per-epoch history."""

    model_state: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    run_path: str | None
    seconds: float

    @property
    def metrics(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


# --------------------------------------------------------------------------- the driver side


@dataclass
class StageContext:
    """What a stage's driver side gets from the engine."""

    pipeline: Any  # the PipelineSpec
    stage: Any  # the stage's spec
    key: str  # hash of the stage spec and its parents' keys
    store: Storage  # the artifact folder <root>/<pipeline>/<stage>/<key>
    root: Storage  # the storage root (Ray's run folders live under it)
    parents: dict[str, Artifact] = field(default_factory=dict)  # reference -> finished artifact
    log: Log = print
    fit: Callable[[Job, Storage], FitResult] | None = None  # the engine's training loop runner
    meter: Meter | None = None  # how driver-side work shows its progress (None: plain lines through log)
    infer: Callable[[Job, Callable[[], Any], Callable[[Any, Any], None]], int] | None = None  # the engine's
    # batch inference over a streamed dataset (kdray.engine.inference.stream_inference)
    data: dict[str, Any] | None = None  # the fingerprints of the data the stage reads (kdray.data.lineage)

    def tasks(self) -> Meter:
        """The meter for driver-side work (a teacher cache...): the engine's, or plain lines through ``log``."""
        return self.meter or log_meter(self.log)

    @property
    def run(self) -> RunSpec:
        return self.pipeline.run_for(self.stage)

    def train(self, job: Job) -> FitResult:
        """Run the training loop for ``job`` (in this process or on Ray, per ``job.run``)."""
        if self.fit is None:
            raise RuntimeError("this StageContext was made without a fit function")
        return self.fit(job, self.root)

    def stream_inference(self, job: Job, build: Callable[[], Any], sink: Callable[[Any, Any], None]) -> int:
        """Run ``build()``'s model over every training-shard row of ``job``'s streamed data (Ray Data batch
        inference); ``sink(row_ids, outputs)`` gets each output batch here, in row-id order. Returns the rows."""
        if self.infer is None:
            raise RuntimeError("this StageContext was made without an inference function")
        return self.infer(job, build, sink)

    def job(self, **extras: Any) -> Job:
        """The worker's view of this stage."""
        return Job(
            pipeline=self.pipeline.name,
            spec=self.stage,
            run=self.run,
            key=self.key,
            parents={ref: art.pinned_uri for ref, art in self.parents.items()},  # the exact version read here
            extras={"model_kwargs": model_kwargs(self.stage.model, self.stage.data), **extras},
        )

    def base_manifest(self) -> dict[str, Any]:
        return {
            "kind": self.stage.kind,
            "pipeline": self.pipeline.name,
            "stage": self.stage.name,
            "key": self.key,
            "spec": self.stage.model_dump(mode="json"),
            "run": self.run.model_dump(mode="json"),
            "parents": [
                {
                    "ref": ref,
                    "uri": art.uri,
                    "version_uri": art.pinned_uri,
                    "key": art.manifest.get("key"),
                    "weights_sha256": art.weights_sha256,
                }
                for ref, art in self.parents.items()
            ],
            **({"data": self.data} if self.data is not None else {}),
        }

    def publish(
        self, job: Job, result: FitResult, files: dict[str, bytes] | None = None, extra: dict[str, Any] | None = None
    ) -> Artifact:
        """Write a trained model's artifact: weights, history and ``files``, then the manifest."""
        kwargs = job.extras["model_kwargs"]
        model = build_model(self.stage.model, kwargs, weights=False)
        manifest = self.base_manifest() | {
            "model": model_record(self.stage.model, kwargs, model),
            "metrics": result.metrics,
            "history": result.history,
            "ray_run": result.run_path,
            "timings": {"fit_seconds": round(result.seconds, 3)},
            **(extra or {}),
        }
        files = {"history.json": json.dumps(result.history, indent=1).encode(), **(files or {})}
        return write_artifact(self.store, manifest, result.model_state, files)


def model_kwargs(model_spec: ModelSpec, data_spec: DataSpec) -> dict[str, Any]:
    """Builder keywords for a model on a dataset: classes, channels and size come from the data.

    A network with inputs of its own (a Hugging Face folder's ``preprocessor_config.json``, or
    ``model.inputs``) also gets ``inputs``: the view of the data it reads (``kdray.models.inputs``)."""
    facts = kdata.describe(data_spec)
    kwargs = {
        "num_classes": model_spec.num_classes or facts["num_classes"],
        "in_channels": facts["in_channels"],
        "image_size": facts["image_size"],
        **model_spec.params,
        **model_spec.options,
    }
    view = input_view(model_spec, data_spec)
    if view:
        kwargs["inputs"] = view
    return kwargs


def input_view(model_spec: ModelSpec, data_spec: DataSpec) -> dict[str, Any] | None:
    """The view of ``data_spec``'s inputs that the network of ``model_spec`` reads, or None (the data's own)."""
    folder_view: dict[str, Any] = {}
    if model_spec.hf is not None:
        folder = open_folder(model_spec.hf)
        folder_view = preprocessor_view(folder.preprocessor, folder.config)
    override = model_spec.inputs.model_dump() if model_spec.inputs else None
    if not folder_view and not override:
        return None
    val = kdata.load(data_spec, "val")  # the data's normalisation (transforms' normalize included)
    facts = kdata.describe(data_spec)
    data = {
        "mean": list(val.mean) if isinstance(val.mean, tuple) else val.mean,
        "std": list(val.std) if isinstance(val.std, tuple) else val.std,
        "image_size": facts["image_size"],
        "in_channels": facts["in_channels"],
    }
    view = network_view(override, folder_view, data)
    return view


def model_record(model_spec: ModelSpec, kwargs: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    record = {
        "name": model_spec.label,
        "kwargs": kwargs,
        "family": getattr(model, "family", "unknown"),
        "parameters": count_parameters(model),
        "feature_layers": list(getattr(model, "feature_layers", ())),
        "classifier": getattr(model, "classifier_name", "classifier"),
    }
    if model_spec.import_:
        record["import"] = model_spec.import_  # so that Artifact.build_model rebuilds the user's class
    if model_spec.hf is not None or model_spec.hf_config is not None:
        hf: dict[str, Any] = {  # so that Artifact.build_model rebuilds the transformers network from its config
            "config": model_config(model),
            "task": transformers_task(model),
            "trust_remote_code": model_spec.trust_remote_code,
        }
        if model_spec.trust_remote_code and model_spec.hf is not None:
            hf["code"] = open_folder(model_spec.hf).code()  # the folder's own code, as it was run
        record["hf"] = hf
    if model_spec.weights or model_spec.hf is not None:
        record["pretrained"] = weights_record(model_spec)  # lineage: the initial weights' URI and sha256
    return record


# --------------------------------------------------------------------------- the plug-in


class StageKind:
    """One stage kind: its spec, what the driver does (``run``), what the workers do (``method``, ``data``)."""

    spec: ClassVar[type[StageBase]]
    trains: ClassVar[bool] = True  # False: the stage only reads artifacts and always runs locally (evaluate)
    # False: the method's losses cannot use a row whose label is withheld (cross-entropy), so the
    # loop trains on the labelled rows only instead of iterating rows that contribute nothing.
    uses_unlabelled: ClassVar[bool] = True
    # True: ``data.stream`` may feed this kind's loop from Ray Data (its ``data`` is the default one and
    # its ``method`` needs no more of the ``Shard`` than a few example rows: see kdray.engine.datasets).
    streams: ClassVar[bool] = False

    @classmethod
    def kind(cls) -> str:
        return cls.spec.model_fields["kind"].default

    def run(self, ctx: StageContext) -> Artifact:
        """Driver side: produce and publish the stage's artifact (``ctx.train(job)``, ``ctx.publish``)."""
        raise NotImplementedError

    def prepare_trials(self, trials: list[StageContext]) -> None:
        """Before a sweep's trials of this kind start (one context per trial, parents published): build once
        what they share, so that concurrent trials never race to build it (distill: the teacher-output
        cache). Nothing by default."""
        return None

    def datasets(self, stage: Any, parents: dict[str, Artifact]) -> dict[str, DataSpec]:
        """The data specs the stage reads, by field (their fingerprints go into its manifest, and are checked
        before a cached artifact is believed: ``kdray.data.lineage``); every ``DataSpec`` field by default."""
        return {name: value for name, value in stage if isinstance(value, DataSpec)}

    def stream_columns(self, job: Job) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        """With ``data.stream``: a function that Ray Data runs on each decoded training batch (numpy columns
        ``x``, ``y``, ``index``) to add columns the method reads (a distill stage's cached teacher logits);
        None adds nothing. It runs in Ray Data tasks, so it must pickle."""
        return None

    def method(self, job: Job, shard: Shard) -> Method:
        """Worker side: the ``Method`` the loop optimises (its ``model`` is what gets published)."""
        raise NotImplementedError(f"stage kind {self.kind()!r} does not train")

    def data(self, job: Job) -> tuple[kdata.Split, kdata.Split]:
        """Worker side: (training split, validation split watched each epoch); ``spec.data`` by default.

        The second split is what the loop reports as ``val_*`` and what selection may read: it must
        never be a test split (the test split is read once, by the evaluation).
        """
        train = kdata.load(job.spec.data, "train", augment=True)  # random data.transforms: per training batch
        return (train if self.uses_unlabelled else labelled_only(train, job)), kdata.load(job.spec.data, "val")


def labelled_only(train: kdata.Split, job: Job) -> kdata.Split:
    """The rows of ``train`` whose label is kept (for a kind whose losses ignore the others), said in the log."""
    keep = train.y >= 0
    if bool(keep.all()):
        return train
    print(
        f"[{job.pipeline}/{job.spec.name}] training on the {int(keep.sum()):,} labelled rows of {len(train):,}: "
        f"a {job.spec.kind} stage's losses cannot use rows whose label is withheld",
        flush=True,
    )
    tag = hashlib.sha256(f"{train.fingerprint}|labelled".encode()).hexdigest()[:16]
    return replace(train, x=train.x[keep], y=train.y[keep], fingerprint=tag)


STAGE_KINDS: Registry[type[StageKind]] = Registry("stage kind", group="kdray.stage_kinds")


def stage_kind(cls: type[StageKind]) -> type[StageKind]:
    """Class decorator: register a stage kind under its spec's ``kind``."""
    return STAGE_KINDS.register(cls.kind())(cls)


def kind_of(stage: StageBase) -> StageKind:
    return STAGE_KINDS.get(stage.kind)()
