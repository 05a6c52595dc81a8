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
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from kdray.contracts.specs import DNS_LABEL, RunSpec, Spec, StageBase, StorageSpec, is_artifact_uri
from kdray.contracts.stage import STAGE_KINDS, model_kwargs
from kdray.core.errors import KdrayError, SpecError, sentence
from kdray.core.registry import close_matches, did_you_mean
from kdray.core.storage import Storage
from kdray.core.yamlsafe import load_yaml
from kdray.data.datasets import describe
from kdray.engine import kinds  # noqa: F401  (registers the built-in stage kinds)
from kdray.engine.specpaths import resolve_paths, still_resolved

SCHEMA_VERSION = 1


class PipelineSpec(Spec):
    name: str
    storage: StorageSpec = Field(default_factory=StorageSpec)
    run: RunSpec = Field(default_factory=RunSpec)
    stages: list[StageBase] = Field(min_length=1)  # every registered kind: see pipeline_model()
    # Set by load_pipeline, not by users: {stage: {field: value as written}} of the relative paths taken
    # from the spec file's folder (kdray.engine.specpaths). Stage keys hash the values as written.
    written: SkipJsonSchema[dict[str, dict[str, str]]] = Field(default_factory=dict, exclude_if=lambda v: not v)

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
                    if not ref.startswith(("file://", "s3://")):
                        raise ValueError(
                            f"stages[{i}].{field}: {ref!r} is not a storage URI kdray reads; artifacts are "
                            "read from file://... or s3://... only (download it first, or name a stage)"
                        )
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

    @model_validator(mode="after")
    def _teachers_fit(self) -> "PipelineSpec":
        """A student whose classes, channels or image size differ from its teacher stage's fails here,
        at validation, not after the teacher has trained."""
        stages: dict[str, Any] = {s.name: s for s in self.stages}  # kinds with `model` and `data`
        for i, stage in enumerate(stages.values()):
            ref = getattr(stage, "teacher", None)
            if not isinstance(ref, str) or ref not in stages or not hasattr(stages[ref], "model"):
                continue
            try:
                student = model_kwargs(stage.model, stage.data)
                teacher = model_kwargs(stages[ref].model, stages[ref].data)
            except (KdrayError, OSError, TypeError, ValueError):  # data not readable here: `run` checks it
                continue
            for field in ("num_classes", "in_channels", "image_size"):
                if student.get(field) != teacher.get(field):
                    raise ValueError(
                        f"stages[{i}].teacher: the teacher {ref!r} has {field}={teacher.get(field)} but the "
                        f"student {stage.name!r} has {field}={student.get(field)}; distil on the data the "
                        "teacher is trained for (same classes and image size)"
                    )
        return self

    @model_validator(mode="after")
    def _heads_fit(self) -> "PipelineSpec":
        """A model whose classification head is narrower than the classes of the data it trains on or is
        evaluated on fails here, where the data can be described, not with an IndexError later."""
        heads: dict[str, int] = {}  # stage -> the width of the head it publishes
        trained: dict[str, Any] = {}  # stage -> the data its published model is for
        stage: Any  # kinds with `model` and `data`, or `models`
        for i, stage in enumerate(self.stages):
            try:
                if stage.kind in HEAD_KINDS:
                    width = model_kwargs(stage.model, stage.data)["num_classes"]
                    heads[stage.name] = width
                    trained[stage.name] = getattr(stage, "target_domain", None) or stage.data  # what it is for
                    classes = describe(stage.data)["num_classes"]
                    where, what = f"stages[{i}].model.num_classes", f"stage {stage.name!r} trains on"
                    narrow = [(where, stage.name, width)] if width < classes else []
                elif stage.kind == "evaluate" and (stage.data is not None or stage.models[0] in trained):
                    classes = describe(stage.data or trained[stage.models[0]])["num_classes"]
                    where, what = f"stages[{i}].data", f"evaluate stage {stage.name!r} reads"
                    narrow = [(where, m, heads[m]) for m in stage.models if m in heads and heads[m] < classes]
                else:
                    continue
            except (KdrayError, OSError, TypeError, ValueError, KeyError):  # data not readable here: `run` checks it
                continue
            for where, name, width in narrow:
                raise ValueError(
                    f"{where}: the model of stage {name!r} has a head of {width} classes, but the data {what} "
                    f"has {classes}; a label beyond the head cannot be scored. Set model.num_classes to at least "
                    f"{classes} (or leave it out to take the data's), or select {width} classes with data.classes"
                )
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


HEAD_KINDS = ("train", "distill", "transfer", "adapt")  # kinds whose model's head is trained on their data


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


def fields_at(model: Any, loc: tuple[Any, ...]) -> list[str]:
    """The field names of the pydantic model found by following ``loc`` (an error's location, whose
    discriminated-union steps name the stage kind) down from ``model``; [] when the walk gets lost."""
    types = _expand([model])
    for part in loc:
        nxt: list[Any] = []
        for t in types:
            origin, args = get_origin(t), get_args(t)
            if isinstance(part, int) and origin in (list, tuple) and args:
                nxt.append(args[0])
            elif origin is dict and isinstance(part, str) and len(args) == 2:
                nxt.append(args[1])
            elif isinstance(t, type) and issubclass(t, BaseModel):
                if part in t.model_fields:
                    nxt.append(t.model_fields[part].annotation)
                elif getattr(t.model_fields.get("kind"), "default", None) == part:
                    nxt.append(t)  # a discriminated union's step: the stage kind
        types = _expand(nxt)
    return sorted({f for t in types if isinstance(t, type) and issubclass(t, BaseModel) for f in t.model_fields})


def _expand(types: list[Any]) -> list[Any]:
    """Unions and Annotated wrappers flattened into their members."""
    out: list[Any] = []
    for t in types:
        if get_origin(t) is Annotated:
            t = get_args(t)[0]
        out += _expand(list(get_args(t))) if get_origin(t) in (Union, UnionType) else [t]
    return out


def _explain(err: Any, model: Any = None) -> str:
    loc = format_loc(tuple(err["loc"]))
    typ, msg = err["type"], err["msg"].removeprefix("Value error, ")
    if typ == "extra_forbidden":
        known = fields_at(model, tuple(err["loc"])[:-1]) if model is not None else []
        hits = close_matches(str(err["loc"][-1]), known)
        if hits:
            return f"{loc}: unknown field; did you mean {' or '.join(repr(h) for h in hits)}?"
        return f"{loc}: unknown field; remove it or check its spelling"
    if typ == "missing":
        return f"{loc}: required field is missing"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None or repr(got) in msg else f" (got {got!r})"
    msg = msg.rstrip().rstrip(".")  # the paragraph puts the periods
    if not err["loc"]:  # a check across fields: its message names them (stages[2].teacher: ...)
        return f"{msg}{shown}"
    return f"{loc}: {msg}{shown}"


def explain_validation(e: ValidationError, model: Any = None) -> str:
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
            lines.append(_explain(err, model))
    return "; ".join(dict.fromkeys(lines))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``stages.teacher.optim.epochs=1`` -> (['stages', 'teacher', 'optim', 'epochs'], 1)."""
    if "=" not in text:
        raise SpecError(f"override {text!r} is not of the form key.path=value (e.g. run.workers=2)")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(p.strip() for p in path):
        raise SpecError(
            f"override {text!r} names no field before '=' (or has an empty part in {key!r})",
            hint="Write key.path=value, e.g. stages.teacher.optim.epochs=1.",
        )
    try:
        value = load_yaml(raw, f"override {text!r}") if raw != "" else ""
    except SpecError as e:
        if "refused" in str(e):  # tags, deep nesting, aliases: refused, not read as text
            raise
        value = raw  # not YAML: the text itself
    return [p.strip() for p in path], value


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


def parse_pipeline(
    doc: Any, source: str = "<spec>", overrides: list[str] | tuple[str, ...] = (), base: Path | None = None
) -> PipelineSpec:
    """Validate a pipeline document; ``base`` is the spec file's folder, which its relative paths are
    taken from (the overrides' paths stay relative to the shell)."""
    if not isinstance(doc, dict):
        raise SpecError(
            f"{source}: a pipeline spec is a YAML mapping with 'name' and 'stages', "
            f"not {type(doc).__name__}; see examples/ for one"
        )
    resolved = resolve_paths(doc, base) if base is not None else {}
    for text in overrides:
        apply_override(doc, *parse_override(text), text)
    if resolved:
        doc["written"] = {**(doc.get("written") or {}), **still_resolved(doc, resolved)}
    model = pipeline_model()
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        text = blame_overrides(with_stage_names(explain_validation(e, model), doc), doc, overrides)
        # `kdray schema` helps with a field's name or type, not with a value a check refused
        schema = any(err["type"] not in ("value_error", "union_tag_invalid") for err in e.errors())
        raise SpecError(
            sentence(f"{source}: {text.rstrip('.')}"),
            hint="`kdray schema` prints every field and its type." if schema else None,
        ) from None


def with_stage_names(text: str, doc: dict[str, Any]) -> str:
    """``stages[6].optim.lr`` -> ``stages[6] (student).optim.lr``: which stage, without counting."""
    stages: list[Any] = doc["stages"] if isinstance(doc.get("stages"), list) else []

    def named(m: Any) -> str:
        i = int(m.group(1))
        name = stages[i].get("name") if i < len(stages) and isinstance(stages[i], dict) else None
        return f"stages[{i}] ({name})" if isinstance(name, str) else m.group(0)

    return re.sub(r"stages\[(\d+)\](?! \()", named, text)


def blame_overrides(text: str, doc: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> str:
    """A field set on the command line is named with its override, not blamed on the YAML file."""
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        parts = key.split(".")
        if len(parts) > 1 and parts[0] == "stages":
            names = [s.get("name") if isinstance(s, dict) else None for s in doc.get("stages") or []]
            i = int(parts[1]) if parts[1].isdigit() else names.index(parts[1]) if parts[1] in names else None
            if i is None:
                continue
            field = re.escape(f"stages[{i}]") + r"(?: \([^)]*\))?" + "".join(re.escape(f".{p}") for p in parts[2:])
        else:
            field = re.escape(key)
        note = f" (set by the override {override!r}):".replace("\\", "\\\\")
        text = re.sub(rf"(?<![\w.\]])({field}(?:[.\[][^:;]*)?):", rf"\1{note}", text)
    return text


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
        try:
            text = local.read_bytes()
        except OSError as e:
            raise SpecError(f"cannot read spec file {where!r} ({e.strerror or e})") from None
        return parse_pipeline(parse_yaml(text, where), where, list(overrides), base=local.parent)
    return parse_pipeline(parse_yaml(text, where), where, list(overrides))


def parse_yaml(text: bytes, source: str) -> Any:
    """The YAML document in ``text``, read strictly (UTF-8, no duplicate keys, tags or alias bombs:
    ``kdray.core.yamlsafe``); a syntax error is a SpecError with its line and column."""
    return load_yaml(text, source)


def json_schema() -> dict[str, Any]:
    return pipeline_model().model_json_schema()
