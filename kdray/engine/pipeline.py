"""Run a pipeline: stages in order, each keyed by its spec and its parents, finished ones skipped.

A stage's key is the hash of its spec and its parents' keys (or, for an artifact URI parent, its
weights hash), so changing one stage reruns it and its descendants only. A stage whose key
already has a manifest is "cached" and not run again, unless ``force``.

Where a stage runs is its ``run.launcher`` (``kdray.engine.launchers``): ``local`` in this process, ``ray`` as a
job on an existing Ray cluster, ``kuberay`` as a RayJob on Kubernetes. ``evaluate`` stages always run
locally: they only read finished artifacts and need no cluster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from kdray.core.checkpoint import Artifact, open_artifact, read_artifact
from kdray.core.errors import KdrayError
from kdray.core.specs import is_artifact_uri, spec_hash
from kdray.core.storage import Storage
from kdray.engine.launchers import LAUNCHERS, artifact_store, kuberay, launcher_for, local, ray  # noqa: F401 (registers them)
from kdray.engine.spec import PipelineSpec

KEY_LENGTH = 12


@dataclass
class StageOutcome:
    stage: str
    kind: str
    key: str
    uri: str
    status: str  # "ran" | "cached"
    seconds: float
    metrics: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def stage_key(stage: Any, parent_keys: dict[str, str]) -> str:
    """The content key of a stage: its spec (without the run placement) and its parents' keys."""
    spec = stage.model_dump(mode="json", exclude={"run"})
    return spec_hash({"spec": spec, "parents": parent_keys})[:KEY_LENGTH]


def plan(spec: PipelineSpec) -> dict[str, str]:
    """Stage name -> key, for the whole pipeline (no I/O except reading URI parents' manifests)."""
    keys: dict[str, str] = {}
    for stage in spec.stages:
        parents = {}
        for _, ref in stage.references():
            parents[ref] = open_artifact(ref).manifest["key"] if is_artifact_uri(ref) else keys[ref]
        seed = spec.run_for(stage).seed  # the seed changes results, so it is part of the key
        keys[stage.name] = stage_key(stage, {**parents, "_seed": str(seed)})
    return keys


def run_pipeline(
    spec: PipelineSpec,
    *,
    force: bool | list[str] = False,
    only: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> list[StageOutcome]:
    """Run every stage (or ``only`` these) in order; ``force`` reruns all (True) or the named stages."""
    root = Storage(spec.storage.uri)
    root.check_writable()
    keys = plan(spec)
    outcomes = []
    for stage in spec.stages:
        if only is not None and stage.name not in only:
            continue
        forced = force is True or (isinstance(force, list) and stage.name in force)
        outcomes.append(run_stage(spec, stage.name, force=forced, keys=keys, log=log))
    return outcomes


def run_stage(
    spec: PipelineSpec,
    name: str,
    *,
    force: bool = False,
    keys: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> StageOutcome:
    """Run one stage whose parents are finished (or return its cached artifact).

    This is the unit a Prefect task runs: it needs nothing from the caller but the spec, so a
    retry (or another process) can run it again and Ray resumes from the stage's last checkpoint.
    The stage runs where ``launcher_for(spec, stage)`` says (``kdray.engine.launchers``); a remote launcher
    returns once the cluster has published the artifact, which is then read back from storage.
    """
    root = Storage(spec.storage.uri)
    keys = keys or plan(spec)
    stage = spec.stage(name)
    key = keys[name]
    store = artifact_store(root, spec.name, name, key)
    t0 = time.perf_counter()
    art = None if force else read_artifact(store)
    status = "cached"
    if art is None:
        parents = parent_artifacts(spec, stage, keys, root)  # a missing parent fails here, before any launch
        launcher = launcher_for(spec, stage)
        via = "" if launcher == "local" else f" via the {launcher} launcher"
        log(f"[{spec.name}] stage {name} ({stage.kind}) -> {store.uri()}{via}")
        art = LAUNCHERS.get(launcher)().run(spec, name, key, log, parents=parents, force=force)
        if art is None:  # a remote launcher: the artifact was published by the cluster, read it back
            art = read_artifact(store)
            if art is None:
                raise KdrayError(
                    f"the {launcher} launcher finished stage {name!r}, but {store.uri()} has no "
                    "manifest.json: the remote run did not publish its artifact",
                    hint="Check that the cluster writes to the same storage as this machine "
                    "(storage.uri, KDRAY_S3_ENDPOINT) and read the job's log above.",
                )
        status = "ran"
    else:
        log(f"[{spec.name}] stage {name}: cached at {store.uri()}")
    return StageOutcome(
        name, stage.kind, key, art.uri, status, round(time.perf_counter() - t0, 3), art.manifest.get("metrics", {})
    )


def parent_artifacts(
    spec: PipelineSpec, stage: Any, keys: dict[str, str], root: Storage | None = None
) -> dict[str, Artifact]:
    """Reference -> finished artifact, for every stage or URI that ``stage`` reads."""
    root = root or Storage(spec.storage.uri)
    return {ref: _existing(root, spec, ref, keys) for _, ref in stage.references()}


def _existing(root: Storage, spec: PipelineSpec, ref: str, keys: dict[str, str]) -> Artifact:
    """A parent that was not run in this call: an artifact URI, or an earlier stage's finished output."""
    if is_artifact_uri(ref):
        return open_artifact(ref)
    art = read_artifact(artifact_store(root, spec.name, ref, keys[ref]))
    if art is None:
        raise KdrayError(
            f"stage {ref!r} has no finished artifact for key {keys[ref]}",
            hint=f"Run it first (kdray run SPEC without --only, or --only {ref}).",
        )
    return art
