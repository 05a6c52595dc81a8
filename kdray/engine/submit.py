"""``kdray submit`` and ``kdray render``: a pipeline's training stages on a cluster, or their RayJob YAML."""

from __future__ import annotations

from typing import Any

from kdray.contracts.stage import kind_of
from kdray.core.errors import KdrayError
from kdray.engine import progress
from kdray.engine.launchers import LAUNCHERS, Log, spec_to_json
from kdray.engine.launchers.kuberay import job_request, require_object_storage
from kdray.engine.pipeline import plan, run_pipeline
from kdray.engine.resolved import resolve_stage
from kdray.engine.spec import PipelineSpec, load_pipeline, parse_pipeline
from kdray.k8s.render import render_rayjob, to_yaml
from kdray.k8s.validate import validate_kuberay


def with_launcher(spec: PipelineSpec, launcher: str) -> PipelineSpec:
    """The same pipeline with every stage's launcher (the pipeline's and each stage's own) set to ``launcher``."""
    LAUNCHERS.get(launcher)  # an unknown name fails with did-you-mean
    doc = spec_to_json(spec)
    doc.setdefault("run", {})["launcher"] = launcher
    for stage in doc["stages"]:
        if "run" in stage:
            stage["run"]["launcher"] = launcher
    return parse_pipeline(doc, f"pipeline {spec.name!r} with launcher {launcher!r}")


def submit_command(
    spec_path: str,
    overrides: list[str] | tuple[str, ...] = (),
    launcher: str = "kuberay",
    only: list[str] | None = None,
    *,
    force: bool = False,
    log: Log = print,
) -> list[Any]:
    """``kdray submit``: run the pipeline with every stage on ``launcher``; returns the ``StageOutcome``s.

    While a job runs, each change of its state is logged with the time since submission; on a terminal a
    spinner line per job shows its state and elapsed time (one display for all: independent stages are
    followed at the same time)."""
    spec = with_launcher(load_pipeline(spec_path, list(overrides)), launcher)
    with progress.display():
        return run_pipeline(spec, force=force, only=only or None, log=log)


def render_command(spec_path: str, overrides: list[str] | tuple[str, ...] = (), stage: str | None = None) -> str:
    """``kdray render``: the RayJob YAML the kuberay launcher would create for each training stage
    (or only ``stage``), each validated against KubeRay's schemas and rules."""
    spec = load_pipeline(spec_path, list(overrides))
    names = [stage] if stage else [s.name for s in spec.stages if kind_of(s).trains]
    if not names:
        raise KdrayError(
            f"{spec_path}: pipeline {spec.name!r} has only evaluate stages, which run locally; "
            "there is no RayJob to render"
        )
    for name in names:
        spec.stage(name)  # an unknown name fails with did-you-mean
    require_object_storage(spec)
    keys = plan(spec)
    docs = []
    for name in names:
        doc = render_rayjob(job_request(resolve_stage(spec, name, keys)))
        validate_kuberay(doc)
        docs.append(doc)
    return to_yaml(*docs)
