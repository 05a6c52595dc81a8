"""Where a stage runs: ``local`` (this process), ``ray`` (a job on a Ray cluster), ``kuberay`` (a RayJob).

Every launcher has one method, ``run(stage, log, *, parents, force=False)``, which takes the stage as
resolved once by the plan (``kdray.engine.resolved.ResolvedStage``: its spec, key, ``run`` settings and
artifact ``store``) and returns once the stage's artifact exists (or raises ``KdrayError``)::

    stage = resolve_stage(spec, "teacher", plan(spec))  # kdray.engine.resolved, kdray.engine.pipeline
    LAUNCHERS.get(stage.launcher)().run(stage, print, parents={})  # a stage that reads no other stage

``local`` calls the stage function in this process (embedded Ray, or ``ray.init(address=run.address)``)
and returns the ``Artifact``. The remote launchers write ``stage.json`` (``{"spec": <pipeline spec
JSON>, "stage": <name>, "key": <key>, "force": <bool>}``) into the stage's artifact folder, start
``python -m kdray.worker <URI of stage.json>`` on the cluster, follow it to the end and return
``None``; ``kdray.engine.pipeline.run_stage`` then reads the artifact the cluster published. The worker
runs the same ``run_stage`` with the ``local`` launcher inside the cluster, so a finished artifact
makes a repeated launch a no-op, and a retried launch resumes from the stage's last Ray checkpoint
(the Ray Train run name is deterministic).

Stages that do not train (``evaluate``) always run locally (``ResolvedStage.launcher``): they only
read finished artifacts and need no cluster.

"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Protocol

from kdray.contracts.checkpoint import Artifact
from kdray.contracts.specs import LAUNCHERS as LAUNCHERS  # the table the spec names launchers from
from kdray.core import layout
from kdray.core.storage import Storage
from kdray.engine.resolved import ResolvedStage
from kdray.engine.spec import PipelineSpec

STAGE_FILE = layout.STAGE_FILE
WORKER_COMMAND = "python -m kdray.worker"
# Environment a Ray job needs to reach the same storage as the submitter. Values are sent in the
# job's runtime_env and never logged; the secret ones are also masked in any text shown to the user.
FORWARDED_ENV = (
    "KDRAY_S3_ENDPOINT",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the "(RayTrainWorker pid=...)" prefixes
Log = Callable[[str], None]


class Launcher(Protocol):
    def run(
        self,
        stage: ResolvedStage,
        log: Log,
        *,
        parents: dict[str, Artifact],
        force: bool = False,
    ) -> Artifact | None:
        """Run the stage; return its artifact (local) or ``None`` once the cluster has published it."""


def artifact_store(root: Storage, pipeline: str, stage: str, key: str) -> Storage:
    """A stage's artifact folder: ``<root>/<pipeline>/<stage>/<key>`` (``kdray.core.layout``)."""
    return layout.artifact(root, pipeline, stage, key)


def spec_to_json(spec: PipelineSpec) -> dict[str, Any]:
    """The spec as the user wrote it, validated: unset fields are left out, so parsing it again
    merges defaults and per-stage ``run`` overrides as the first parse did (same stage keys)."""
    return spec.model_dump(mode="json", exclude_unset=True)


def stage_file_uri(stage: ResolvedStage) -> str:
    """Where the stage's ``stage.json`` lives: ``<storage>/<pipeline>/<stage>/<key>/stage.json``."""
    return stage.store.uri(STAGE_FILE)


def write_stage_file(stage: ResolvedStage, *, force: bool = False) -> str:
    """Write what ``kdray.worker`` needs to run the stage anywhere; return the file's URI."""
    doc = {"spec": spec_to_json(stage.spec), "stage": stage.name, "key": stage.key, "force": force}
    stage.store.write_bytes(STAGE_FILE, json.dumps(doc, indent=1, sort_keys=True).encode())
    return stage.store.uri(STAGE_FILE)


def log_tail(text: str, lines: int = 30) -> str:
    """The last ``lines`` lines of a log, with the worker's own ``error: ...`` line first if there is one."""
    rows = [r for r in text.rstrip().splitlines() if r.strip()]
    errors = [r for r in rows if "error: " in r and not r.lstrip().startswith("File ")]
    shown = rows[-lines:]
    head = [f"  {errors[-1].strip()}", "  ..."] if errors and errors[-1] not in shown else []
    return "\n".join(head + [f"  | {r}" for r in shown]) or "  (the log is empty)"


def redact(text: str) -> str:
    """``text`` with the values of this process's secret environment variables masked."""
    for key in SECRET_ENV:
        value = os.environ.get(key, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text
