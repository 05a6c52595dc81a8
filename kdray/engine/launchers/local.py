"""The ``local`` launcher: the stage runs in this process (embedded Ray, or ``ray.init(address=run.address)``)."""

from __future__ import annotations

from kdray.contracts.checkpoint import Artifact
from kdray.contracts.stage import StageContext, kind_of, run_name
from kdray.core import layout
from kdray.core.storage import Storage
from kdray.data import lineage
from kdray.engine import diagnostics, progress
from kdray.engine.driver import fit
from kdray.engine.inference import stream_inference
from kdray.engine.launchers import LAUNCHERS, Log, stage_store
from kdray.engine.spec import PipelineSpec


@LAUNCHERS.register("local")
class LocalLauncher:
    """Run the stage in this process: embedded Ray (or ``ray.init(address=run.address)``), ``fit()`` here."""

    def run(
        self,
        spec: PipelineSpec,
        stage_name: str,
        key: str,
        log: Log = print,
        *,
        parents: dict[str, Artifact],
        force: bool = False,
    ) -> Artifact:
        stage = spec.stage(stage_name)
        root = Storage(spec.storage.uri)
        if force:  # start over: Ray would otherwise resume the finished run from its last checkpoint
            root.delete_dir(layout.ray_run(run_name(spec.name, stage_name, key)))
        store = diagnostics.publish_store(stage_name, stage_store(spec, stage_name, key))
        data = lineage.of_datasets(kind_of(stage).datasets(stage, parents))  # what it reads, as it starts
        ctx = StageContext(
            spec,
            stage,
            key,
            store,
            root,
            parents,
            log,
            fit,
            meter=progress.meter(log),
            infer=stream_inference,
            data=data,
        )
        return kind_of(stage).run(ctx)
