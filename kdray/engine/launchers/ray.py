"""The ``ray`` launcher: the stage runs as a job on an existing Ray cluster (Job Submission API)."""

from __future__ import annotations

import http.client
import os
import re
import shlex
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from kdray.contracts.checkpoint import Artifact, read_artifact
from kdray.core.errors import KdrayError
from kdray.engine import progress
from kdray.engine.launchers import (
    ANSI,
    FORWARDED_ENV,
    LAUNCHERS,
    SECRET_ENV,
    WORKER_COMMAND,
    Log,
    log_tail,
    redact,
    write_stage_file,
)
from kdray.engine.rayauth import token_auth_if_token_available
from kdray.engine.resolved import ResolvedStage


def submission_id(pipeline: str, stage: str, key: str, attempt: int = 1) -> str:
    """``kdray-<pipeline>-<stage>-<key>`` (``-r<attempt>`` from the second attempt on), safe characters only."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", f"kdray-{pipeline}-{stage}-{key}")
    return base if attempt == 1 else f"{base}-r{attempt}"


def dashboard_url(address: str | None) -> str:
    """``http://host:8265`` from ``run.address`` (or ``$RAY_API_SERVER_ADDRESS``/``$RAY_ADDRESS``)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address or address == "auto":
        raise KdrayError(
            "the ray launcher needs the address of a Ray cluster's dashboard (job API)",
            where="run.address",
            hint="Set run.address: http://<head>:8265 in the spec (or RAY_ADDRESS=http://<head>:8265); "
            "for a KubeRay RayCluster it is http://<name>-head-svc.<namespace>.svc:8265.",
        )
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise KdrayError(
            f"{address!r} is not a Ray dashboard address",
            where="run.address",
            hint="The ray launcher talks to the Job Submission API over HTTP: give "
            "http://<head>:8265 (the dashboard port), not a ray:// or GCS (:6379) address.",
        )
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

    poll_s = 1.0  # seconds between status/log polls
    probe_timeout_s = 5.0  # an unreachable dashboard fails after this long
    max_api_errors = 5  # consecutive failed polls before giving up (the job keeps running)
    stop_timeout_s = 20.0  # Ctrl-C waits this long for the stopped job to end (Ray kills it after 3 s)

    def __init__(self, poll_s: float | None = None, probe_timeout_s: float | None = None):
        self.poll_s = poll_s if poll_s is not None else type(self).poll_s
        self.probe_timeout_s = probe_timeout_s if probe_timeout_s is not None else type(self).probe_timeout_s

    def run(
        self,
        stage: ResolvedStage,
        log: Log = print,
        *,
        parents: dict[str, Artifact] | None = None,
        force: bool = False,
    ) -> None:
        from ray.job_submission import JobStatus

        pipeline, name, key = stage.pipeline, stage.name, stage.key
        url = dashboard_url(stage.run.address)
        client = self.client(url)
        stage_uri = write_stage_file(stage, force=force)
        attempts = self._attempts(client, submission_id(pipeline, name, key))
        job, status = (attempts[-1][1].submission_id, attempts[-1][1].status) if attempts else (None, None)
        if status in (JobStatus.PENDING, JobStatus.RUNNING):
            log(f"[{pipeline}] attaching to Ray job {job} ({status}) at {url}")
        elif status == JobStatus.SUCCEEDED and not force and read_artifact(stage.store):
            log(f"[{pipeline}] Ray job {job} already succeeded; nothing to do")
            return None
        else:
            number = attempts[-1][0] + 1 if attempts else 1
            if job is not None:
                log(f"[{pipeline}] Ray job {job} ended {status}; submitting attempt {number}")
            job = self._submit(client, submission_id(pipeline, name, key, number), stage_uri, key, log)
        try:
            if status not in (JobStatus.PENDING, JobStatus.RUNNING):
                log(f"[{pipeline}] submitted Ray job {job} to {url}: {WORKER_COMMAND} {stage_uri}")
            self._follow(client, str(job), log, f"[{pipeline}] Ray job {job}")
        except KeyboardInterrupt:
            self._stop(client, str(job), log)
            raise
        return None

    def _stop(self, client: Any, job: str, log: Log) -> None:
        """Ctrl-C: stop the job and wait, at most ``stop_timeout_s``, until Ray says it ended.

        A job that is still setting up has no supervisor to take the stop yet (Ray's ``stop_job``
        answers False then), so the stop is sent again each poll until the job is over. The line
        logged says how it ended: a job that finished before the stop reached it is not "stopped".
        """
        deadline = time.monotonic() + self.stop_timeout_s
        try:
            while not (status := client.get_job_status(job)).is_terminal():
                if time.monotonic() > deadline:
                    log(
                        f"interrupted: Ray job {job} is still {status.value} {self.stop_timeout_s:.0f} s after "
                        f"the stop; stop it with `ray job stop {job}`"
                    )
                    return
                client.stop_job(job)
                time.sleep(self.poll_s)
        except Exception as e:  # the interrupt matters more than a failed stop
            log(f"interrupted: could not stop Ray job {job} ({redact(str(e))}); stop it with `ray job stop {job}`")
            return
        if status.value == "STOPPED":
            log(f"interrupted: stopped Ray job {job}")
        else:
            log(f"interrupted: Ray job {job} had already ended {status.value} when the stop reached it")

    # ------------------------------------------------------------------ pieces

    def client(self, url: str) -> Any:
        """A ``JobSubmissionClient`` for ``url``, after a quick reachability probe (no long hang)."""
        self._probe(url)
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError as e:
            raise KdrayError(
                f"the ray launcher needs Ray's job API, which is not installed ({e})",
                hint="Install it: pip install 'ray[default]'.",
            ) from None
        token_auth_if_token_available()  # a cluster with Ray's default token authentication answers 401 without it
        # Ray's client lets $RAY_ADDRESS override its argument; the spec's address must win.
        with _ENV_LOCK:
            saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
            try:
                return JobSubmissionClient(url)
            except Exception as e:  # ConnectionError, RuntimeError (HTTP status), AuthenticationError
                raise KdrayError(
                    f"the Ray job API at {url} refused the connection: {redact(str(e))}",
                    where="run.address",
                    hint="Check that it is the dashboard address of a Ray >= 2.0 cluster started "
                    "with the dashboard (ray[default]).",
                ) from None
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
            raise KdrayError(
                f"cannot reach the Ray dashboard at {url} ({reason})",
                where="run.address",
                hint="Check that the cluster is running and that the address is its dashboard "
                "(job API, port 8265 by default; `kubectl port-forward svc/<cluster>-head-svc "
                "8265` for a KubeRay cluster).",
            ) from None

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
            env = {k: v for k, v in env.items() if k not in SECRET_ENV}
        try:
            return client.submit_job(
                entrypoint=f"{WORKER_COMMAND} {shlex.quote(stage_uri)}",
                submission_id=job,
                runtime_env={"env_vars": env} if env else None,
                metadata={"kdray.key": key, "kdray.stage_uri": stage_uri},
            )
        except RuntimeError as e:
            if "already exists" in str(e):  # another submitter won the race: follow its job
                log(f"Ray job {job} was just submitted by someone else; attaching to it")
                return job
            raise KdrayError(
                f"the Ray job API refused job {job}: {redact(str(e))}",
                hint="Read the message above; the dashboard's dashboard.log has the details.",
            ) from None

    def _follow(self, client: Any, job: str, log: Log, title: str | None = None) -> None:
        """Stream the job's new log lines and poll its status until it ends; Ctrl-C stops it. Each state
        change is logged with the time since the wait began (a spinner line on a terminal)."""
        shown, errors = 0, 0
        with progress.StateWatch(title or f"Ray job {job}", log) as watch:
            while True:
                try:
                    status = client.get_job_status(job)  # before the log: a final status means a final log
                    text = ANSI.sub("", redact(client.get_job_logs(job)))
                    errors = 0
                    if not status.is_terminal():  # a final state is shown after the final log lines
                        watch.state(status.value)
                except (RuntimeError, OSError) as e:
                    errors += 1
                    if errors >= self.max_api_errors:
                        raise KdrayError(
                            f"lost contact with the Ray job API while following job {job}: {redact(str(e))}",
                            hint="The job keeps running on the cluster; run the same command again to attach to it.",
                        ) from None
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
                    watch.state(status.value)
                    break
                time.sleep(self.poll_s)
        if status.value == "SUCCEEDED":
            return
        info = client.get_job_info(job)
        raise KdrayError(
            f"Ray job {job} ended {status.value}: {redact(info.message or 'no message from Ray')}. "
            f"Last lines of its log:\n{log_tail(text)}",
            hint=f"The full log: `ray job logs {job}` (with RAY_ADDRESS set to the dashboard). "
            "Fix the cause and run again: the next attempt resumes from the last checkpoint.",
        )
