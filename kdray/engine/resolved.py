"""One stage of a pipeline, worked out once: its spec, kind, key, run settings, launcher and storage.

``resolve(spec)`` (after ``plan``) yields one ``ResolvedStage`` per stage, so that the pipeline, the
concurrency budget, the launchers' callers, the flows and the sweeps read a stage's facts from one
object instead of working each out again from ``(spec, name, keys)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from kdray.contracts.specs import RunSpec
from kdray.contracts.stage import StageKind, kind_of
from kdray.core import layout
from kdray.core.storage import Storage
from kdray.engine.spec import PipelineSpec


@dataclass(frozen=True)
class ResolvedStage:
    spec: PipelineSpec  # the whole pipeline (a stage's parents and run settings are read from it)
    stage: Any  # the stage's own spec (a StageBase of its kind)
    key: str
    root: Storage  # the pipeline's storage root

    @property
    def name(self) -> str:
        return str(self.stage.name)

    @property
    def pipeline(self) -> str:
        return self.spec.name

    @cached_property
    def kind(self) -> StageKind:
        return kind_of(self.stage)

    @cached_property
    def run(self) -> RunSpec:
        """The pipeline's ``run`` with the stage's own overrides merged in."""
        return self.spec.run_for(self.stage)

    @property
    def launcher(self) -> str:
        """Where it runs: its ``run.launcher``, except kinds that do not train (always ``local``)."""
        return self.run.launcher if self.kind.trains else "local"

    @cached_property
    def store(self) -> Storage:
        """Its artifact folder (``kdray.core.layout.artifact``)."""
        return layout.artifact(self.root, self.spec.name, self.name, self.key)

    @property
    def cpus(self) -> float:
        """The CPUs it holds while it runs from this process: none on a remote launcher; its workers' on
        a Ray Train job; one worker's otherwise (in-process training, evaluation)."""
        if self.launcher != "local":
            return 0.0
        if self.kind.trains and self.run.workers >= 1:
            return self.run.workers * self.run.cpus_per_worker
        return self.run.cpus_per_worker

    @property
    def needs_ray(self) -> bool:
        """Whether it runs a Ray Train job from this machine (local launcher, ``workers >= 1``)."""
        return self.launcher == "local" and self.kind.trains and self.run.workers >= 1


def resolve_stage(spec: PipelineSpec, name: str, keys: dict[str, str], root: Storage | None = None) -> ResolvedStage:
    return ResolvedStage(spec, spec.stage(name), keys[name], root or Storage(spec.storage.uri))


def resolve(spec: PipelineSpec, keys: dict[str, str]) -> dict[str, ResolvedStage]:
    """Every stage of ``spec`` resolved once, in pipeline order (``keys`` from ``plan(spec)``)."""
    root = Storage(spec.storage.uri)
    return {s.name: ResolvedStage(spec, s, keys[s.name], root) for s in spec.stages}
