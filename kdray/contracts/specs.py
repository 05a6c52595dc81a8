"""The building blocks of every spec: pydantic models with ``extra="forbid"``.

Each stage kind's own spec (``TrainStage``, ``DistillStage``, ...) lives with the kind's plug-in
and is built from these blocks; the pipeline spec that joins them is in ``kdray.engine.spec``.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Callable, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from kdray.core.errors import KdrayError
from kdray.core.registry import Entry, Registry, check_params, did_you_mean
from kdray.core.spec import Spec
from kdray.data import files  # noqa: F401  (registers the file-backed datasets: parquet, image_folder)
from kdray.data.datasets import DATASETS
from kdray.data.shifts import ShiftSpec
from kdray.data.transforms import TransformSpec, check_order
from kdray.models import MODELS, import_target

DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def registered(registry: Registry) -> Callable[[str], str]:
    """A validator that accepts only names registered in ``registry``."""

    def check(name: str) -> str:
        if name not in registry:
            raise ValueError(f"unknown {registry.kind} {name!r}; {did_you_mean(name, registry.names())}")
        return name

    return check


def is_artifact_uri(ref: str) -> bool:
    return "://" in ref


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def spec_hash(obj: Any) -> str:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


# --------------------------------------------------------------------------- building blocks


class StorageSpec(Spec):
    """Where artifacts go: ``file://./runs`` (default), a plain folder, or ``s3://bucket/prefix``.

    S3 endpoint and credentials come from the environment (``KDRAY_S3_ENDPOINT``,
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), never from the spec.
    """

    uri: str = "file://./runs"

    @field_validator("uri")
    @classmethod
    def _scheme(cls, v: str) -> str:
        scheme = v.split("://", 1)[0] if "://" in v else "file"
        if scheme not in ("file", "s3"):
            raise ValueError(
                f"storage scheme {scheme!r} is not supported; use file://<folder> or s3://<bucket>/<prefix>"
            )
        if re.search(r"(secret|access)_?key|password", v, re.I):
            raise ValueError(
                "credentials do not belong in the spec; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment"
            )
        return v


# Launchers (how a stage is started: here, as a Ray job, as a KubeRay RayJob) live in the engine; the
# spec names them, so the table is declared here, with the built-ins by the module that registers them.
LAUNCHERS: Registry = Registry(
    "launcher",
    group="kdray.launchers",
    builtins={
        "local": "kdray.engine.launchers.local",
        "ray": "kdray.engine.launchers.ray",
        "kuberay": "kdray.engine.launchers.kuberay",
    },
)


class RunSpec(Spec):
    """Where and how a stage runs. ``workers: 0`` runs the loop in this process (no Ray actors)."""

    launcher: str = Field("local", json_schema_extra={"examples": ["local", "ray", "kuberay"]})
    workers: int = Field(1, ge=0, le=4096)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(1, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    amp: bool = True
    channels_last: bool = True  # conv networks train in channels_last memory layout (faster; same results)
    address: str | None = None

    @field_validator("launcher")
    @classmethod
    def _known_launcher(cls, v: str) -> str:
        if v not in LAUNCHERS:  # a plug-in launcher (entry point group kdray.launchers) is known too
            raise ValueError(f"unknown launcher {v!r}; {did_you_mean(v, LAUNCHERS.names())}")
        return v


class InputsSpec(Spec):
    """The inputs a network was pretrained for, when they differ from the stage's data (``model.inputs``).

    The stage's images are resized to ``size``, given ``channels`` (grey images repeated for an RGB
    network) and normalised with ``mean``/``std`` (pixels in [0, 1]) before this network's forward; the
    other networks of the stage keep the stage's inputs. A Hugging Face folder's
    ``preprocessor_config.json`` sets them; these fields override it (docs/models.md).
    """

    size: int | Annotated[list[int], Field(min_length=2, max_length=2)] | None = None
    channels: int | None = Field(None, ge=1)
    mean: list[float] | None = Field(None, min_length=1)
    std: list[Annotated[float, Field(gt=0)]] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _together(self) -> "InputsSpec":
        if (self.mean is None) != (self.std is None):
            raise ValueError("give mean and std together (one value, or one per channel)")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


HF_TASKS = Literal["image_classification", "sequence_classification", "causal_lm"]


class ModelSpec(Entry):
    """``{name: <registered model>, ...builder parameters}``, ``{import: "pkg.mod:factory", options: {...}}``,
    ``{hf: <Hugging Face folder URI>}`` or ``{hf_config: {model_type: vit, ...}}``.

    ``num_classes`` defaults to the data's (``num_classes``, ``in_channels`` and ``image_size`` are
    passed to an imported factory only when its signature takes them). ``classifier`` is the module
    path of the classification layer (default: the model's own, or its last ``nn.Linear``).
    ``weights`` initialises the model from a safetensors file (``file://``, ``s3://`` or a plain
    path) or a kdray artifact URI; ``weights_prefix`` renames key prefixes of the file first
    (``{"backbone.": "features."}``). ``hf`` builds a ``transformers`` network from a folder written by
    ``save_pretrained`` (``config.json`` and safetensors weights; ``task`` when the config does not say
    whether it classifies images or token ids; ``trust_remote_code`` only if the folder's own code may
    run); ``hf_config`` builds one with fresh weights from an inline config. ``inputs`` gives the
    network its own input size and normalisation. See docs/models.md.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    entry_kind: ClassVar[str] = "model"
    entry_registry: ClassVar[Registry] = MODELS
    entry_skip: ClassVar[tuple[str, ...]] = ("num_classes", "in_channels", "image_size")

    name: str | None = None  # type: ignore[assignment]  # one of name/import
    import_: str | None = Field(None, alias="import")
    options: dict[str, Any] = Field(default_factory=dict)
    classifier: str | None = None
    weights: str | None = None
    weights_prefix: dict[str, str] = Field(default_factory=dict)
    num_classes: int | None = Field(None, ge=2)
    hf: str | None = None
    hf_config: dict[str, Any] | None = None
    task: HF_TASKS | None = None
    trust_remote_code: bool = False
    inputs: InputsSpec | None = None

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str | None) -> str | None:  # type: ignore[override]  # name is optional here
        if v is not None and v not in MODELS:
            raise ValueError(
                f"unknown model {v!r}; {did_you_mean(v, MODELS.names())} Your own network: write "
                "model: {import: 'file.py:Class'} or {import: 'package.module:factory'} (docs/models.md)"
            )
        return v

    @model_validator(mode="after")
    def _check_params(self) -> "ModelSpec":
        given = [self.name, self.import_, self.hf, self.hf_config]
        if sum(v is not None for v in given) != 1:
            raise ValueError(
                "give exactly one of model.name (a registered model, see `kdray ls models`), "
                "model.import (a 'package.module:factory' path), model.hf (a Hugging Face folder) and "
                "model.hf_config (a transformers config)"
            )
        transformers_model = self.hf is not None or self.hf_config is not None
        if not transformers_model and (self.task or self.trust_remote_code):
            raise ValueError("model.task and model.trust_remote_code are for model.hf and model.hf_config")
        if transformers_model:
            if self.options or self.__pydantic_extra__:
                raise ValueError(
                    "model.hf and model.hf_config take no builder options: the architecture is the config's "
                    f"(got {sorted(self.options or self.__pydantic_extra__ or {})})"
                )
            if self.hf is not None and self.weights:
                raise ValueError("model.hf brings its own weights (the folder's); drop model.weights")
            if self.hf_config is not None and not isinstance(self.hf_config.get("model_type"), str):
                raise ValueError("model.hf_config needs model_type (vit, resnet, bert, ...), as in a config.json")
            return self
        if self.name is not None:
            if self.options:
                raise ValueError("model.options is for model.import; a registered model takes its options beside name")
        elif self.__pydantic_extra__:
            raise ValueError(
                f"model.import takes its arguments under model.options, not beside it: "
                f"move {sorted(self.__pydantic_extra__)} under options"
            )
        try:
            if self.name is not None:
                self.__pydantic_extra__ = check_params(
                    "model", self.name, MODELS.get(self.name), self.params, self.entry_skip
                )
            else:
                target = import_target(self.import_ or "", "model.import")
                self.options = check_params("model", self.label, target, self.options, self.entry_skip)
        except KdrayError as e:
            raise ValueError(str(e)) from None
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # The fields of model.import/weights appear only when set, so a registry model's spec (and its
        # stage key) is what it was before they existed; the import path is written as ``import``.
        out = handler(self)
        if out.get("name") is None:
            out.pop("name", None)
        for key in (
            "import_",
            "options",
            "classifier",
            "weights",
            "weights_prefix",
            "hf",
            "hf_config",
            "task",
            "trust_remote_code",
            "inputs",
        ):
            value = out.pop(key, None)
            if value:
                out["import" if key == "import_" else key] = value
        return out

    @property
    def label(self) -> str:
        """How logs and errors name the model: its registry name, its import path or its Hugging Face source."""
        if self.hf is not None:
            return f"hf:{self.hf}"
        if self.hf_config is not None:
            return f"hf_config:{self.hf_config.get('model_type')}"
        return self.name or self.import_ or "?"


class DataSpec(Spec):
    """A dataset plus the deterministic selection applied to it.

    ``shifts`` (rotation, noise, inversion, contrast, class subset) turn it into another domain,
    deterministically. ``labels_per_class``/``label_fraction`` keep labels for only part of the training set (the
    rest get label -1: usable by distillation and adaptation, ignored by cross-entropy), or, with
    ``drop_unlabelled``, leave only the labelled examples in the training set.

    ``val_fraction`` (or ``val_size`` rows) of the training pool, seeded and stratified by class, is the
    validation split: carved out before ``limit`` and label withholding, watched every epoch and used for
    every choice (epoch, trial, source); the test split is read only by the final evaluation.

    ``stream`` (``parquet`` only, ``run.workers >= 1``) streams the shards to the Ray Train workers with
    Ray Data instead of loading them into memory: same rows, same labels (docs/data.md).

    ``transforms`` (``resize``, ``center_crop``, ``random_crop``, ``hflip``, ``normalize``; in order, on CPU
    in the data pipeline: at load, in the batch source, or in Ray Data's decode step when streamed) set the
    image size models are built for; the random ones augment the training batches only, seeded by (run
    seed, epoch, row id), and validation and test data get the deterministic view (``kdray.data.transforms``,
    docs/data.md).
    """

    name: Annotated[str, AfterValidator(registered(DATASETS))] = "fashion_mnist"
    path: str | None = None
    limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    val_size: int | None = Field(None, ge=0)
    classes: list[int] | None = None
    labels_per_class: int | None = Field(None, ge=1)
    label_fraction: float = Field(1.0, gt=0, le=1)
    drop_unlabelled: bool = False
    seed: int = 0
    shifts: list[ShiftSpec] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)
    stream: bool = False  # parquet only: Ray Data streams the shards to the Ray Train workers (docs/data.md)
    transforms: Annotated[list[TransformSpec], AfterValidator(check_order)] = Field(default_factory=list)

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) < 2 or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError("classes must list at least two distinct non-negative class ids, e.g. [0, 1, 2, 3, 4]")
        return v

    @model_validator(mode="after")
    def _options_and_classes(self) -> "DataSpec":
        """Unknown ``options`` (checked against the dataset builder's signature) and ``classes``
        beyond the dataset's are errors at validation, not when the data is read."""
        builder = DATASETS.get(self.name)
        if self.options:
            try:
                check_params("dataset", self.name, builder, self.options, skip=("split", "path"))
            except KdrayError as e:
                raise ValueError(f"options: {e}") from None
        total = self.options.get("num_classes", DATASETS.meta(self.name).get("num_classes"))
        if self.classes is not None and isinstance(total, int) and max(self.classes) >= total:
            raise ValueError(f"classes: {self.name} has classes 0..{total - 1}, not {max(self.classes)}")
        if self.stream and self.name != "parquet":
            raise ValueError(
                f"stream: true streams Parquet shards written by `kdray data import`, not the {self.name!r} dataset; "
                "import it (kdray data import SRC DEST) and use name: parquet, path: DEST"
            )
        if self.stream and self.shifts:
            raise ValueError("stream: true cannot apply shifts (a shift transforms the whole split in memory)")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        out = handler(self)  # ``stream`` and ``transforms`` appear only when set, so existing stage keys stay
        for key in ("stream", "transforms"):
            if not out.get(key):
                out.pop(key, None)
        return out


class OptimSpec(Spec):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    epochs: int = Field(5, ge=1, le=100_000)
    batch_size: int = Field(128, ge=1)
    schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: float | None = Field(None, gt=0)


class StageBase(Spec):
    """Fields every stage kind has. A kind's spec subclasses it with ``kind: Literal["<kind>"]``."""

    kind: str
    name: str
    run: RunSpec | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not DNS_LABEL.fullmatch(v) or len(v) > 40:
            raise ValueError(
                f"stage name {v!r} must be lower-case letters, digits and '-', start with a letter, "
                "at most 40 characters (it is used in storage keys and Kubernetes names)"
            )
        return v

    def references(self) -> list[tuple[str, str]]:
        """(field, stage name or artifact URI) pairs this stage reads from."""
        return []
