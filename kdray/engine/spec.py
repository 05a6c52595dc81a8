"""The pipeline spec: one YAML file, validated into pydantic models with clear errors.

A pipeline is one YAML file (see ``examples/``)::

    name: fmnist-cnn-to-mlp
    storage: {uri: file://./runs}
    run: {launcher: local, workers: 1}
    stages:
      - {name: teacher, kind: train, model: {name: cnn_small}, data: {name: fashion_mnist}, optim: {epochs: 2}}
      - {name: eval, kind: evaluate, models: [teacher]}

The ``stages`` list accepts every registered stage kind (``STAGE_KINDS``): the union is built from
the registry, so a plug-in's kind validates like a built-in one. ``load_pipeline(path, overrides)``
reads, applies ``key.path=value`` overrides and validates; any problem becomes one ``SpecError``
paragraph naming the file and the field path (``stages[1].optim.lr``) and how to fix it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from kdray.core.errors import SpecError
from kdray.core.registry import did_you_mean
from kdray.core.specs import DNS_LABEL, RunSpec, Spec, StageBase, StorageSpec, is_artifact_uri
from kdray.core.stage import STAGE_KINDS
from kdray.core.storage import Storage
from kdray.engine import kinds  # noqa: F401  (registers the built-in stage kinds)

SCHEMA_VERSION = 1


class PipelineSpec(Spec):
    name: str
    storage: StorageSpec = Field(default_factory=StorageSpec)
    run: RunSpec = Field(default_factory=RunSpec)
    stages: list[StageBase] = Field(min_length=1)  # every registered kind: see pipeline_model()

    @field_validator("name")
    @classmethod
    def _dns(cls, v: str) -> str:
        if not DNS_LABEL.fullmatch(v) or len(v) > 40:
            raise ValueError(
                f"pipeline name {v!r} must be DNS-safe: lower-case letters, digits and '-', starting "
                "with a letter, at most 40 characters (e.g. 'fmnist-cnn-to-mlp')"
            )
        return v

    @model_validator(mode="after")
    def _references(self) -> "PipelineSpec":
        seen: dict[str, int] = {}
        names = [s.name for s in self.stages]
        for i, stage in enumerate(self.stages):
            if stage.name in seen:
                raise ValueError(
                    f"stages[{i}].name: stage name {stage.name!r} is used twice (also stages[{seen[stage.name]}]); "
                    "give every stage a unique name"
                )
            for field, ref in stage.references():
                if is_artifact_uri(ref):
                    continue
                where = f"stages[{i}].{field}"
                if ref == stage.name:
                    raise ValueError(
                        f"{where}: stage {stage.name!r} refers to itself; a stage can only read earlier stages"
                    )
                if ref not in names:
                    raise ValueError(
                        f"{where}: no stage named {ref!r}; {did_you_mean(ref, names[:i])} "
                        "Or give an artifact URI (file://... or s3://...)."
                    )
                if ref not in seen:
                    raise ValueError(
                        f"{where}: stage {ref!r} comes after {stage.name!r}; stages run in order, "
                        "so move it earlier (references must point backwards, which also rules out cycles)"
                    )
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


def pipeline_model() -> type[PipelineSpec]:
    """``PipelineSpec`` whose ``stages`` accept exactly the kinds registered now (built-in and plug-ins)."""
    return _pipeline_model(tuple((name, STAGE_KINDS.get(name).spec) for name in STAGE_KINDS.names()))


@functools.lru_cache(maxsize=8)
def _pipeline_model(registered: tuple[tuple[str, type[StageBase]], ...]) -> type[PipelineSpec]:
    specs = tuple(spec for _, spec in registered)
    stage: Any = Annotated[Union[specs], Field(discriminator="kind")] if len(specs) > 1 else specs[0]  # type: ignore[valid-type]
    return create_model(
        "PipelineSpec", __base__=PipelineSpec, __doc__=PipelineSpec.__doc__, stages=(list[stage], Field(min_length=1))
    )


# --------------------------------------------------------------------------- loading


def format_loc(loc: tuple[Any, ...]) -> str:
    """('stages', 1, 'distill', 'losses', 0, 'temperature') -> 'stages[1].losses[0].temperature'."""
    out = ""
    prev: Any = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif prev is not None and isinstance(prev, int) and part in STAGE_KINDS.names() and out.startswith("stages"):
            pass  # pydantic's discriminator tag, not a field
        else:
            out += f".{part}" if out else str(part)
        prev = part
    return out or "(top level)"


def _explain(err: Any) -> str:
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
            lines.append(
                f"{format_loc(tuple(err['loc']))}.kind: unknown stage kind {got!r}; use one of "
                f"{', '.join(STAGE_KINDS.names())}"
            )
        elif err["type"] == "union_tag_not_found":
            lines.append(
                f"{format_loc(tuple(err['loc']))}: every stage needs a 'kind' ({', '.join(STAGE_KINDS.names())})"
            )
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
                    raise SpecError(
                        f"override {text!r}: no list item {part!r}; use an index 0..{len(node) - 1} "
                        f"or a stage name ({', '.join(map(str, names))})"
                    )
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


def parse_pipeline(doc: Any, source: str = "<spec>", overrides: list[str] | tuple[str, ...] = ()) -> PipelineSpec:
    if not isinstance(doc, dict):
        raise SpecError(
            f"{source}: a pipeline spec is a YAML mapping with 'name' and 'stages', "
            f"not {type(doc).__name__}; see examples/ for one"
        )
    for text in overrides:
        apply_override(doc, *parse_override(text), text)
    try:
        return pipeline_model().model_validate(doc)
    except ValidationError as e:
        raise SpecError(
            f"{source}: {explain_validation(e)}.",
            hint="Fix the field(s) named above; `kdray schema` prints every field and its type.",
        ) from None


def load_pipeline(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineSpec:
    """Read and validate a pipeline YAML file (a path, ``file://...`` or ``s3://.../pipeline.yaml``);
    every problem is a SpecError naming the file and the field."""
    where = str(path)
    if "://" in where and not where.startswith("file://"):
        folder, _, name = where.rpartition("/")
        text = Storage(folder).read_bytes(name)
    else:
        local = Path(where.removeprefix("file://"))
        if not local.is_file():
            raise SpecError(
                f"spec file {where!r} does not exist",
                hint="Give the path of a pipeline YAML file, e.g. examples/fmnist_cnn_to_mlp_hinton.yaml.",
            )
        text = local.read_bytes()
    return parse_pipeline(parse_yaml(text, where), where, list(overrides))


def parse_yaml(text: bytes, source: str) -> Any:
    """The YAML document in ``text``; a syntax error is a SpecError with its line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(
            f"{source}: YAML syntax error{where}: {problem}",
            hint="Check indentation and that every 'key: value' has a space after the colon.",
        ) from None


def json_schema() -> dict[str, Any]:
    return pipeline_model().model_json_schema()
