"""Pipeline specs: every piece of user input is a pydantic model with ``extra="forbid"``.

A pipeline is one YAML file (see ``examples/``)::

    name: fmnist-cnn-to-mlp
    storage: {uri: file://./runs}
    run: {launcher: local, workers: 1}
    stages:
      - {name: teacher, kind: train, model: {name: cnn_small}, data: {name: fashion_mnist}, optim: {epochs: 2}}
      - {name: eval, kind: evaluate, models: [teacher]}

``load_pipeline(path, overrides)`` reads, applies ``key.path=value`` overrides and validates; any
problem becomes one ``SpecError`` paragraph naming the file and the field path
(``stages[1].optim.lr``) and how to fix it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from kdray.errors import SpecError
from kdray.registry import Registry, did_you_mean
from kdray.adapt import AdaptMethodSpec  # a block's models live beside their logic
from kdray.shifts import ShiftSpec
from kdray.transfer import TransferSpec

SCHEMA_VERSION = 1
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# --------------------------------------------------------------------------- helpers


def _registry(kind: str) -> Registry:
    """The registry for ``kind``, imported lazily so that specs load fast and without cycles."""
    if kind == "model":
        from kdray.models import MODELS
        return MODELS
    if kind == "dataset":
        from kdray.data import DATASETS
        return DATASETS
    if kind == "loss":
        from kdray.losses import LOSSES
        return LOSSES
    if kind == "shift":
        from kdray.shifts import SHIFTS
        return SHIFTS
    if kind == "adapt method":
        from kdray.adapt import ADAPT_METHODS
        return ADAPT_METHODS
    raise KeyError(kind)


def registered(kind: str) -> Callable[[str], str]:
    """A validator that accepts only names registered in the ``kind`` registry."""

    def check(name: str) -> str:
        reg = _registry(kind)
        if name not in reg:
            raise ValueError(f"unknown {kind} {name!r}; {did_you_mean(name, reg.names())}")
        return name

    return check


def check_options(kind: str, name: str, builder: Callable[..., Any], options: dict[str, Any],
                  reserved: tuple[str, ...] = ()) -> None:
    """Fail if ``options`` holds keywords that ``builder`` does not take."""
    params = inspect.signature(builder).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = [p for p in params if p not in reserved and p not in ("self", "args", "kwargs")]
    for key in options:
        if key not in valid:
            raise ValueError(f"{kind} {name!r} has no option {key!r}; "
                             f"{did_you_mean(key, valid) if valid else 'it takes no options.'}")


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class Options(BaseModel):
    """A named registry entry plus its keyword options: ``{name: cnn_small, dropout: 0.1}``."""

    model_config = ConfigDict(extra="allow")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


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
            raise ValueError(f"storage scheme {scheme!r} is not supported; use file://<folder> or s3://<bucket>/<prefix>")
        if re.search(r"(secret|access)_?key|password", v, re.I):
            raise ValueError("credentials do not belong in the spec; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment")
        return v


class RunSpec(Spec):
    """Where and how a stage runs. ``workers: 0`` runs the loop in this process (no Ray actors)."""

    launcher: Literal["local", "ray", "kuberay"] = "local"
    workers: int = Field(1, ge=0, le=4096)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(1, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    amp: bool = True
    address: str | None = None


class ModelSpec(Options):
    """``{name: <registered model>, ...builder options}``; ``num_classes`` defaults to the data's."""

    name: Annotated[str, AfterValidator(registered("model"))]
    num_classes: int | None = Field(None, ge=2)

    @model_validator(mode="after")
    def _options(self) -> "ModelSpec":
        check_options("model", self.name, _registry("model").get(self.name), self.options,
                      reserved=("num_classes", "in_channels", "image_size"))
        return self


class DataSpec(Spec):
    """A dataset plus the deterministic selection applied to it.

    ``shifts`` (rotation, noise, inversion, contrast, class subset) turn it into another domain,
    deterministically. ``labels_per_class``/``label_fraction`` keep labels for only part of the training set (the
    rest get label -1: usable by distillation and adaptation, ignored by cross-entropy), or, with
    ``drop_unlabelled``, leave only the labelled examples in the training set.
    """

    name: Annotated[str, AfterValidator(registered("dataset"))] = "fashion_mnist"
    path: str | None = None
    limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)
    classes: list[int] | None = None
    labels_per_class: int | None = Field(None, ge=1)
    label_fraction: float = Field(1.0, gt=0, le=1)
    drop_unlabelled: bool = False
    seed: int = 0
    shifts: list[ShiftSpec] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) < 2 or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError("classes must list at least two distinct non-negative class ids, e.g. [0, 1, 2, 3, 4]")
        return v


class OptimSpec(Spec):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    epochs: int = Field(5, ge=1, le=100_000)
    batch_size: int = Field(128, ge=1)
    schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: float | None = Field(None, gt=0)


class LossTerm(Options):
    """One weighted term of a distillation objective: ``{name: hinton_kl, weight: 0.9, temperature: 4}``."""

    name: Annotated[str, AfterValidator(registered("loss"))]
    weight: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _options(self) -> "LossTerm":
        from kdray.losses import build_loss

        try:
            build_loss(self.name, **self.options)  # checks names, required options and ranges
        except SpecError as e:
            raise ValueError(str(e)) from None
        return self


# --------------------------------------------------------------------------- stages


class StageBase(Spec):
    name: str
    run: RunSpec | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not DNS_LABEL.match(v) or len(v) > 40:
            raise ValueError(f"stage name {v!r} must be lower-case letters, digits and '-', start with a letter, "
                             "at most 40 characters (it is used in storage keys and Kubernetes names)")
        return v

    def references(self) -> list[tuple[str, str]]:
        """(field, stage name or artifact URI) pairs this stage reads from."""
        return []


class TrainStage(StageBase):
    """Plain supervised training: a source network, a teacher, or a scratch baseline."""

    kind: Literal["train"] = "train"
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    label_smoothing: float = Field(0.0, ge=0, lt=1)


class DataFreeSpec(Spec):
    """Synthesise the distillation inputs from the teacher (DeepInversion) instead of reading data."""

    samples: int = Field(4096, ge=1)
    steps: int = Field(200, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.1, gt=0)
    bn_weight: float = Field(1.0, ge=0)
    tv_weight: float = Field(1e-4, ge=0)
    l2_weight: float = Field(1e-5, ge=0)


class DistillStage(StageBase):
    """Train ``model`` (the student) from ``teacher`` (a stage name or an artifact URI)."""

    kind: Literal["distill"] = "distill"
    teacher: str
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    losses: list[LossTerm] = Field(default_factory=lambda: [LossTerm(name="cross_entropy", weight=0.1),
                                                            LossTerm(name="hinton_kl", weight=0.9)])
    teacher_cache: Literal["auto", "on", "off"] = "auto"
    data_free: DataFreeSpec | None = None

    @field_validator("losses")
    @classmethod
    def _losses(cls, v: list[LossTerm]) -> list[LossTerm]:
        if not v:
            raise ValueError("give at least one loss term, e.g. [{name: hinton_kl, weight: 1.0}]")
        if sum(t.weight for t in v) <= 0:
            raise ValueError("the loss weights sum to 0: nothing would be optimised")
        return v

    def references(self) -> list[tuple[str, str]]:
        return [("teacher", self.teacher)]


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
    selection: Literal["source_val", "entropy", "snd", "oracle"] = "source_val"
    optim: OptimSpec = Field(default_factory=OptimSpec)
    target_batch_size: int | None = Field(None, ge=1)

    @property
    def data(self) -> DataSpec:
        """The data the model is built for (classes, channels, size): the source domain's."""
        return self.source_domain

    @model_validator(mode="after")
    def _adapt(self) -> "AdaptStage":
        t = self.target_domain
        if t.labels_per_class is not None or t.label_fraction < 1.0 or t.drop_unlabelled:
            raise ValueError("target_domain: target labels are never used for training (only to evaluate, and for "
                             "selection: oracle); remove labels_per_class / label_fraction / drop_unlabelled")
        source_free = _registry("adapt method").meta(self.method.name).get("source_free", False)
        if source_free and not self.source:
            raise ValueError(f"method {self.method.name!r} is source-free: it adapts a trained source model, so "
                             "give source: <a train stage on the source domain>")
        if source_free and self.selection == "source_val":
            raise ValueError(f"selection: source_val needs source data, which source-free {self.method.name!r} "
                             "never sees; use entropy or snd (or oracle, not deployable)")
        return self

    def references(self) -> list[tuple[str, str]]:
        return [("source", self.source)] if self.source else []


class ShareStage(StageBase):
    """Parameter sharing ``W_shared = W_a ∩ W_b``: two networks of one architecture trained together
    on two tasks, the modules selected by ``shared`` tied (one tensor), each with its own head.

    Task A is ``data`` (iterated), task B is ``data_b`` (sampled alongside; its test split is what
    the stage reports). The published model is network B, the one for the target task.
    """

    kind: Literal["share"] = "share"
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    data_b: DataSpec
    shared: list[str] = Field(default_factory=lambda: ["features.*"], min_length=1)
    weight_b: float = Field(1.0, gt=0)
    optim: OptimSpec = Field(default_factory=OptimSpec)


class EvaluateStage(StageBase):
    """Evaluate trained stages on a test split and write ``report.json``, ``report.md`` and plots."""

    kind: Literal["evaluate"] = "evaluate"
    models: list[str] = Field(min_length=1)
    data: DataSpec | None = None
    batch_size: int = Field(512, ge=1)
    latency_batch: int = Field(128, ge=1)
    latency_batches: int = Field(10, ge=1)

    def references(self) -> list[tuple[str, str]]:
        return [(f"models[{i}]", m) for i, m in enumerate(self.models)]


Stage = Annotated[Union[TrainStage, DistillStage, TransferStage, ShareStage, AdaptStage, EvaluateStage],
                  Field(discriminator="kind")]
STAGE_KINDS = ("train", "distill", "transfer", "share", "adapt", "evaluate")


def is_artifact_uri(ref: str) -> bool:
    return "://" in ref


class PipelineSpec(Spec):
    name: str
    storage: StorageSpec = Field(default_factory=StorageSpec)
    run: RunSpec = Field(default_factory=RunSpec)
    stages: list[Stage] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _dns(cls, v: str) -> str:
        if not DNS_LABEL.match(v) or len(v) > 40:
            raise ValueError(f"pipeline name {v!r} must be DNS-safe: lower-case letters, digits and '-', starting "
                             "with a letter, at most 40 characters (e.g. 'fmnist-cnn-to-mlp')")
        return v

    @model_validator(mode="after")
    def _references(self) -> "PipelineSpec":
        seen: dict[str, int] = {}
        names = [s.name for s in self.stages]
        for i, stage in enumerate(self.stages):
            if stage.name in seen:
                raise ValueError(f"stages[{i}].name: stage name {stage.name!r} is used twice (also stages[{seen[stage.name]}]); "
                                 "give every stage a unique name")
            for field, ref in stage.references():
                if is_artifact_uri(ref):
                    continue
                where = f"stages[{i}].{field}"
                if ref == stage.name:
                    raise ValueError(f"{where}: stage {stage.name!r} refers to itself; a stage can only read earlier stages")
                if ref not in names:
                    raise ValueError(f"{where}: no stage named {ref!r}; {did_you_mean(ref, names[:i])} "
                                     "Or give an artifact URI (file://... or s3://...).")
                if ref not in seen:
                    raise ValueError(f"{where}: stage {ref!r} comes after {stage.name!r}; stages run in order, "
                                     "so move it earlier (references must point backwards, which also rules out cycles)")
            seen[stage.name] = i
        return self

    def stage(self, name: str) -> Any:
        for s in self.stages:
            if s.name == name:
                return s
        raise SpecError(f"no stage named {name!r}; {did_you_mean(name, [s.name for s in self.stages])}")

    def run_for(self, stage: Any) -> RunSpec:
        """The stage's run settings: the pipeline's, with the stage's own fields on top."""
        if stage.run is None:
            return self.run
        return self.run.model_copy(update=stage.run.model_dump(exclude_unset=True))


# --------------------------------------------------------------------------- loading


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def spec_hash(obj: Any) -> str:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def format_loc(loc: tuple[Any, ...]) -> str:
    """('stages', 1, 'distill', 'losses', 0, 'temperature') -> 'stages[1].losses[0].temperature'."""
    out = ""
    prev: Any = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif prev is not None and isinstance(prev, int) and part in STAGE_KINDS and out.startswith("stages"):
            pass  # pydantic's discriminator tag, not a field
        else:
            out += f".{part}" if out else str(part)
        prev = part
    return out or "(top level)"


def _explain(err: dict[str, Any]) -> str:
    loc = format_loc(tuple(err["loc"]))
    typ, msg = err["type"], err["msg"].removeprefix("Value error, ")
    if typ == "extra_forbidden":
        return f"{loc}: unknown field; remove it or check its spelling"
    if typ == "missing":
        return f"{loc}: required field is missing"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{loc}: {msg}{shown}"


def explain_validation(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        if err["type"] == "union_tag_invalid":
            got = err["input"].get("kind") if isinstance(err["input"], dict) else None
            lines.append(f"{format_loc(tuple(err['loc']))}.kind: unknown stage kind {got!r}; use one of "
                         f"{', '.join(STAGE_KINDS)}")
        elif err["type"] == "union_tag_not_found":
            lines.append(f"{format_loc(tuple(err['loc']))}: every stage needs a 'kind' ({', '.join(STAGE_KINDS)})")
        else:
            lines.append(_explain(err))
    return "; ".join(dict.fromkeys(lines))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``stages.teacher.optim.epochs=1`` -> (['stages', 'teacher', 'optim', 'epochs'], 1)."""
    if "=" not in text:
        raise SpecError(f"override {text!r} is not of the form key.path=value (e.g. run.workers=2)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return [p for p in key.strip().split(".") if p], value


def apply_override(doc: dict[str, Any], path: list[str], value: Any, text: str) -> None:
    """Set ``doc[path] = value``; list items are addressed by index or, for stages, by name."""
    node: Any = doc
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if part.isdigit() and int(part) < len(node):
                idx = int(part)
            else:
                names = [s.get("name") for s in node if isinstance(s, dict)]
                if part not in names:
                    raise SpecError(f"override {text!r}: no list item {part!r}; use an index 0..{len(node) - 1} "
                                    f"or a stage name ({', '.join(map(str, names))})")
                idx = names.index(part)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise SpecError(f"override {text!r}: {'.'.join(path[:i])} is a value, not a mapping")


def parse_pipeline(doc: Any, source: str = "<spec>", overrides: list[str] = ()) -> PipelineSpec:
    if not isinstance(doc, dict):
        raise SpecError(f"{source}: a pipeline spec is a YAML mapping with 'name' and 'stages', "
                        f"not {type(doc).__name__}; see examples/ for one")
    for text in overrides:
        apply_override(doc, *parse_override(text), text)
    try:
        return PipelineSpec.model_validate(doc)
    except ValidationError as e:
        raise SpecError(f"{source}: {explain_validation(e)}.",
                        hint="Fix the field(s) named above; `kdray schema` prints every field and its type.") from None


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> PipelineSpec:
    """Read and validate a pipeline YAML file; every problem is a SpecError naming file and field."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} does not exist",
                        hint="Give the path of a pipeline YAML file, e.g. examples/fmnist_cnn_to_mlp_hinton.yaml.")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"{path}: YAML syntax error{where}: {problem}",
                        hint="Check indentation and that every 'key: value' has a space after the colon.") from None
    return parse_pipeline(doc, str(path), overrides)


def json_schema() -> dict[str, Any]:
    return PipelineSpec.model_json_schema()
