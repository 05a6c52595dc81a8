"""The building blocks of every spec: pydantic models with ``extra="forbid"``.

Each stage kind's own spec (``TrainStage``, ``DistillStage``, ...) lives with the kind's plug-in
and is built from these blocks; the pipeline spec that joins them is in ``kdray.engine.spec``.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Callable, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from kdray.core.data import DATASETS
from kdray.core.models import MODELS
from kdray.core.registry import Entry, Registry, did_you_mean
from kdray.core.shifts import ShiftSpec

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


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


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


class ModelSpec(Entry):
    """``{name: <registered model>, ...builder parameters}``; ``num_classes`` defaults to the data's."""

    entry_kind: ClassVar[str] = "model"
    entry_registry: ClassVar[Registry] = MODELS
    entry_skip: ClassVar[tuple[str, ...]] = ("num_classes", "in_channels", "image_size")

    num_classes: int | None = Field(None, ge=2)


class DataSpec(Spec):
    """A dataset plus the deterministic selection applied to it.

    ``shifts`` (rotation, noise, inversion, contrast, class subset) turn it into another domain,
    deterministically. ``labels_per_class``/``label_fraction`` keep labels for only part of the training set (the
    rest get label -1: usable by distillation and adaptation, ignored by cross-entropy), or, with
    ``drop_unlabelled``, leave only the labelled examples in the training set.
    """

    name: Annotated[str, AfterValidator(registered(DATASETS))] = "fashion_mnist"
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
