"""Kubernetes manifests for kdray, rendered as pure functions (no API calls, no cluster needed).

A stage launched with the ``kuberay`` launcher becomes one KubeRay ``RayJob`` (``ray.io/v1``): KubeRay
starts a Ray cluster for it (a head that does not train, ``num-cpus: 0``, plus one worker pod per Ray
Train worker), runs ``python -m kdray.worker <stage-uri>`` on it through a submitter Kubernetes Job,
and deletes the cluster when the job ends (``shutdownAfterJobFinishes``). ``kdray.kuberay`` creates
and watches these objects; ``k8s/`` holds the long-lived pieces (namespace, RBAC, object store, Prefect,
a ``RayCluster`` for the ``ray`` launcher) with the same pod templates as ``render_raycluster``.

Every pod runs as uid 1000, non-root, with CPU and memory requests and limits, a memory-backed
``/dev/shm`` for Ray's object store, and S3 credentials only as ``secretKeyRef``s to a Secret
(default ``kdray-s3``): no credential value ever appears in a rendered manifest.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import yaml

from kdray.core.errors import KdrayError
from kdray.k8s.validate import MAX_RAYCLUSTER_NAME, MAX_RAYJOB_NAME

__all__ = [
    "JobRequest",
    "rayjob_name",
    "render_rayjob",
    "render_raycluster",
    "to_yaml",
    "RAY_VERSION",
    "WORKER_MODULE",
    "S3_SECRET_KEYS",
]

RAY_VERSION = "2.60.0"  # must match the ray wheel in the image; KubeRay picks features by it
WORKER_MODULE = "kdray.worker"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
GPU_RESOURCE = "nvidia.com/gpu"
UID = 1000  # the non-root user baked into the Dockerfile

LABEL_NAME = "app.kubernetes.io/name"
LABEL_PIPELINE = "kdray.io/pipeline"
LABEL_STAGE = "kdray.io/stage"
LABEL_KEY = "kdray.io/key"
ANNOTATION_KEY = "kdray.io/key"
ANNOTATION_STAGE_URI = "kdray.io/stage-uri"

_KEY_IN_NAME = 12  # hex characters of the stage key kept in a RayJob name (48 bits)
_HEX = re.compile(r"^[0-9a-f]{6,64}$")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
# The entrypoint is parsed by the submitter's bash and run again through a shell by Ray's job
# supervisor; stage URIs are limited to characters no shell interprets, so no quoting is needed.
_SAFE_URI = re.compile(r"^[a-z][a-z0-9+.-]*://[A-Za-z0-9._~/:@%+=,-]+$")
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_UNITS = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _bad(field: str, message: str, hint: str | None = None) -> KdrayError:
    return KdrayError(message, where=f"JobRequest.{field}", hint=hint)


def _slug(text: str) -> str:
    """Lowercase, with every run of characters outside ``[a-z0-9]`` turned into one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _memory_bytes(quantity: str, field: str) -> int:
    match = _QUANTITY.match(quantity) if isinstance(quantity, str) else None
    if not match:
        raise _bad(
            field, f"{quantity!r} is not a Kubernetes memory quantity.", hint="Write it like '4Gi', '512Mi' or '8G'."
        )
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def cpu_quantity(cpus: float) -> str:
    """``1 -> "1"``, ``0.5 -> "500m"`` (Kubernetes CPU quantities)."""
    millis = round(cpus * 1000)
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def _shm_size(memory: str) -> str:
    """Size of the memory-backed ``/dev/shm``: 40% of the pod's memory.

    Ray's object store takes 30% of the container's memory by default and falls back to slow
    ``/tmp`` when ``/dev/shm`` is smaller, so the volume must exceed 30%; tmpfs pages count against
    the memory limit, so it should not be much larger.
    """
    return f"{max(64, int(_memory_bytes(memory, 'memory_per_worker') * 0.4) // 2**20)}Mi"


@dataclass(frozen=True)
class JobRequest:
    """Everything needed to run one kdray stage as a KubeRay RayJob.

    Attributes:
        pipeline, stage: names from the pipeline spec (any text; slugged for Kubernetes names).
        key: the stage key, a lowercase hex hash of the stage spec and its parents.
        stage_uri: where ``kdray.worker`` reads the stage, e.g.
            ``s3://bucket/prefix/<pipeline>/<stage>/<key>/stage.json``.
        image: the kdray image for head, workers and submitter.
        namespace: where the RayJob is created.
        workers: Ray Train workers, one worker pod each.
        use_gpu, gpus_per_worker: ``nvidia.com/gpu`` per worker pod when ``use_gpu``.
        cpus_per_worker, memory_per_worker: requests (= limits) of each worker pod.
        s3_secret: Secret holding ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``.
        s3_endpoint: plain ``KDRAY_S3_ENDPOINT`` for S3-compatible stores (``None``: AWS S3).
        active_deadline_s: KubeRay fails the job (reason ``DeadlineExceeded``) after this long.
        ttl_s: seconds KubeRay keeps the finished RayJob's cluster before deleting it.
        service_account: service account of the Ray pods (its token is not mounted).
    """

    pipeline: str
    stage: str
    key: str
    stage_uri: str
    image: str = "kdray:latest"
    namespace: str = "kdray"
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1
    memory_per_worker: str = "4Gi"
    gpus_per_worker: int = 1
    s3_secret: str = "kdray-s3"
    s3_endpoint: str | None = None
    active_deadline_s: int = 6 * 3600
    ttl_s: int = 24 * 3600
    service_account: str = "kdray-runner"

    def __post_init__(self) -> None:
        for field in ("pipeline", "stage"):
            value = getattr(self, field)
            if not isinstance(value, str) or not _slug(value):
                raise _bad(field, f"{value!r} has no letters or digits, so it cannot name Kubernetes objects.")
        if not isinstance(self.key, str) or not _HEX.match(self.key):
            raise _bad(
                "key",
                f"{self.key!r} is not a stage key (6 to 64 lowercase hex characters).",
                hint="Pass the key kdray computed for the stage, e.g. from its manifest.",
            )
        if not isinstance(self.stage_uri, str) or not _SAFE_URI.match(self.stage_uri):
            raise _bad(
                "stage_uri",
                f"{self.stage_uri!r} is not a URI made of safe characters "
                "(scheme://, then letters, digits and ._~/:@%+=,-).",
                hint="The URI is passed through two shells; percent-encode anything else.",
            )
        if not isinstance(self.image, str) or not self.image or any(c.isspace() for c in self.image):
            raise _bad("image", f"{self.image!r} is not an image reference.")
        if not isinstance(self.namespace, str) or len(self.namespace) > 63 or not _DNS1123_LABEL.match(self.namespace):
            raise _bad("namespace", f"{self.namespace!r} is not a Kubernetes namespace name (DNS-1123 label).")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise _bad(
                "workers",
                f"is {self.workers!r}; a RayJob needs at least 1 worker.",
                hint="Set run.workers to 1 or more in the pipeline spec.",
            )
        if (
            isinstance(self.cpus_per_worker, bool)
            or not isinstance(self.cpus_per_worker, (int, float))
            or self.cpus_per_worker < 0.001
        ):
            raise _bad("cpus_per_worker", f"is {self.cpus_per_worker!r}; it must be a positive number of CPUs.")
        if _memory_bytes(self.memory_per_worker, "memory_per_worker") < 512 * 2**20:
            raise _bad(
                "memory_per_worker", f"{self.memory_per_worker!r} is below 512Mi; a Ray worker does not start in less."
            )
        if (
            isinstance(self.gpus_per_worker, bool)
            or not isinstance(self.gpus_per_worker, int)
            or self.gpus_per_worker < 1
        ):
            raise _bad("gpus_per_worker", f"is {self.gpus_per_worker!r}; it must be a whole number >= 1.")
        for field in ("s3_secret", "service_account"):
            value = getattr(self, field)
            if not isinstance(value, str) or len(value) > 253 or not _DNS1123_SUBDOMAIN.match(value):
                raise _bad(field, f"{value!r} is not a Kubernetes object name (DNS-1123 subdomain).")
        if self.s3_endpoint is not None and not re.match(r"^https?://[^\s/]+(/\S*)?$", str(self.s3_endpoint)):
            raise _bad(
                "s3_endpoint",
                f"{self.s3_endpoint!r} is not an http(s):// URL.",
                hint="Example: http://seaweedfs.kdray.svc.cluster.local:8333",
            )
        if (
            isinstance(self.active_deadline_s, bool)
            or not isinstance(self.active_deadline_s, int)
            or not 0 < self.active_deadline_s < 2**31
        ):
            raise _bad("active_deadline_s", f"is {self.active_deadline_s!r}; it must be a positive number of seconds.")
        if isinstance(self.ttl_s, bool) or not isinstance(self.ttl_s, int) or not 0 <= self.ttl_s < 2**31:
            raise _bad("ttl_s", f"is {self.ttl_s!r}; it must be 0 or more seconds.")

    @property
    def name(self) -> str:
        """The RayJob name, see ``rayjob_name``."""
        return rayjob_name(self.pipeline, self.stage, self.key)


def rayjob_name(pipeline: str, stage: str, key: str) -> str:
    """Deterministic RayJob name ``<pipeline>-<stage>-<key[:12]>``, a DNS-1035 label of <= 47 characters.

    The name always ends with the first 12 hex characters of the key, so runs of different specs get
    different objects. When pipeline and stage are too long, their slug is cut and a 6-character hash of
    the full ``(pipeline, stage)`` is inserted, so two long names sharing a prefix still differ.
    A leading digit gets a ``kd-`` prefix (DNS-1035 labels start with a letter).
    """
    if not _HEX.match(key or ""):
        raise KdrayError(f"{key!r} is not a stage key (6 to 64 lowercase hex characters).", where="rayjob_name key")
    base, short = f"{_slug(pipeline)}-{_slug(stage)}".strip("-"), key[:_KEY_IN_NAME]
    if not base:
        raise KdrayError(f"pipeline {pipeline!r} and stage {stage!r} have no letters or digits.", where="rayjob_name")
    if not base[0].isalpha():
        base = f"kd-{base}"
    name = f"{base}-{short}"
    if len(name) > MAX_RAYJOB_NAME:
        digest = hashlib.sha256(f"{pipeline}\0{stage}".encode()).hexdigest()[:6]
        room = MAX_RAYJOB_NAME - len(short) - len(digest) - 2
        name = f"{base[:room].rstrip('-')}-{digest}-{short}"
    return name


def _label_value(text: str) -> str:
    return _slug(text)[:63].rstrip("-")


def _pod_security() -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _ray_env(s3_secret: str, s3_endpoint: str | None) -> list[dict]:
    """Environment of every Ray container: Ray settings, the S3 endpoint, credentials by reference."""
    env: list[dict[str, Any]] = [{"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}]
    if s3_endpoint:
        env.append({"name": "KDRAY_S3_ENDPOINT", "value": s3_endpoint})
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": s3_secret, "key": k}}} for k in S3_SECRET_KEYS]
    return env


def _resources(cpus: float, memory: str, gpus: int = 0) -> dict:
    # Requests equal limits: Ray sizes itself from the limits, and a worker that is throttled or
    # evicted below them stalls every DDP rank.
    amount = {"cpu": cpu_quantity(cpus), "memory": memory}
    limits = dict(amount, **({GPU_RESOURCE: gpus} if gpus else {}))
    return {"requests": amount, "limits": limits}


def _ray_pod(
    *,
    container: str,
    image: str,
    env: list[dict],
    resources: dict,
    memory: str,
    labels: dict,
    service_account: str,
    ports: list[dict] | None = None,
    gpu: bool = False,
) -> dict:
    spec = {
        "serviceAccountName": service_account,
        "automountServiceAccountToken": False,  # Ray pods never call the Kubernetes API
        "securityContext": _pod_security(),
        "containers": [
            {
                "name": container,
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                **({"ports": ports} if ports else {}),
                "env": env,
                "resources": resources,
                "securityContext": _container_security(),
                # Lets Ray drain the node before the kubelet kills it.
                "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
                "volumeMounts": [{"name": "shared-mem", "mountPath": "/dev/shm"}],
            }
        ],
        "volumes": [{"name": "shared-mem", "emptyDir": {"medium": "Memory", "sizeLimit": _shm_size(memory)}}],
    }
    if gpu:
        spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": dict(labels)}, "spec": spec}


def _cluster_spec(req: JobRequest, *, labels: dict, head_cpus: float, head_memory: str) -> dict:
    """The RayCluster spec of a request: a head that schedules nothing and ``req.workers`` workers."""
    env = _ray_env(req.s3_secret, req.s3_endpoint)
    head_ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": False,
        "headGroupSpec": {
            # The head schedules no tasks: training happens on workers only, so a worker pod's
            # resources are exactly what one Ray Train worker gets.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _ray_pod(
                container="ray-head",
                image=req.image,
                env=env,
                resources=_resources(head_cpus, head_memory),
                memory=head_memory,
                labels=labels,
                service_account=req.service_account,
                ports=head_ports,
            ),
        },
        "workerGroupSpecs": [
            {
                "groupName": "workers",
                "replicas": req.workers,
                "minReplicas": req.workers,
                "maxReplicas": req.workers,
                "rayStartParams": {},
                "template": _ray_pod(
                    container="ray-worker",
                    image=req.image,
                    env=env,
                    resources=_resources(
                        req.cpus_per_worker, req.memory_per_worker, req.gpus_per_worker if req.use_gpu else 0
                    ),
                    memory=req.memory_per_worker,
                    labels=labels,
                    service_account=req.service_account,
                    gpu=req.use_gpu,
                ),
            }
        ],
    }


def _submitter_pod(image: str, labels: dict, service_account: str) -> dict:
    # KubeRay fills in the command (`ray job submit ... -- <entrypoint>`) because none is given here.
    return {
        "metadata": {"labels": dict(labels)},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": service_account,
            "automountServiceAccountToken": False,
            "securityContext": _pod_security(),
            "containers": [
                {
                    "name": "ray-job-submitter",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "resources": {
                        "requests": {"cpu": "250m", "memory": "256Mi"},
                        "limits": {"cpu": "1", "memory": "1Gi"},
                    },
                    "securityContext": _container_security(),
                }
            ],
        },
    }


def render_rayjob(req: JobRequest) -> dict:
    """Render the ``ray.io/v1`` RayJob that runs ``python -m kdray.worker <stage_uri>`` for one stage.

    The job gets its own cluster (head + ``req.workers`` worker pods), submitted in ``K8sJobMode``
    (a submitter Kubernetes Job named like the RayJob, whose pod log is the job's log), deleted
    ``ttl_s`` after the job ends, failed by KubeRay after ``active_deadline_s``. ``backoffLimit`` is 0:
    retries belong to the Prefect task, which resubmits the same name and resumes from the stage's
    last checkpoint. Same request, same dict (no timestamps, no random parts).
    """
    labels = {
        LABEL_NAME: "kdray",
        LABEL_PIPELINE: _label_value(req.pipeline),
        LABEL_STAGE: _label_value(req.stage),
        LABEL_KEY: req.key[:16],
    }
    cluster = _cluster_spec(req, labels=labels, head_cpus=1, head_memory="4Gi")
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": req.name,
            "namespace": req.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_KEY: req.key, ANNOTATION_STAGE_URI: req.stage_uri},
        },
        "spec": {
            "entrypoint": f"python -m {WORKER_MODULE} {req.stage_uri}",
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": req.ttl_s,
            "activeDeadlineSeconds": req.active_deadline_s,
            "backoffLimit": 0,
            "rayClusterSpec": cluster,
            "submitterPodTemplate": _submitter_pod(req.image, labels, req.service_account),
        },
    }


def render_raycluster(
    name: str,
    *,
    image: str = "kdray:latest",
    namespace: str = "kdray",
    workers: int = 2,
    use_gpu: bool = False,
    cpus_per_worker: float = 1,
    memory_per_worker: str = "4Gi",
    gpus_per_worker: int = 1,
    s3_secret: str = "kdray-s3",
    s3_endpoint: str | None = "http://seaweedfs.kdray.svc.cluster.local:8333",
    service_account: str = "kdray-runner",
    head_cpus: float = 1,
    head_memory: str = "4Gi",
) -> dict:
    """Render a long-lived ``ray.io/v1`` RayCluster for the ``ray`` launcher (Job Submission API).

    Same pod templates as ``render_rayjob``; the dashboard (job submission endpoint) is reachable in
    the cluster at ``http://<name>-head-svc.<namespace>.svc:8265``. ``k8s/base/raycluster.yaml`` is
    this function's output for ``render_raycluster("kdray")``, which ``tests/k8s/test_k8s.py`` checks.
    """
    if not isinstance(name, str) or len(name) > MAX_RAYCLUSTER_NAME or not _DNS1035.match(name):
        raise KdrayError(
            f"{name!r} is not a RayCluster name (a DNS-1035 label of at most {MAX_RAYCLUSTER_NAME} characters).",
            where="render_raycluster name",
        )
    # Reuse JobRequest's checks for the shared fields; the dummy key/URI never reach the output.
    req = JobRequest(
        pipeline=name,
        stage="cluster",
        key="0" * 12,
        stage_uri="s3://unused/stage.json",
        image=image,
        namespace=namespace,
        workers=workers,
        use_gpu=use_gpu,
        cpus_per_worker=cpus_per_worker,
        memory_per_worker=memory_per_worker,
        gpus_per_worker=gpus_per_worker,
        s3_secret=s3_secret,
        s3_endpoint=s3_endpoint,
        service_account=service_account,
    )
    _memory_bytes(head_memory, "head_memory")
    labels = {LABEL_NAME: "kdray", "app.kubernetes.io/component": "ray-cluster"}
    spec = _cluster_spec(req, labels=labels, head_cpus=head_cpus, head_memory=head_memory)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": name, "namespace": req.namespace, "labels": labels},
        "spec": spec,
    }


class _Dumper(yaml.SafeDumper):
    """Safe dumper that never emits anchors/aliases (kubectl and humans both dislike them)."""

    def ignore_aliases(self, data) -> bool:
        return True


def to_yaml(*docs: dict) -> str:
    """Serialise manifests as one multi-document YAML string, keys in insertion order."""
    return yaml.dump_all(list(docs), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
