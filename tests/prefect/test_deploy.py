"""Deployments end to end: a real ``prefect server start``, work pools, a cron deployment made by
``flows/deploy.py``, a run triggered through the API and executed by ``prefect worker start --run-once``.

The server gets its own PREFECT_HOME; PREFECT_API_URL is set only in the subprocesses' environment
and, for this process's client, inside ``temporary_settings``. The server's process group is
always stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import REPO, synthetic_pipeline

from kdray.engine.pipeline import plan
from kdray.engine.spec import parse_pipeline

pytestmark = pytest.mark.slow
PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real Prefect server on a free loopback port; yields (api_url, env for subprocesses)."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home / "home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_healthy(url, proc, log)
        yield url, {**env, "PREFECT_API_URL": url}
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):  # the server and its children
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def test_cron_deployment_runs_on_a_process_worker(tmp_path, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import K8S_POOL, LOCAL_POOL, deploy, ensure_work_pool, k8s_job_variables
    from kdray.engine.spec import load_pipeline

    url, env = prefect_api
    doc = synthetic_pipeline(tmp_path, epochs=1)
    spec_path = tmp_path / "pipeline.yaml"
    spec_path.write_text(yaml.safe_dump(doc))
    with temporary_settings(updates={PREFECT_API_URL: url}):
        assert ensure_work_pool(LOCAL_POOL) == "process"
        deployment_id = deploy(str(spec_path), cron="0 3 * * *", pool=LOCAL_POOL)
        assert deploy(str(spec_path), cron="0 3 * * *", pool=LOCAL_POOL) == deployment_id, "deploying again updates"
        # The Kubernetes pool is made from the repository's base job template; the server checks
        # the deployment's job variables against that template's schema.
        assert ensure_work_pool(K8S_POOL) == "kubernetes"
        k8s_id = deploy(str(spec_path), cron="0 4 * * *", pool=K8S_POOL)
        with get_client(sync_client=True) as client:
            dep = client.read_deployment(deployment_id)
            assert (dep.name, dep.work_pool_name, dep.entrypoint) == (
                "synth-local",
                LOCAL_POOL,
                "flows/pipeline.py:pipeline_flow",
            )
            assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
            assert dep.parameters == {"spec_uri": str(spec_path), "overrides": []}
            assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
            assert client.read_deployment(k8s_id).job_variables == k8s_job_variables(load_pipeline(str(spec_path)))
            flow_run = client.create_flow_run_from_deployment(deployment_id)

    # The worker runs in another folder: the deployment's pull step finds the flow code.
    worker = subprocess.run(
        [*PREFECT, "worker", "start", "--pool", LOCAL_POOL, "--run-once"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    with temporary_settings(updates={PREFECT_API_URL: url}):
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run.id).state
    assert worker.returncode == 0 and state.is_completed(), f"{state}\n{worker.stdout[-3000:]}\n{worker.stderr[-3000:]}"
    key = plan(parse_pipeline(doc))["teacher"]
    manifest = json.loads((tmp_path / f"runs/synth/teacher/{key}/manifest.json").read_text())
    assert (manifest["stage"], manifest["key"]) == ("teacher", key)
