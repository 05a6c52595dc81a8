"""The ``kuberay`` launcher: the stage runs as a KubeRay ``RayJob`` with its own Ray cluster."""

from __future__ import annotations

import os
import re
import time
from typing import Any

from kdray.contracts.checkpoint import Artifact, read_artifact
from kdray.core.errors import KdrayError, SpecError
from kdray.core.meter import article
from kdray.core.storage import Storage
from kdray.engine import progress
from kdray.engine.launchers import (
    LAUNCHERS,
    WORKER_COMMAND,
    Log,
    log_tail,
    stage_file_uri,
    write_stage_file,
)
from kdray.engine.resolved import ResolvedStage
from kdray.engine.spec import PipelineSpec
from kdray.k8s.client import JobFailed, KubeRayClient
from kdray.k8s.render import JobRequest


def job_request(stage: ResolvedStage, stage_uri: str | None = None) -> JobRequest:
    """The ``kdray.k8s.JobRequest`` for a stage: its run settings plus image/namespace/S3 endpoint from env.

    ``workers: 0`` (the loop in-process) becomes one worker pod; ``KDRAY_IMAGE``, ``KDRAY_NAMESPACE``
    and ``KDRAY_S3_ENDPOINT`` override the ``kdray.k8s`` defaults (the S3 endpoint must be one the
    pods can reach, e.g. ``http://seaweedfs.kdray.svc.cluster.local:8333``).
    """
    if not stage.kind.trains:
        kind = stage.stage.kind
        raise KdrayError(
            f"stage {stage.name!r} is {article(kind)} {kind} stage, which always runs locally (it needs no cluster)",
            hint="Render or submit a train, distill, transfer or adapt stage instead.",
        )
    run = stage.run
    extra: dict[str, Any] = {
        k: os.environ[v] for k, v in (("image", "KDRAY_IMAGE"), ("namespace", "KDRAY_NAMESPACE")) if os.environ.get(v)
    }
    return JobRequest(
        pipeline=stage.pipeline,
        stage=stage.name,
        key=stage.key,
        stage_uri=stage_uri or stage_file_uri(stage),
        workers=max(1, run.workers),
        use_gpu=run.use_gpu,
        cpus_per_worker=run.cpus_per_worker,
        s3_endpoint=os.environ.get("KDRAY_S3_ENDPOINT") or None,
        **extra,
    )


def require_object_storage(spec: PipelineSpec) -> None:
    if not spec.storage.uri.startswith("s3://"):
        raise SpecError(
            f"storage.uri {spec.storage.uri!r} is a local folder, which the pods of the kuberay "
            "launcher cannot see (they run on other machines)",
            hint="Use object storage both sides can reach: storage.uri=s3://<bucket>/<prefix> with "
            "KDRAY_S3_ENDPOINT (and the kdray-s3 Secret in the cluster).",
        )


@LAUNCHERS.register("kuberay")
class KubeRayLauncher:
    """Run the stage as a KubeRay ``RayJob`` with its own Ray cluster (``kdray.k8s.render_rayjob``).

    The RayJob's name is fixed by the stage key, so launching again is idempotent: a running
    RayJob is followed, a failed one replaced (``KubeRayClient.submit``), a completed one replaced
    too (the launcher only runs when the artifact is missing, or with ``force``). Status changes go
    to ``log``; a failure raises with the tail of the submitter pod's log; Ctrl-C deletes the
    RayJob (KubeRay then deletes its cluster) and re-raises. Storage must be ``s3://``.
    """

    poll_s = 2.0  # seconds between status polls
    delete_timeout_s = 120.0  # how long a replaced RayJob may take to disappear

    def __init__(self, client: Any = None, poll_s: float | None = None):
        self._client = client
        self.poll_s = poll_s if poll_s is not None else type(self).poll_s

    def client(self, namespace: str) -> Any:
        if self._client is None:
            self._client = KubeRayClient(namespace=namespace)
        return self._client

    def run(
        self,
        stage: ResolvedStage,
        log: Log = print,
        *,
        parents: dict[str, Artifact] | None = None,
        force: bool = False,
    ) -> None:
        pipeline = stage.pipeline
        require_object_storage(stage.spec)
        req = job_request(stage)
        if req.s3_endpoint and re.match(r"^https?://(localhost|127\.|\[::1\])", req.s3_endpoint):
            log(
                f"[{pipeline}] warning: KDRAY_S3_ENDPOINT={req.s3_endpoint} is a loopback address, which the "
                "pods cannot reach; submit from inside the cluster (e.g. the Prefect worker) with the in-cluster "
                "endpoint, or use an endpoint both sides reach."
            )
        client = self.client(req.namespace)
        if self._completed_before(client, req.name, stage.store, force, log):
            return None
        uri = write_stage_file(stage, force=force)
        name = client.submit(req)
        log(f"[{pipeline}] RayJob {name} in namespace {req.namespace}: {WORKER_COMMAND} {uri}")

        # each change of state logged with the time since submission; a spinner line on a terminal
        watch = progress.StateWatch(f"[{pipeline}] RayJob {name}", log)

        def on_status(s: dict) -> None:
            state = s["jobDeploymentStatus"] or "Pending"
            watch.state(state + (f" (job {s['jobStatus']})" if s["jobStatus"] else ""))

        try:
            with watch:
                client.wait(name, poll_s=self.poll_s, on_status=on_status)
        except KeyboardInterrupt:
            try:
                client.delete(name)
                log(f"interrupted: deleted RayJob {name} (KubeRay deletes its cluster)")
            except Exception as e:  # the interrupt matters more than a failed delete
                log(
                    f"interrupted: could not delete RayJob {name} ({e}); "
                    f"`kubectl delete rayjob -n {req.namespace} {name}`"
                )
            raise
        except JobFailed as e:
            try:
                text = log_tail(client.logs(name))
            except KdrayError as no_log:
                text = f"  (no log: {no_log})"
            raise KdrayError(
                f"stage {stage.name!r} failed on Kubernetes: {e}\nLast lines of the job log:\n{text}",
                hint=f"`kubectl logs -n {req.namespace} -l job-name={name}` has the whole log; fix the "
                "cause and run again (the failed RayJob is replaced, and training resumes "
                "from the last checkpoint).",
            ) from None
        return None

    def _completed_before(self, client: Any, name: str, store: Storage, force: bool, log: Log) -> bool:
        """True when a completed RayJob of this name already published the artifact (nothing to do).

        Otherwise an earlier completed RayJob is deleted, so that ``submit`` creates a fresh one:
        ``submit`` reuses a RayJob of the same name and key as it is, and a completed one would then
        "succeed" again at once without producing the missing (or forced) artifact.
        """
        try:
            state = client.status(name)
        except KdrayError as e:
            if getattr(e.__cause__, "status", None) == 404:
                return False
            raise
        if state["jobDeploymentStatus"] != "Complete":
            return False
        if state["jobStatus"] == "SUCCEEDED" and not force and read_artifact(store) is not None:
            log(f"RayJob {name} already succeeded and its artifact exists; nothing to do")
            return True
        log(f"RayJob {name} already completed (job {state['jobStatus'] or '?'}); replacing it")
        client.delete(name)
        deadline = time.monotonic() + self.delete_timeout_s
        while time.monotonic() < deadline:
            try:
                client.status(name)
            except KdrayError as e:
                if getattr(e.__cause__, "status", None) == 404:
                    return False
                raise
            time.sleep(min(self.poll_s, 0.5))
        raise KdrayError(
            f"RayJob {name} was deleted but still exists after {self.delete_timeout_s} s",
            hint="Check that the KubeRay operator is running (its finalizer removes the RayJob).",
        )
