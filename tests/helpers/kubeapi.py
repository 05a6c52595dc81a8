"""A loopback stand-in of the Kubernetes API for the RayJob client and the ``kuberay`` launcher.

No Kubernetes API server (nor kind, k3s or a container engine) can run on the test machine, so a small
``http.server`` handler speaks the few REST endpoints ``kdray.k8s.client`` uses, with the real wire
format, and plays KubeRay's status transitions over successive GETs from scripts that follow the
operator's state machine (``rayjob_controller.go``). ``tests/k8s/test_kuberay_client.py`` says what it
covers; serve it with ``ThreadingHTTPServer(("127.0.0.1", 0), type("Bound", (Handler,), {"fake": fake}))``.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlparse

INIT = {"jobDeploymentStatus": "Initializing"}
PENDING = {"jobDeploymentStatus": "Running", "jobStatus": "PENDING"}
RUNNING = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
SUCCESS = [{}, INIT, PENDING, RUNNING, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}]
APP_FAILED = [
    {},
    INIT,
    RUNNING,
    {
        "jobDeploymentStatus": "Failed",
        "jobStatus": "FAILED",
        "reason": "AppFailed",
        "message": "Job entrypoint command failed with exit code 1",
    },
]
VALIDATION_FAILED = [
    {},
    {
        "jobDeploymentStatus": "ValidationFailed",
        "reason": "ValidationFailed",
        "message": "The RayJob spec is invalid: RayJob name should be no more than 47 characters",
    },
]
DEADLINE = [
    {},
    INIT,
    RUNNING,
    {
        "jobDeploymentStatus": "Failed",
        "jobStatus": "RUNNING",
        "reason": "DeadlineExceeded",
        "message": "The RayJob has passed the activeDeadlineSeconds. ActiveDeadlineSeconds: 21600",
    },
]
STOPPED = [{}, INIT, RUNNING, {"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}]
STUCK = [{}, INIT, RUNNING]
# A log that is itself one JSON document: the client must return it verbatim, not a Python repr.
JSON_LOG = '{"stage": "student", "epoch": 3, "loss": 0.25}'


class FakeKubeRay:
    """State of the stand-in: RayJobs, their status scripts, submitter pods, injected errors."""

    def __init__(self):
        self.lock = threading.Lock()
        self.jobs: dict[str, dict] = {}
        self.pods: dict[str, dict] = {}  # pod name -> {"job": rayjob name, "log": text, "created": ts}
        self.scripts: list[list[dict]] = []  # consumed one per created RayJob
        self.requests: list[tuple[str, str, dict | None]] = []
        self.inject: list[tuple[str, int]] = []  # (method, HTTP status) returned once, in order
        self.finalizer_gets = 2  # GETs during which a deleted RayJob is still visible

    def add_pod(self, job: str, log: str, created: str):
        with self.lock:
            self.pods[f"{job}-{len(self.pods)}"] = {"job": job, "log": log, "created": created}


class Handler(BaseHTTPRequestHandler):
    fake: FakeKubeRay  # set on a per-server subclass

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code: int, body, content_type: str = "application/json"):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str):
        self._send(
            code,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": reason,
                "code": code,
            },
        )

    def _handle(self, method: str):
        fake = self.fake
        url = urlparse(self.path)
        body = None
        if method == "POST":
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with fake.lock:
            fake.requests.append((method, url.path, body))
            for i, (m, code) in enumerate(fake.inject):
                if m == method:
                    del fake.inject[i]
                    return self._status(
                        code, {403: "Forbidden", 404: "NotFound"}.get(code, "InternalError"), f"injected {code}"
                    )
            m = re.fullmatch(r"/apis/ray\.io/v1/namespaces/([^/]+)/rayjobs(?:/([^/]+))?", url.path)
            if m:
                return self._rayjobs(method, m.group(1), m.group(2), body)
            m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", url.path)
            if m and method == "GET":
                return self._pods(m.group(1), parse_qs(url.query).get("labelSelector", [""])[0])
            m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log", url.path)
            if m and method == "GET":
                pod = fake.pods.get(m.group(2))
                if pod is None:
                    return self._status(404, "NotFound", f'pods "{m.group(2)}" not found')
                return self._send(200, pod["log"], "text/plain")
        self._status(404, "NotFound", f"no route for {method} {url.path}")

    def _rayjobs(self, method: str, ns: str, name: str | None, body: dict | None):
        fake = self.fake
        if method == "POST" and name is None:
            name = body["metadata"]["name"]
            if name in fake.jobs:
                return self._status(409, "AlreadyExists", f'rayjobs.ray.io "{name}" already exists')
            obj = json.loads(json.dumps(body))
            obj["metadata"].update(
                namespace=ns,
                uid=f"uid-{len(fake.requests)}",
                resourceVersion="1",
                creationTimestamp="2026-01-01T00:00:00Z",
            )
            script = fake.scripts.pop(0) if fake.scripts else SUCCESS
            fake.jobs[name] = {"obj": obj, "script": script, "step": 0, "deleting": None}
            return self._send(201, obj)
        job = fake.jobs.get(name)
        if job is None:
            return self._status(404, "NotFound", f'rayjobs.ray.io "{name}" not found')
        if method == "DELETE":
            job["deleting"] = fake.finalizer_gets
            return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        if method == "GET":
            if job["deleting"] is not None:
                if job["deleting"] == 0:
                    del fake.jobs[name]
                    return self._status(404, "NotFound", f'rayjobs.ray.io "{name}" not found')
                job["deleting"] -= 1
            status = job["script"][min(job["step"], len(job["script"]) - 1)]
            job["step"] += 1
            if status.get("jobDeploymentStatus") == "Running" and not any(p["job"] == name for p in fake.pods.values()):
                # K8sJobMode: KubeRay creates the submitter Job (named like the RayJob) once the
                # cluster is ready; its pod carries the Job controller's job-name label.
                fake.pods[f"{name}-{len(fake.pods)}"] = {
                    "job": name,
                    "log": JSON_LOG,
                    "created": "2026-01-01T00:01:00Z",
                }
            return self._send(200, dict(job["obj"], status=status))
        return self._status(405, "MethodNotAllowed", method)

    def _pods(self, ns: str, selector: str):
        wanted = dict(part.split("=", 1) for part in selector.split(",") if part)
        items = []
        for pod_name, pod in self.fake.pods.items():
            labels = {"job-name": pod["job"], "batch.kubernetes.io/job-name": pod["job"]}
            if all(labels.get(k) == v for k, v in wanted.items()):
                items.append(
                    {
                        "metadata": {
                            "name": pod_name,
                            "namespace": ns,
                            "labels": labels,
                            "creationTimestamp": pod["created"],
                        },
                        "spec": {"containers": [{"name": "ray-job-submitter", "image": "kdray:latest"}]},
                        "status": {"phase": "Running"},
                    }
                )
        self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_DELETE(self):
        self._handle("DELETE")
