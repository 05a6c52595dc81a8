"""KubeRayClient against a loopback stand-in of the Kubernetes API.

Why a stand-in: no Kubernetes API server (nor kind, k3s or a container engine) can run on this
machine, so the RayJob client path cannot meet a real cluster in CI. Instead a small ``http.server``
thread on 127.0.0.1 speaks the few REST endpoints the client uses, with the real wire format:
``POST/GET/DELETE /apis/ray.io/v1/namespaces/{ns}/rayjobs[/{name}]`` (409 ``AlreadyExists`` on a
duplicate name, a finalizer that keeps a deleted RayJob visible for a moment, ``Status`` error
bodies), ``GET /api/v1/namespaces/{ns}/pods?labelSelector=...`` and ``.../pods/{pod}/log``. It plays
KubeRay's status transitions over successive GETs from scripts that follow the operator's state
machine (``rayjob_controller.go``): success ``"" -> Initializing -> Running -> Complete/SUCCEEDED``,
``Failed``/``AppFailed``, ``ValidationFailed``, ``Failed``/``DeadlineExceeded``. The real
``kubernetes`` client (``CustomObjectsApi``, ``CoreV1Api``) does all the HTTP, JSON and error
handling, so only the operator's behaviour is simulated.
"""

from __future__ import annotations

import json
import threading
from http.server import ThreadingHTTPServer

import pytest
from helpers.kubeapi import (
    APP_FAILED,
    DEADLINE,
    JSON_LOG,
    STOPPED,
    STUCK,
    SUCCESS,
    VALIDATION_FAILED,
    FakeKubeRay,
    Handler,
)

from kdray.core.errors import KdrayError
from kdray.k8s.client import JobFailed, JobTimeout, KubeRayClient
from kdray.k8s.render import JobRequest, render_rayjob

kubernetes = pytest.importorskip("kubernetes")


@pytest.fixture()
def kube():
    fake = FakeKubeRay()
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("BoundHandler", (Handler,), {"fake": fake}))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    cfg = kubernetes.client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    client = KubeRayClient(api_client=kubernetes.client.ApiClient(cfg), namespace="kdray")
    client.DELETE_POLL_S = 0.001
    yield fake, client, server.server_address[1]
    server.shutdown()
    server.server_close()


def request(**kw) -> JobRequest:
    base = dict(
        pipeline="fmnist",
        stage="student",
        key="c0ffee0123456789",
        stage_uri="s3://kdray/runs/fmnist/student/c0ffee0123456789/stage.json",
    )
    base.update(kw)
    return JobRequest(**base)


def calls(fake: FakeKubeRay, method: str) -> list[str]:
    return [path for m, path, _ in fake.requests if m == method]


# ---- the scripted KubeRay scenarios ---------------------------------------------------------------
def test_success_submits_the_rendered_rayjob_and_follows_it_to_complete(kube):
    fake, client, _ = kube
    req = request()
    name = client.submit(req)
    assert name == "fmnist-student-c0ffee012345"
    (post,) = [body for m, _, body in fake.requests if m == "POST"]
    assert post == render_rayjob(req)  # exactly the validated manifest, no values for the secrets
    assert calls(fake, "POST") == ["/apis/ray.io/v1/namespaces/kdray/rayjobs"]

    seen = []
    final = client.wait(name, poll_s=0.001, on_status=seen.append)
    assert final == {
        "name": name,
        "jobStatus": "SUCCEEDED",
        "jobDeploymentStatus": "Complete",
        "reason": "",
        "message": "",
    }
    assert [(s["jobDeploymentStatus"], s["jobStatus"]) for s in seen] == [
        ("", ""),
        ("Initializing", ""),
        ("Running", "PENDING"),
        ("Running", "RUNNING"),
        ("Complete", "SUCCEEDED"),
    ]
    assert client.logs(name) == JSON_LOG
    assert client.status(name)["jobDeploymentStatus"] == "Complete"


@pytest.mark.parametrize(
    "script, reason, words",
    [
        (APP_FAILED, "AppFailed", "exit code 1"),
        (VALIDATION_FAILED, "ValidationFailed", "no more than 47 characters"),
        (DEADLINE, "DeadlineExceeded", "activeDeadlineSeconds"),
    ],
)
def test_failures_raise_job_failed_with_kuberays_reason(kube, script, reason, words):
    fake, client, _ = kube
    fake.scripts.append(script)
    name = client.submit(request())
    with pytest.raises(JobFailed) as info:
        client.wait(name, poll_s=0.001)
    err = info.value
    assert isinstance(err, KdrayError) and err.name == name
    assert err.status["reason"] == reason and err.status == client.status(name)
    assert f"reason {reason}" in str(err) and words in str(err) and f"RayJob {name!r}" in str(err)
    if reason == "DeadlineExceeded":
        assert "active_deadline_s" in str(err)  # the hint says which knob to turn


def test_a_stopped_job_is_complete_but_not_a_success(kube):
    fake, client, _ = kube
    fake.scripts.append(STOPPED)
    name = client.submit(request())
    with pytest.raises(JobFailed, match="jobStatus='STOPPED'"):
        client.wait(name, poll_s=0.001)


def test_wait_times_out_while_the_job_keeps_running(kube):
    fake, client, _ = kube
    fake.scripts.append(STUCK)
    name = client.submit(request())
    with pytest.raises(JobTimeout, match="still jobDeploymentStatus='Running'"):
        client.wait(name, poll_s=0.005, timeout_s=0.05)
    assert not calls(fake, "DELETE")  # giving up waiting does not stop the job


# ---- idempotency and retries ---------------------------------------------------------------------
def test_submit_is_idempotent_for_the_same_stage_key(kube):
    fake, client, _ = kube
    fake.scripts.append(STUCK)
    first = client.submit(request())
    client.status(first)
    second = client.submit(request())
    assert first == second and len(fake.jobs) == 1
    assert len(calls(fake, "POST")) == 2 and not calls(fake, "DELETE")  # 409 -> reuse
    assert fake.jobs[first]["step"] >= 1  # the running job was kept, not restarted


def test_submit_refuses_a_name_taken_by_another_stage_key(kube):
    fake, client, _ = kube
    name = client.submit(request())
    fake.jobs[name]["obj"]["metadata"]["annotations"]["kdray.io/key"] = "c0ffee0123456789aaaa"
    with pytest.raises(KdrayError, match="already exists for stage key 'c0ffee0123456789aaaa', not 'c0ffee0123456789'"):
        client.submit(request())


def test_a_failed_job_is_replaced_on_resubmit(kube):
    fake, client, _ = kube
    fake.scripts += [APP_FAILED, SUCCESS]
    name = client.submit(request())
    with pytest.raises(JobFailed):
        client.wait(name, poll_s=0.001)
    assert client.submit(request()) == name
    assert [m for m, *_ in fake.requests if m in ("POST", "DELETE")] == ["POST", "POST", "DELETE", "POST"]
    assert client.wait(name, poll_s=0.001)["jobStatus"] == "SUCCEEDED"
    # without replace_failed the failed RayJob is returned as it is
    fake.jobs[name]["script"], fake.jobs[name]["step"] = APP_FAILED, 99
    client.submit(request(), replace_failed=False)
    assert calls(fake, "DELETE") == [f"/apis/ray.io/v1/namespaces/kdray/rayjobs/{name}"]


def test_wait_rides_out_transient_api_errors_but_not_a_broken_api(kube):
    fake, client, _ = kube
    name = client.submit(request())
    fake.inject += [("GET", 503), ("GET", 500)]
    assert client.wait(name, poll_s=0.001)["jobStatus"] == "SUCCEEDED"
    assert not fake.inject
    fake.inject += [("GET", 503)] * 5
    with pytest.raises(KdrayError, match="failed 5 times in a row"):
        client.wait(name, poll_s=0.001)


# ---- API errors, logs, delete --------------------------------------------------------------------
@pytest.mark.parametrize("code, words", [(403, "kdray-runner"), (404, "kuberay-operator 1.7.0")])
def test_api_refusals_become_kdray_errors_with_a_fix(kube, code, words):
    fake, client, _ = kube
    fake.inject.append(("POST", code))
    with pytest.raises(KdrayError) as info:
        client.submit(request())
    message = str(info.value)
    assert f"could not create: HTTP {code}" in message and f"(injected {code})" in message and words in message


def test_status_of_a_missing_job_says_it_is_gone(kube):
    _, client, _ = kube
    with pytest.raises(KdrayError, match="RayJob 'nope' in namespace 'kdray'.*HTTP 404"):
        client.status("nope")


def test_logs_need_a_submitter_pod_and_take_the_newest(kube):
    fake, client, _ = kube
    fake.scripts.append(STUCK)
    name = client.submit(request())
    with pytest.raises(KdrayError, match="has no submitter pod"):
        client.logs(name)
    client.status(name), client.status(name), client.status(name)  # reaches Running: pod appears
    fake.add_pod(name, "attempt 2: training epoch 1\n", "2026-01-01T00:05:00Z")
    fake.add_pod("other-job", "not ours", "2026-01-01T00:09:00Z")
    assert client.logs(name) == "attempt 2: training epoch 1\n"


def test_delete_is_idempotent(kube):
    fake, client, _ = kube
    name = client.submit(request())
    client.delete(name)
    client.delete("never-existed")
    assert fake.jobs[name]["deleting"] == fake.finalizer_gets
    for _ in range(fake.finalizer_gets):
        client.status(name)  # still visible while KubeRay's finalizer stops the Ray job
    with pytest.raises(KdrayError, match="HTTP 404"):
        client.status(name)


def test_namespace_of_request_and_client_must_agree(kube):
    _, client, _ = kube
    with pytest.raises(KdrayError, match="JobRequest.namespace: the request is for namespace 'ml'"):
        client.submit(request(namespace="ml"))


# ---- default configuration -----------------------------------------------------------------------
def test_default_client_loads_the_kubeconfig(kube, tmp_path, monkeypatch):
    fake, _, port = kube
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "standin",
                "clusters": [{"name": "standin", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "runner", "user": {"token": "not-a-real-token"}}],
                "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "runner"}}],
            }
        )
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    client = KubeRayClient()
    name = client.submit(request())
    assert client.status(name)["name"] == name and name in fake.jobs


def test_without_any_kubernetes_config_the_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(KdrayError, match="no Kubernetes credentials found.*kdray-runner ServiceAccount"):
        KubeRayClient()
