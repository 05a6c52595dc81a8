"""``kdray inspect SPEC --stage NAME``: a stage's network as a module tree, with sizes and output shapes.

One batch of the stage's (training) data runs through the model with a forward hook on every
module; each line gives the module path (the key to use in ``student_layers``/``teacher_layers``,
sharing globs and mapping rules), its class, its own and total parameter counts, and the shape of
its output. The classifier (the module whose input is the embedding) is marked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from kdray.contracts.stage import model_kwargs
from kdray.contracts.usermodels import build_model
from kdray.core.errors import SpecError
from kdray.core.meter import article
from kdray.data import datasets as kdata
from kdray.models.hooks import classifier_name


@dataclass
class ModuleRow:
    path: str
    kind: str
    depth: int
    own_params: int
    params: int
    shape: str
    classifier: bool = False
    feature_layer: bool = False


def _shape(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return "x".join(str(d) for d in output.shape)
    if isinstance(output, (tuple, list)) and output:
        return "(" + ", ".join(_shape(o) for o in output) + ")"
    if isinstance(output, Mapping):  # a Hugging Face ModelOutput: its tensors by name
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in output.items() if isinstance(v, torch.Tensor)) + "}"
    return type(output).__name__


def inspect_model(model: nn.Module, x: torch.Tensor) -> list[ModuleRow]:
    """The module tree of ``model`` with each module's output shape for ``x``."""
    shapes: dict[str, str] = {}
    handles = []
    for path, module in model.named_modules():
        handles.append(module.register_forward_hook(lambda _m, _i, out, p=path: shapes.__setitem__(p, _shape(out))))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    head = classifier_name(model)
    layers = set(getattr(model, "feature_layers", ()))
    rows = []
    for path, module in model.named_modules():
        rows.append(
            ModuleRow(
                path=path or "(model)",
                kind=type(module).__name__,
                depth=path.count(".") + 1 if path else 0,
                own_params=sum(p.numel() for p in module.parameters(recurse=False)),
                params=sum(p.numel() for p in module.parameters()),
                shape=shapes.get(path, "(not run)"),
                classifier=path == head,
                feature_layer=path in layers,
            )
        )
    return rows


def stage_model_and_batch(pipeline: Any, stage_name: str, batch: int = 8) -> tuple[nn.Module, torch.Tensor]:
    """The stage's network (as its workers build it) and ``batch`` normalised training inputs."""
    stage = pipeline.stage(stage_name)
    if not hasattr(stage, "model") or not hasattr(stage, "data"):
        raise SpecError(
            f"--stage {stage_name!r} is {article(stage.kind)} {stage.kind} stage without a model and data to inspect",
            hint="Name a train, distill, transfer, adapt or pretrained stage.",
        )
    model = build_model(stage.model, model_kwargs(stage.model, stage.data), weights=False)
    split = kdata.load(stage.data, "train")
    return model, kdata.normalize(split.x[:batch], split)


def render(rows: list[ModuleRow], max_depth: int | None = None) -> str:
    lines = [f"{'module':<44} {'type':<22} {'params':>11} {'own':>9}  output", "-" * 100]
    for r in rows:
        if max_depth is not None and r.depth > max_depth:
            continue
        mark = "  <- classifier (its input is the embedding)" if r.classifier else ""
        mark += "  [feature layer]" if r.feature_layer else ""
        name = "  " * max(r.depth - 1, 0) + r.path
        lines.append(f"{name:<44} {r.kind:<22} {r.params:>11,} {r.own_params:>9,}  {r.shape}{mark}")
    return "\n".join(lines)
