"""Where a stage runs: ``local`` (this process), ``ray`` (a job on a Ray cluster), ``kuberay`` (a RayJob).

Every launcher has one method, ``run(spec, stage_name, key, log, *, parents=None, force=False)``,
which returns once the stage's artifact exists (or raises ``KdrayError``)::

    LAUNCHERS.get("ray")().run(spec, "teacher", key, print)

``local`` calls the stage function in this process (embedded Ray, or ``ray.init(address=run.address)``)
and returns the ``Artifact``. The remote launchers write ``stage.json`` (``{"spec": <pipeline spec
JSON>, "stage": <name>, "key": <key>, "force": <bool>}``) into the stage's artifact folder, start
``python -m kdray.worker <URI of stage.json>`` on the cluster, follow it to the end and return
``None``; ``kdray.pipeline.run_stage`` then reads the artifact the cluster published. The worker
runs the same ``run_stage`` with the ``local`` launcher inside the cluster, so a finished artifact
makes a repeated launch a no-op, and a retried launch resumes from the stage's last Ray checkpoint
(the Ray Train run name is deterministic).

``evaluate`` stages always run locally (``launcher_for``): they only read finished artifacts and
need no cluster.

The CLI calls ``submit_command`` (``kdray submit``: run a pipeline with every stage on one launcher)
and ``render_command`` (``kdray render``: the RayJob YAML the ``kuberay`` launcher would create).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable

from kdray.errors import KdrayError, SpecError
from kdray.registry import Registry
from kdray.specs import PipelineSpec, load_pipeline, parse_pipeline
from kdray.storage import Storage

__all__ = [
    "LAUNCHERS", "LocalLauncher", "RayJobLauncher", "KubeRayLauncher", "launcher_for", "with_launcher",
    "spec_to_json", "write_stage_file", "stage_file_uri", "submission_id", "job_request",
    "submit_command", "render_command", "STAGE_FILE", "FORWARDED_ENV",
]

LAUNCHERS: Registry = Registry("launcher")
STAGE_FILE = "stage.json"
WORKER_COMMAND = "python -m kdray.worker"
# Environment a Ray job needs to reach the same storage as the submitter. Values are sent in the
# job's runtime_env and never logged; the secret ones are also masked in any text shown to the user.
FORWARDED_ENV = ("KDRAY_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the "(RayTrainWorker pid=...)" prefixes
Log = Callable[[str], None]


# --------------------------------------------------------------------------- shared pieces


def launcher_for(spec: PipelineSpec, stage: Any) -> str:
    """The launcher a stage runs on: its ``run.launcher``, except ``evaluate`` (always ``local``)."""
    return "local" if stage.kind == "evaluate" else spec.run_for(stage).launcher


def spec_to_json(spec: PipelineSpec) -> dict[str, Any]:
    """The spec as the user wrote it, validated: unset fields are left out, so parsing it again
    merges defaults and per-stage ``run`` overrides as the first parse did (same stage keys)."""
    return spec.model_dump(mode="json", exclude_unset=True)


def with_launcher(spec: PipelineSpec, launcher: str) -> PipelineSpec:
    """The same pipeline with every stage's launcher (the pipeline's and each stage's own) set to ``launcher``."""
    LAUNCHERS.get(launcher)  # an unknown name fails with did-you-mean
    doc = spec_to_json(spec)
    doc.setdefault("run", {})["launcher"] = launcher
    for stage in doc["stages"]:
        if "run" in stage:
            stage["run"]["launcher"] = launcher
    return parse_pipeline(doc, f"pipeline {spec.name!r} with launcher {launcher!r}")


def _stage_store(spec: PipelineSpec, stage_name: str, key: str) -> Storage:
    from kdray.pipeline import artifact_store

    return artifact_store(Storage(spec.storage.uri), spec.name, stage_name, key)


def stage_file_uri(spec: PipelineSpec, stage_name: str, key: str) -> str:
    """Where the stage's ``stage.json`` lives: ``<storage>/<pipeline>/<stage>/<key>/stage.json``."""
    return _stage_store(spec, stage_name, key).uri(STAGE_FILE)


def write_stage_file(spec: PipelineSpec, stage_name: str, key: str, *, force: bool = False) -> str:
    """Write what ``kdray.worker`` needs to run the stage anywhere; return the file's URI."""
    store = _stage_store(spec, stage_name, key)
    doc = {"spec": spec_to_json(spec), "stage": stage_name, "key": key, "force": force}
    store.write_bytes(STAGE_FILE, json.dumps(doc, indent=1, sort_keys=True).encode())
    return store.uri(STAGE_FILE)


def _tail(text: str, lines: int = 30) -> str:
    """The last ``lines`` lines of a log, with the worker's own ``error: ...`` line first if there is one."""
    rows = [r for r in text.rstrip().splitlines() if r.strip()]
    errors = [r for r in rows if "error: " in r and not r.lstrip().startswith("File ")]
    shown = rows[-lines:]
    head = [f"  {errors[-1].strip()}", "  ..."] if errors and errors[-1] not in shown else []
    return "\n".join(head + [f"  | {r}" for r in shown]) or "  (the log is empty)"


def _secrets() -> list[str]:
    return [os.environ[k] for k in _SECRET_ENV if len(os.environ.get(k, "")) >= 4]


def _redact(text: str) -> str:
    for value in _secrets():
        text = text.replace(value, "***")
    return text


# --------------------------------------------------------------------------- local


@LAUNCHERS.register("local")
class LocalLauncher:
    """Run the stage in this process: embedded Ray (or ``ray.init(address=run.address)``), ``fit()`` here."""

    def run(self, spec: PipelineSpec, stage_name: str, key: str, log: Log = print, *,
            parents: dict[str, Any] | None = None, force: bool = False) -> Any:
        from kdray.pipeline import parent_artifacts, plan
        from kdray.stages import STAGES, StageContext

        stage = spec.stage(stage_name)
        root = Storage(spec.storage.uri)
        if parents is None:
            parents = parent_artifacts(spec, stage, plan(spec), root)
        store = _stage_store(spec, stage_name, key)
        if force:  # start over: Ray would otherwise resume the finished run from its last checkpoint
            from kdray.train import run_name

            root.delete_dir(f"_ray/{run_name(spec.name, stage_name, key)}")
        return STAGES.get(stage.kind)(StageContext(spec, stage, key, store, root, parents, log))


# --------------------------------------------------------------------------- ray (Job Submission API)


def submission_id(pipeline: str, stage: str, key: str, attempt: int = 1) -> str:
    """``kdray-<pipeline>-<stage>-<key>`` (``-r<attempt>`` from the second attempt on), safe characters only."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", f"kdray-{pipeline}-{stage}-{key}")
    return base if attempt == 1 else f"{base}-r{attempt}"


def dashboard_url(address: str | None) -> str:
    """``http://host:8265`` from ``run.address`` (or ``$RAY_API_SERVER_ADDRESS``/``$RAY_ADDRESS``)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address or address == "auto":
        raise KdrayError("the ray launcher needs the address of a Ray cluster's dashboard (job API)",
                         where="run.address",
                         hint="Set run.address: http://<head>:8265 in the spec (or RAY_ADDRESS=http://<head>:8265); "
                              "for a KubeRay RayCluster it is http://<name>-head-svc.<namespace>.svc:8265.")
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise KdrayError(f"{address!r} is not a Ray dashboard address", where="run.address",
                         hint="The ray launcher talks to the Job Submission API over HTTP: give "
                              "http://<head>:8265 (the dashboard port), not a ray:// or GCS (:6379) address.")
    return address.rstrip("/")


_ENV_LOCK = threading.Lock()


@LAUNCHERS.register("ray")
class RayJobLauncher:
    """Run the stage as a job on an existing Ray cluster through the Ray Job Submission API.

    The job's ``submission_id`` is fixed by the stage key (``submission_id()``), so launching again
    is idempotent: a PENDING or RUNNING job with that id is attached to (its log streamed from the
    start), a SUCCEEDED one whose artifact exists means nothing to do. Ray never accepts an id
    twice, not even after the job ended, so a FAILED or STOPPED job (or a SUCCEEDED one whose
    artifact is gone, or any with ``force``) is followed by a new job under the next attempt id,
    ``<id>-r2``, ``<id>-r3``...; it resumes from the stage's last Ray checkpoint.

    The S3 endpoint of this process goes to the job as a ``runtime_env`` variable so that it reaches
    the same storage. Credentials do not, by default: Ray stores a job's runtime_env (anyone who can
    read the cluster's job API sees it) and its runtime-env agent writes it to its log, so the
    cluster should hold its own (the ``kdray-s3`` Secret in ``k8s/``). ``KDRAY_RAY_FORWARD_CREDENTIALS=1``
    forwards this process's ``AWS_*`` keys too, for a private cluster; they are masked in the job log
    shown here either way. With ``file://``
    storage the cluster must see the same folder (one machine, or a shared filesystem).

    The job log is polled (``get_job_logs``) and only its new lines go to ``log``; Ctrl-C stops
    the job (``stop_job``) and re-raises. An unreachable address fails in ``probe_timeout_s``.
    """

    poll_s = 1.0            # seconds between status/log polls
    probe_timeout_s = 5.0   # an unreachable dashboard fails after this long
    max_api_errors = 5      # consecutive failed polls before giving up (the job keeps running)

    def __init__(self, poll_s: float | None = None, probe_timeout_s: float | None = None):
        self.poll_s = poll_s if poll_s is not None else type(self).poll_s
        self.probe_timeout_s = probe_timeout_s if probe_timeout_s is not None else type(self).probe_timeout_s

    def run(self, spec: PipelineSpec, stage_name: str, key: str, log: Log = print, *,
            parents: dict[str, Any] | None = None, force: bool = False) -> None:
        from ray.job_submission import JobStatus

        from kdray.checkpoint import read_artifact

        url = dashboard_url(spec.run_for(spec.stage(stage_name)).address)
        client = self.client(url)
        stage_uri = write_stage_file(spec, stage_name, key, force=force)
        attempts = self._attempts(client, submission_id(spec.name, stage_name, key))
        job, status = (attempts[-1][1].submission_id, attempts[-1][1].status) if attempts else (None, None)
        if status in (JobStatus.PENDING, JobStatus.RUNNING):
            log(f"[{spec.name}] attaching to Ray job {job} ({status}) at {url}")
        elif status == JobStatus.SUCCEEDED and not force and read_artifact(_stage_store(spec, stage_name, key)):
            log(f"[{spec.name}] Ray job {job} already succeeded; nothing to do")
            return None
        else:
            number = attempts[-1][0] + 1 if attempts else 1
            if job is not None:
                log(f"[{spec.name}] Ray job {job} ended {status}; submitting attempt {number}")
            job = self._submit(client, submission_id(spec.name, stage_name, key, number), stage_uri, key, log)
        try:
            if status not in (JobStatus.PENDING, JobStatus.RUNNING):
                log(f"[{spec.name}] submitted Ray job {job} to {url}: {WORKER_COMMAND} {stage_uri}")
            self._follow(client, job, log)
        except KeyboardInterrupt:
            try:
                client.stop_job(job)
                log(f"interrupted: stopped Ray job {job}")
            except Exception as e:  # the interrupt matters more than a failed stop
                log(f"interrupted: could not stop Ray job {job} ({_redact(str(e))}); stop it with "
                    f"`ray job stop {job}`")
            raise
        return None

    # ------------------------------------------------------------------ pieces

    def client(self, url: str) -> Any:
        """A ``JobSubmissionClient`` for ``url``, after a quick reachability probe (no long hang)."""
        self._probe(url)
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError as e:
            raise KdrayError(f"the ray launcher needs Ray's job API, which is not installed ({e})",
                             hint="pip install 'ray[default]'") from None
        # Ray's client lets $RAY_ADDRESS override its argument; the spec's address must win.
        with _ENV_LOCK:
            saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
            try:
                return JobSubmissionClient(url)
            except Exception as e:  # ConnectionError, RuntimeError (HTTP status), AuthenticationError
                raise KdrayError(f"the Ray job API at {url} refused the connection: {_redact(str(e))}",
                                 where="run.address",
                                 hint="Check that it is the dashboard address of a Ray >= 2.0 cluster started "
                                      "with the dashboard (ray[default]).") from None
            finally:
                os.environ.update(saved)

    def _probe(self, url: str) -> None:
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=self.probe_timeout_s):
                return
        except urllib.error.HTTPError:
            return  # it answered HTTP (maybe 401 for a token-protected cluster): the client decides
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            raise KdrayError(f"cannot reach the Ray dashboard at {url} ({reason})", where="run.address",
                             hint="Check that the cluster is running and that the address is its dashboard "
                                  "(job API, port 8265 by default; `kubectl port-forward svc/<cluster>-head-svc "
                                  "8265` for a KubeRay cluster).") from None

    @staticmethod
    def _attempts(client: Any, base: str) -> list[tuple[int, Any]]:
        """(attempt number, JobDetails) of this stage's earlier jobs, oldest attempt first."""
        pattern = re.compile(re.escape(base) + r"(?:-r(\d+))?")
        found = []
        for job in client.list_jobs():
            match = pattern.fullmatch(job.submission_id or "")
            if match:
                found.append((int(match.group(1) or 1), job))
        return sorted(found, key=lambda pair: pair[0])

    def _submit(self, client: Any, job: str, stage_uri: str, key: str, log: Log) -> str:
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        if os.environ.get("KDRAY_RAY_FORWARD_CREDENTIALS", "0") != "1":  # see the class docstring
            env = {k: v for k, v in env.items() if k not in _SECRET_ENV}
        try:
            return client.submit_job(entrypoint=f"{WORKER_COMMAND} {shlex.quote(stage_uri)}", submission_id=job,
                                     runtime_env={"env_vars": env} if env else None,
                                     metadata={"kdray.key": key, "kdray.stage_uri": stage_uri})
        except RuntimeError as e:
            if "already exists" in str(e):  # another submitter won the race: follow its job
                log(f"Ray job {job} was just submitted by someone else; attaching to it")
                return job
            raise KdrayError(f"the Ray job API refused job {job}: {_redact(str(e))}",
                             hint="Read the message above; the dashboard's dashboard.log has the details.") from None

    def _follow(self, client: Any, job: str, log: Log) -> None:
        """Stream the job's new log lines and poll its status until it ends; Ctrl-C stops it."""
        shown, errors = 0, 0
        while True:
            try:
                status = client.get_job_status(job)  # before the log: a final status means a final log
                text = _ANSI.sub("", _redact(client.get_job_logs(job)))
                errors = 0
            except (RuntimeError, OSError) as e:
                errors += 1
                if errors >= self.max_api_errors:
                    raise KdrayError(f"lost contact with the Ray job API while following job {job}: "
                                     f"{_redact(str(e))}",
                                     hint="The job keeps running on the cluster; run the same command "
                                          "again to attach to it.") from None
                time.sleep(self.poll_s)
                continue
            # Only complete lines, unless the job is over; a log that shrank was rotated: start over.
            end = len(text) if status.is_terminal() else text.rfind("\n") + 1
            if end < shown:
                shown = 0
            for line in text[shown:end].splitlines():
                log(line)
            shown = max(shown, end)
            if status.is_terminal():
                break
            time.sleep(self.poll_s)
        if status.value == "SUCCEEDED":
            return
        info = client.get_job_info(job)
        raise KdrayError(f"Ray job {job} ended {status.value}: {_redact(info.message or 'no message from Ray')}. "
                         f"Last lines of its log:\n{_tail(text)}",
                         hint=f"The full log: `ray job logs {job}` (with RAY_ADDRESS set to the dashboard). "
                              "Fix the cause and run again: the next attempt resumes from the last checkpoint.")


# --------------------------------------------------------------------------- kuberay (RayJob)


def job_request(spec: PipelineSpec, stage_name: str, key: str, stage_uri: str | None = None) -> Any:
    """The ``kdray.k8s.JobRequest`` for a stage: its run settings plus image/namespace/S3 endpoint from env.

    ``workers: 0`` (the loop in-process) becomes one worker pod; ``KDRAY_IMAGE``, ``KDRAY_NAMESPACE``
    and ``KDRAY_S3_ENDPOINT`` override the ``kdray.k8s`` defaults (the S3 endpoint must be one the
    pods can reach, e.g. ``http://seaweedfs.kdray.svc.cluster.local:8333``).
    """
    from kdray.k8s import JobRequest

    stage = spec.stage(stage_name)
    if stage.kind == "evaluate":
        raise KdrayError(f"stage {stage_name!r} is an evaluate stage, which always runs locally (it needs no cluster)",
                         hint="Render or submit a train, distill, transfer or adapt stage instead.")
    run = spec.run_for(stage)
    extra = {k: os.environ[v] for k, v in (("image", "KDRAY_IMAGE"), ("namespace", "KDRAY_NAMESPACE"))
             if os.environ.get(v)}
    return JobRequest(pipeline=spec.name, stage=stage_name, key=key,
                      stage_uri=stage_uri or stage_file_uri(spec, stage_name, key),
                      workers=max(1, run.workers), use_gpu=run.use_gpu, cpus_per_worker=run.cpus_per_worker,
                      s3_endpoint=os.environ.get("KDRAY_S3_ENDPOINT") or None, **extra)


def _require_object_storage(spec: PipelineSpec) -> None:
    if not spec.storage.uri.startswith("s3://"):
        raise SpecError(f"storage.uri {spec.storage.uri!r} is a local folder, which the pods of the kuberay "
                        "launcher cannot see (they run on other machines)",
                        hint="Use object storage both sides can reach: storage.uri=s3://<bucket>/<prefix> with "
                             "KDRAY_S3_ENDPOINT (and the kdray-s3 Secret in the cluster).")


@LAUNCHERS.register("kuberay")
class KubeRayLauncher:
    """Run the stage as a KubeRay ``RayJob`` with its own Ray cluster (``kdray.k8s.render_rayjob``).

    The RayJob's name is fixed by the stage key, so launching again is idempotent: a running
    RayJob is followed, a failed one replaced (``KubeRayClient.submit``), a completed one replaced
    too (the launcher only runs when the artifact is missing, or with ``force``). Status changes go
    to ``log``; a failure raises with the tail of the submitter pod's log; Ctrl-C deletes the
    RayJob (KubeRay then deletes its cluster) and re-raises. Storage must be ``s3://``.
    """

    poll_s = 2.0              # seconds between status polls
    delete_timeout_s = 120.0  # how long a replaced RayJob may take to disappear

    def __init__(self, client: Any = None, poll_s: float | None = None):
        self._client = client
        self.poll_s = poll_s if poll_s is not None else type(self).poll_s

    def client(self, namespace: str) -> Any:
        if self._client is None:
            from kdray.kuberay import KubeRayClient

            self._client = KubeRayClient(namespace=namespace)
        return self._client

    def run(self, spec: PipelineSpec, stage_name: str, key: str, log: Log = print, *,
            parents: dict[str, Any] | None = None, force: bool = False) -> None:
        from kdray.kuberay import JobFailed

        _require_object_storage(spec)
        req = job_request(spec, stage_name, key)
        if req.s3_endpoint and re.match(r"^https?://(localhost|127\.|\[::1\])", req.s3_endpoint):
            log(f"[{spec.name}] warning: KDRAY_S3_ENDPOINT={req.s3_endpoint} is a loopback address, which the "
                "pods cannot reach; submit from inside the cluster (e.g. the Prefect worker) with the in-cluster "
                "endpoint, or use an endpoint both sides reach.")
        client = self.client(req.namespace)
        if self._completed_before(client, req.name, _stage_store(spec, stage_name, key), force, log):
            return None
        uri = write_stage_file(spec, stage_name, key, force=force)
        name = client.submit(req)
        log(f"[{spec.name}] RayJob {name} in namespace {req.namespace}: {WORKER_COMMAND} {uri}")

        def on_status(s: dict) -> None:
            state = s["jobDeploymentStatus"] or "Pending"
            log(f"[{spec.name}] RayJob {name}: {state}" + (f" (job {s['jobStatus']})" if s["jobStatus"] else ""))

        try:
            client.wait(name, poll_s=self.poll_s, on_status=on_status)
        except KeyboardInterrupt:
            try:
                client.delete(name)
                log(f"interrupted: deleted RayJob {name} (KubeRay deletes its cluster)")
            except Exception as e:  # the interrupt matters more than a failed delete
                log(f"interrupted: could not delete RayJob {name} ({e}); "
                    f"`kubectl delete rayjob -n {req.namespace} {name}`")
            raise
        except JobFailed as e:
            try:
                text = _tail(client.logs(name))
            except KdrayError as no_log:
                text = f"  (no log: {no_log})"
            raise KdrayError(f"stage {stage_name!r} failed on Kubernetes: {e}\nLast lines of the job log:\n{text}",
                             hint=f"`kubectl logs -n {req.namespace} -l job-name={name}` has the whole log; fix the "
                                  "cause and run again (the failed RayJob is replaced, and training resumes "
                                  "from the last checkpoint).") from None
        return None

    def _completed_before(self, client: Any, name: str, store: Storage, force: bool, log: Log) -> bool:
        """True when a completed RayJob of this name already published the artifact (nothing to do).

        Otherwise an earlier completed RayJob is deleted, so that ``submit`` creates a fresh one:
        ``submit`` reuses a RayJob of the same name and key as it is, and a completed one would then
        "succeed" again at once without producing the missing (or forced) artifact.
        """
        from kdray.checkpoint import read_artifact

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
        raise KdrayError(f"RayJob {name} was deleted but still exists after {self.delete_timeout_s} s",
                         hint="Check that the KubeRay operator is running (its finalizer removes the RayJob).")


# --------------------------------------------------------------------------- CLI entry points


def submit_command(spec_path: str, overrides: list[str] | tuple[str, ...] = (), launcher: str = "kuberay",
                   only: list[str] | None = None, *, force: bool = False, log: Log = print) -> list[Any]:
    """``kdray submit``: run the pipeline with every stage on ``launcher``; returns the ``StageOutcome``s."""
    from kdray.pipeline import run_pipeline

    spec = with_launcher(load_pipeline(spec_path, list(overrides)), launcher)
    return run_pipeline(spec, force=force, only=only or None, log=log)


def render_command(spec_path: str, overrides: list[str] | tuple[str, ...] = (), stage: str | None = None) -> str:
    """``kdray render``: the RayJob YAML the kuberay launcher would create for each training stage
    (or only ``stage``), each validated against KubeRay's schemas and rules."""
    from kdray.k8s import render_rayjob, to_yaml
    from kdray.kubevalidate import validate_kuberay
    from kdray.pipeline import plan

    spec = load_pipeline(spec_path, list(overrides))
    names = [stage] if stage else [s.name for s in spec.stages if s.kind != "evaluate"]
    if not names:
        raise KdrayError(f"{spec_path}: pipeline {spec.name!r} has only evaluate stages, which run locally; "
                         "there is no RayJob to render")
    for name in names:
        spec.stage(name)  # an unknown name fails with did-you-mean
    _require_object_storage(spec)
    keys = plan(spec)
    docs = []
    for name in names:
        doc = render_rayjob(job_request(spec, name, keys[name]))
        validate_kuberay(doc)
        docs.append(doc)
    return to_yaml(*docs)
