"""Where a stage runs: ``local`` (this process), ``ray`` (a job on a Ray cluster), ``kuberay`` (a RayJob).

Every launcher has one method, ``run(spec, stage_name, key, log, *, parents=None, force=False)``,
which returns once the stage's artifact exists (or raises ``KdrayError``)::

    LAUNCHERS.get("ray")().run(spec, "teacher", key, print)

``local`` calls the stage function in this process (embedded Ray, or ``ray.init(address=run.address)``)
and returns the ``Artifact``. The remote launchers write ``stage.json`` (``{"spec": <pipeline spec
JSON>, "stage": <name>, "key": <key>, "force": <bool>}``) into the stage's artifact folder, start
``python -m kdray.worker <URI of stage.json>`` on the cluster, follow it to the end and return
``None``; ``kdray.engine.pipeline.run_stage`` then reads the artifact the cluster published. The worker
runs the same ``run_stage`` with the ``local`` launcher inside the cluster, so a finished artifact
makes a repeated launch a no-op, and a retried launch resumes from the stage's last Ray checkpoint
(the Ray Train run name is deterministic).

Stages that do not train (``evaluate``) always run locally (``launcher_for``): they only read
finished artifacts and need no cluster.

"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Protocol

from kdray.contracts.checkpoint import Artifact
from kdray.contracts.specs import LAUNCHERS as LAUNCHERS  # the table the spec names launchers from
from kdray.contracts.stage import kind_of
from kdray.core import layout
from kdray.core.storage import Storage
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
        spec: PipelineSpec,
        stage_name: str,
        key: str,
        log: Log,
        *,
        parents: dict[str, Artifact],
        force: bool = False,
    ) -> Artifact | None:
        """Run the stage; return its artifact (local) or ``None`` once the cluster has published it."""


def launcher_for(spec: PipelineSpec, stage: Any) -> str:
    """The launcher a stage runs on: its ``run.launcher``, except kinds that do not train (always ``local``)."""
    return spec.run_for(stage).launcher if kind_of(stage).trains else "local"


def artifact_store(root: Storage, pipeline: str, stage: str, key: str) -> Storage:
    """A stage's artifact folder: ``<root>/<pipeline>/<stage>/<key>`` (``kdray.core.layout``)."""
    return layout.artifact(root, pipeline, stage, key)


def stage_store(spec: PipelineSpec, stage_name: str, key: str) -> Storage:
    return artifact_store(Storage(spec.storage.uri), spec.name, stage_name, key)


def spec_to_json(spec: PipelineSpec) -> dict[str, Any]:
    """The spec as the user wrote it, validated: unset fields are left out, so parsing it again
    merges defaults and per-stage ``run`` overrides as the first parse did (same stage keys)."""
    return spec.model_dump(mode="json", exclude_unset=True)


def stage_file_uri(spec: PipelineSpec, stage_name: str, key: str) -> str:
    """Where the stage's ``stage.json`` lives: ``<storage>/<pipeline>/<stage>/<key>/stage.json``."""
    return stage_store(spec, stage_name, key).uri(STAGE_FILE)


def write_stage_file(spec: PipelineSpec, stage_name: str, key: str, *, force: bool = False) -> str:
    """Write what ``kdray.worker`` needs to run the stage anywhere; return the file's URI."""
    store = stage_store(spec, stage_name, key)
    doc = {"spec": spec_to_json(spec), "stage": stage_name, "key": key, "force": force}
    store.write_bytes(STAGE_FILE, json.dumps(doc, indent=1, sort_keys=True).encode())
    return store.uri(STAGE_FILE)


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
