"""The ``local`` launcher: the stage runs in this process (embedded Ray, or ``ray.init(address=run.address)``)."""

from __future__ import annotations

from kdray.contracts.checkpoint import Artifact
from kdray.contracts.stage import StageContext, run_name
from kdray.core import layout
from kdray.data import lineage
from kdray.engine import diagnostics, progress
from kdray.engine.driver import fit
from kdray.engine.inference import stream_inference
from kdray.engine.launchers import LAUNCHERS, Log
from kdray.engine.resolved import ResolvedStage


@LAUNCHERS.register("local")
class LocalLauncher:
    """Run the stage in this process: embedded Ray (or ``ray.init(address=run.address)``), ``fit()`` here."""

    def run(
        self,
        stage: ResolvedStage,
        log: Log = print,
        *,
        parents: dict[str, Artifact],
        force: bool = False,
    ) -> Artifact:
        if force:  # start over: Ray would otherwise resume the finished run from its last checkpoint
            stage.root.delete_dir(layout.ray_run(run_name(stage.pipeline, stage.name, stage.key)))
        store = diagnostics.publish_store(stage.name, stage.store)
        data = lineage.of_datasets(stage.kind.datasets(stage.stage, parents))  # what it reads, as it starts
        ctx = StageContext(
            stage.spec,
            stage.stage,
            stage.key,
            store,
            stage.root,
            parents,
            log,
            fit,
            meter=progress.meter(log),
            infer=stream_inference,
            data=data,
        )
        return stage.kind.run(ctx)
