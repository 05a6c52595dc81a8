"""Kubernetes side of kdray, checked offline: kustomize builds, schemas, security, rendering, Dockerfile.

No API server or container engine can run here, so every check is static: ``kubectl kustomize``
(works offline) renders the base and the overlays, core objects are validated with
``kubernetes_validate`` (strict, Kubernetes 1.35 schemas), KubeRay objects with the vendored CRD
schemas plus KubeRay's reconcile-time rules (``kdray.kubevalidate``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from kdray.core.errors import KdrayError
from kdray.k8s.render import JobRequest, rayjob_name, render_raycluster, render_rayjob, to_yaml
from kdray.k8s.validate import kuberay_schema, validate_kuberay

ROOT = REPO
K8S = ROOT / "k8s"
OVERLAYS = ("base", "overlays/cpu", "overlays/gpu")
K8S_VERSION = "1.35.0"
SHARED_CRDS = ROOT.parent / "shared" / "schemas" / "kuberay"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
SECRETISH = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)


def kustomize(path: Path) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    return {name: kustomize(K8S / name) for name in OVERLAYS}


def request(**kw) -> JobRequest:
    base = dict(
        pipeline="fmnist-cnn-to-mlp",
        stage="student",
        key="3f2a9c0b7d1e4f6a8b9c",
        stage_uri="s3://kdray/runs/fmnist-cnn-to-mlp/student/3f2a9c0b7d1e4f6a8b9c/stage.json",
        s3_endpoint="http://seaweedfs.kdray.svc.cluster.local:8333",
    )
    base.update(kw)
    return JobRequest(**base)


# ---- walking manifests --------------------------------------------------------------------------
def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """Every pod spec inside a manifest, with a readable location."""
    kind, spec = doc["kind"], doc.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [(f"{kind}/{doc['metadata']['name']}", spec["template"]["spec"])]
    cluster = spec.get("rayClusterSpec") if kind == "RayJob" else spec if kind == "RayCluster" else None
    out = []
    if cluster:
        out.append((f"{kind}/{doc['metadata']['name']}/head", cluster["headGroupSpec"]["template"]["spec"]))
        for g in cluster.get("workerGroupSpecs", []):
            out.append((f"{kind}/{doc['metadata']['name']}/{g['groupName']}", g["template"]["spec"]))
    if kind == "RayJob" and spec.get("submitterPodTemplate"):
        out.append((f"RayJob/{doc['metadata']['name']}/submitter", spec["submitterPodTemplate"]["spec"]))
    return out


def worker_groups(doc: dict) -> list[dict]:
    cluster = doc["spec"].get("rayClusterSpec") if doc["kind"] == "RayJob" else doc["spec"]
    return cluster["workerGroupSpecs"]


def env_entries(doc: dict):
    for where, spec in pod_specs(doc):
        for c in spec.get("initContainers", []) + spec["containers"]:
            for e in c.get("env", []):
                yield f"{where}/{c['name']}", e


def assert_pod_hardened(where: str, spec: dict) -> None:
    """Pod Security 'restricted' essentials, plus requests and limits on every container."""
    psc = spec.get("securityContext") or {}
    assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: no RuntimeDefault seccomp"
    for c in spec.get("initContainers", []) + spec["containers"]:
        csc = c.get("securityContext") or {}
        non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        uid = csc.get("runAsUser", psc.get("runAsUser"))
        assert non_root is True, f"{where}/{c['name']}: runAsNonRoot is {non_root!r}"
        assert isinstance(uid, int) and uid != 0, f"{where}/{c['name']}: runAsUser is {uid!r}"
        assert csc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}: privilege escalation allowed"
        assert csc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{c['name']}: capabilities not dropped"
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                assert r in (res.get(part) or {}), f"{where}/{c['name']}: no {part}.{r}"
    for v in spec.get("volumes", []):
        assert "hostPath" not in v, f"{where}: hostPath volume {v['name']}"


# ---- kustomize + schemas ------------------------------------------------------------------------
@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates(rendered, overlay):
    import kubernetes_validate

    docs = rendered[overlay]
    kinds = sorted({d["kind"] for d in docs})
    assert {
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "ConfigMap",
        "RayCluster",
        "RayJob",
    } <= set(kinds), kinds
    for doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            validate_kuberay(doc)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "kdray", f"{doc['kind']}/{doc['metadata']['name']}"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "kdray"


def test_kustomizations_use_labels_not_common_labels():
    files = sorted(K8S.rglob("kustomization.yaml"))
    assert len(files) == 3
    for f in files:
        assert "commonLabels" not in yaml.safe_load(f.read_text()), f


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_non_root_with_requests_and_limits(rendered, overlay):
    specs = [ps for doc in rendered[overlay] for ps in pod_specs(doc)]
    # seaweedfs, prefect server + worker, RayCluster head + workers, RayJob head + workers + submitter
    assert len(specs) == 8, [w for w, _ in specs]
    for where, spec in specs:
        assert_pod_hardened(where, spec)
    ray_pods = [(w, s) for w, s in specs if w.startswith(("RayCluster", "RayJob")) and "submitter" not in w]
    for where, spec in ray_pods:
        shm = [v for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert shm and mounts.get("/dev/shm") == shm[0]["name"], f"{where}: no memory-backed /dev/shm"
        assert spec["automountServiceAccountToken"] is False, where


@needs_kubectl
def test_namespace_enforces_restricted_pod_security(rendered):
    (ns,) = [d for d in rendered["overlays/cpu"] if d["kind"] == "Namespace"]
    assert ns["metadata"]["name"] == "kdray"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_values_anywhere(rendered, overlay):
    docs = rendered[overlay]
    assert not [d for d in docs if d["kind"] == "Secret"], "a Secret would put credentials in git"
    refs = set()
    for doc in docs:
        for where, env in env_entries(doc):
            if SECRETISH.search(env["name"]):
                assert "value" not in env, f"{where}: {env['name']} has a literal value"
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] == env["name"], f"{where}: {env['name']} reads key {ref['key']}"
                refs.add((ref["name"], ref["key"]))
    assert refs == {("kdray-s3", "AWS_ACCESS_KEY_ID"), ("kdray-s3", "AWS_SECRET_ACCESS_KEY")}


def test_secret_template_has_no_values_and_is_not_deployed():
    import kubernetes_validate

    example = yaml.safe_load((K8S / "base" / "secret.example.yaml").read_text())
    kubernetes_validate.validate(example, K8S_VERSION, strict=True)
    assert example["metadata"]["name"] == "kdray-s3"
    assert example["stringData"] == {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    assert "data" not in example
    resources = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"]
    assert "secret.example.yaml" not in resources


@needs_kubectl
def test_rbac_is_least_privilege(rendered):
    docs = rendered["overlays/cpu"]
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    runner = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in roles["kdray-runner"]["rules"]}
    assert runner == {
        (("ray.io",), ("rayjobs",)): {"create", "get", "list", "watch", "delete"},
        (("ray.io",), ("rayjobs/status",)): {"get"},
        (("",), ("pods",)): {"get", "list"},
        (("",), ("pods/log",)): {"get"},
    }
    for role in roles.values():
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], role["metadata"]["name"]
    bindings = {d["metadata"]["name"]: d for d in docs if d["kind"] == "RoleBinding"}
    for name in ("kdray-runner", "prefect-worker"):
        assert bindings[name]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
        assert bindings[name]["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": "kdray"}]
    worker = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "prefect-worker")
    assert worker["spec"]["template"]["spec"]["serviceAccountName"] == "prefect-worker"


@needs_kubectl
def test_gpu_overlay_adds_gpus_tolerations_and_node_selector_to_workers_only(rendered):
    for overlay, gpu in (("overlays/cpu", False), ("overlays/gpu", True)):
        ray_docs = [d for d in rendered[overlay] if d["kind"] in ("RayCluster", "RayJob")]
        assert len(ray_docs) == 2
        for doc in ray_docs:
            (group,) = worker_groups(doc)
            spec = group["template"]["spec"]
            limits = spec["containers"][0]["resources"]["limits"]
            if gpu:
                assert limits["nvidia.com/gpu"] == 1, doc["metadata"]["name"]
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
                assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            else:
                assert "nvidia.com/gpu" not in limits and "tolerations" not in spec and "nodeSelector" not in spec
            head = (doc["spec"].get("rayClusterSpec") or doc["spec"])["headGroupSpec"]["template"]["spec"]
            assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]


@needs_kubectl
def test_images_are_set_by_kustomize_everywhere(rendered, tmp_path):
    """`images:` reaches every container, including those nested in RayJob/RayCluster templates."""
    images = {
        c["image"]
        for doc in rendered["overlays/cpu"]
        for _, s in pod_specs(doc)
        for c in s.get("initContainers", []) + s["containers"]
    }
    assert images == {"kdray:latest"}  # SeaweedFS runs `weed` from the kdray image too
    overlay = tmp_path / "mine"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(K8S / "overlays" / "gpu", overlay)],
                "images": [{"name": "kdray", "newName": "registry.example.invalid/ml/kdray", "newTag": "v9"}],
            }
        )
    )
    docs = kustomize(overlay)
    kdray_images = [
        c["image"] for doc in docs for _, s in pod_specs(doc) for c in s.get("initContainers", []) + s["containers"]
    ]
    # every container: the RayCluster/RayJob/Prefect ones and SeaweedFS's two (its init container too)
    assert len(kdray_images) == 10 and set(kdray_images) == {"registry.example.invalid/ml/kdray:v9"}


@needs_kubectl
def test_prefect_worker_uses_the_generated_pool_config(rendered):
    docs = rendered["overlays/cpu"]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    worker = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "prefect-worker")
    spec = worker["spec"]["template"]["spec"]
    assert spec["volumes"] == [{"name": "pool", "configMap": {"name": cm["metadata"]["name"]}}]
    assert spec["containers"][0]["command"] == [
        "prefect",
        "worker",
        "start",
        "--pool",
        "kdray-k8s",
        "--type",
        "kubernetes",
    ]
    assert json.loads(cm["data"]["base-job-template.json"]) == json.loads(
        (K8S / "base" / "prefect-base-job-template.json").read_text()
    )


def test_prefect_base_job_template_renders_a_valid_hardened_job():
    """Fill the pool's template with its defaults the way Prefect does and validate the Job."""
    import kubernetes_validate
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    template = json.loads((K8S / "base" / "prefect-base-job-template.json").read_text())
    config = template["job_configuration"]
    placeholders = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(config)))
    assert placeholders <= set(template["variables"]["properties"]), placeholders
    values = BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    values["name"] = "fmnist-flow"
    job = apply_values(config["job_manifest"], values)
    job["spec"]["template"]["spec"]["containers"][0]["args"] = ["prefect", "flow-run", "execute"]  # worker's job
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    assert job["metadata"]["namespace"] == "kdray" and pod["serviceAccountName"] == "kdray-runner"
    assert pod["containers"][0]["image"] == "kdray:latest"
    assert_pod_hardened("flow-run Job", pod)
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["KDRAY_S3_ENDPOINT"]["value"] == "http://seaweedfs.kdray.svc.cluster.local:8333"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "kdray-s3", "key": key}}}


def test_base_ray_manifests_match_the_python_renderer():
    """k8s/ and kdray.k8s share pod templates: a drift between them fails here."""
    cluster = yaml.safe_load((K8S / "base" / "raycluster.yaml").read_text())
    expected = render_raycluster("kdray")
    del expected["metadata"]["namespace"]
    assert cluster == expected
    smoke = yaml.safe_load((K8S / "base" / "rayjob-smoke.yaml").read_text())
    assert smoke["spec"]["rayClusterSpec"] == render_raycluster("kdray", workers=1)["spec"]
    assert smoke["spec"]["suspend"] is True and smoke["spec"]["shutdownAfterJobFinishes"] is True
    validate_kuberay(smoke)


def test_vendored_schemas_equal_the_kuberay_crds():
    spec_fields = kuberay_schema("RayJob")["properties"]["spec"]["properties"]
    assert spec_fields["shutdownAfterJobFinishes"] == {"type": "boolean"}
    for kind, crd_file in (("RayJob", "ray.io_rayjobs.yaml"), ("RayCluster", "ray.io_rayclusters.yaml")):
        text = (ROOT / "kdray" / "k8s" / "schemas" / f"{kind.lower()}.v1.json").read_text()
        assert "\n  " not in text, "keep the vendored schema compact (no indentation)"
        if not (SHARED_CRDS / crd_file).exists():
            continue
        # libyaml when available: the two CRDs are 2.3 MB of YAML.
        crd = yaml.load((SHARED_CRDS / crd_file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        assert kuberay_schema(kind) == version["schema"]["openAPIV3Schema"], kind


# ---- validate_kuberay catches what the API server would silently drop or the operator reject -----
@pytest.mark.parametrize(
    "mutate, path, words",
    [
        (lambda d: d["spec"].update(shutdownAfterJobFinish=True), "at spec:", "shutdownAfterJobFinish"),
        (
            lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
                imagePullPolcy="Always"
            ),
            "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0]",
            "imagePullPolcy",
        ),
        (
            lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="two"),
            "spec.rayClusterSpec.workerGroupSpecs[0].replicas",
            "not of type 'integer'",
        ),
        (
            lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"),
            "spec.rayClusterSpec.workerGroupSpecs[0]",
            "'groupName' is a required property",
        ),
        (lambda d: d["metadata"].update(name="x" * 48), "metadata.name", "at most 47"),
        (lambda d: d["metadata"].update(name="1-starts-with-digit"), "metadata.name", "DNS-1035"),
        (
            lambda d: d["spec"].update(suspend=True, shutdownAfterJobFinishes=False),
            "spec.suspend",
            "shutdownAfterJobFinishes",
        ),
        (lambda d: d["spec"].pop("rayClusterSpec"), "at spec:", "neither rayClusterSpec nor clusterSelector"),
        (lambda d: d["spec"].update(activeDeadlineSeconds=0), "spec.activeDeadlineSeconds", "positive"),
        (
            lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=3, maxReplicas=2),
            "spec.rayClusterSpec.workerGroupSpecs[0]",
            "minReplicas (3) is greater than maxReplicas (2)",
        ),
        (lambda d: d["spec"].update(runtimeEnvYAML="pip: [unclosed"), "spec.runtimeEnvYAML", "does not parse"),
        (
            lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"].update(resources={"CPU": "1"}),
            "spec.rayClusterSpec.headGroupSpec",
            "both in rayStartParams and in resources",
        ),
    ],
)
def test_validate_kuberay_names_the_path_of_each_problem(mutate, path, words):
    doc = render_rayjob(request())
    validate_kuberay(doc)
    mutate(doc)
    with pytest.raises(KdrayError) as info:
        validate_kuberay(doc)
    message = str(info.value)
    assert path in message and words in message, message


def test_validate_kuberay_rejects_other_kinds_and_checks_rayclusters():
    with pytest.raises(KdrayError, match="expected apiVersion ray.io/v1"):
        validate_kuberay({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}})
    cluster = render_raycluster("kdray")
    validate_kuberay(cluster)
    cluster["spec"]["workerGroupSpecs"][0]["minReplicas"] = 5
    with pytest.raises(KdrayError, match=r"RayCluster 'kdray' at spec.workerGroupSpecs\[0\]: minReplicas \(5\)"):
        validate_kuberay(cluster)
    with pytest.raises(KdrayError, match="at most 53"):
        render_raycluster("c" * 54)


# ---- render_rayjob -------------------------------------------------------------------------------
def test_render_rayjob_validates_and_runs_the_worker_module():
    req = request(workers=3)
    doc = render_rayjob(req)
    validate_kuberay(doc)
    spec = doc["spec"]
    assert shlex.split(spec["entrypoint"]) == ["python", "-m", "kdray.worker", req.stage_uri]
    assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 24 * 3600 and spec["activeDeadlineSeconds"] == 6 * 3600
    assert spec["backoffLimit"] == 0
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head does not train
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    assert doc["metadata"]["labels"] == {
        "app.kubernetes.io/name": "kdray",
        "kdray.io/pipeline": "fmnist-cnn-to-mlp",
        "kdray.io/stage": "student",
        "kdray.io/key": "3f2a9c0b7d1e4f6a",
    }
    assert doc["metadata"]["annotations"]["kdray.io/key"] == req.key
    for where, pod in pod_specs(doc):
        assert_pod_hardened(where, pod)
        assert pod["containers"][0]["image"] == "kdray:latest"
    worker = group["template"]["spec"]
    assert worker["containers"][0]["resources"] == {
        "requests": {"cpu": "1", "memory": "4Gi"},
        "limits": {"cpu": "1", "memory": "4Gi"},
    }
    # /dev/shm is 40% of the pod memory: more than Ray's 30% object store, so it stays in shared memory.
    assert worker["volumes"] == [{"name": "shared-mem", "emptyDir": {"medium": "Memory", "sizeLimit": "1638Mi"}}]


def test_render_rayjob_gpu_cpu_and_memory_come_from_the_request():
    doc = render_rayjob(request(use_gpu=True, gpus_per_worker=2, cpus_per_worker=0.5, memory_per_worker="10Gi"))
    validate_kuberay(doc)
    worker = worker_groups(doc)[0]["template"]["spec"]
    assert worker["containers"][0]["resources"] == {
        "requests": {"cpu": "500m", "memory": "10Gi"},
        "limits": {"cpu": "500m", "memory": "10Gi", "nvidia.com/gpu": 2},
    }
    assert worker["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert worker["volumes"][0]["emptyDir"]["sizeLimit"] == "4096Mi"
    head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"] and "tolerations" not in head
    assert "tolerations" not in worker_groups(render_rayjob(request()))[0]["template"]["spec"]


def test_render_rayjob_is_deterministic():
    assert render_rayjob(request()) == render_rayjob(request())
    assert to_yaml(render_rayjob(request())) == to_yaml(render_rayjob(request()))
    assert yaml.safe_load(to_yaml(render_rayjob(request()))) == render_rayjob(request())
    assert "&id" not in to_yaml(render_rayjob(request()))  # no YAML anchors for shared env lists


def test_render_rayjob_references_credentials_and_never_holds_them():
    doc = render_rayjob(request())
    text = to_yaml(doc)
    env = list(env_entries(doc))
    assert len(env) == 2 * 4  # head and worker: usage stats, endpoint, two secret refs (submitter: none)
    for where, e in env:
        if e["name"] in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert e == {"name": e["name"], "valueFrom": {"secretKeyRef": {"name": "kdray-s3", "key": e["name"]}}}
        else:
            assert not SECRETISH.search(e["name"]), where
    assert "KDRAY_S3_ENDPOINT" in text
    no_endpoint = render_rayjob(request(s3_endpoint=None))
    assert "KDRAY_S3_ENDPOINT" not in to_yaml(no_endpoint)


def test_rayjob_names_are_short_distinct_and_valid():
    name = rayjob_name("fmnist-cnn-to-mlp", "student", "3f2a9c0b7d1e4f6a8b9c")
    assert name == "fmnist-cnn-to-mlp-student-3f2a9c0b7d1e"
    long_p, long_s = "p" * 200, "Stage_Name With Spaces " * 10
    names = {
        rayjob_name(long_p, long_s, "aaaaaaaaaaaa0001"),
        rayjob_name(long_p, long_s, "aaaaaaaaaaab0001"),
        rayjob_name(long_p, long_s + "x", "aaaaaaaaaaaa0001"),  # same cut prefix, different stage
        rayjob_name("9lives", "Teacher", "abcdef"),
    }
    assert len(names) == 4
    for n in names:
        assert len(n) <= 47 and DNS1035.match(n), n
    assert rayjob_name(long_p, long_s, "aaaaaaaaaaab0001").endswith("-aaaaaaaaaaab")
    assert rayjob_name("9lives", "Teacher", "abcdef") == "kd-9lives-teacher-abcdef"
    doc = render_rayjob(request(pipeline=long_p, stage=long_s))
    validate_kuberay(doc)
    assert all(len(v) <= 63 for v in doc["metadata"]["labels"].values())


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("workers", 0, "JobRequest.workers: is 0; a RayJob needs at least 1 worker"),
        ("workers", True, "JobRequest.workers"),
        ("key", "XYZ", "JobRequest.key: 'XYZ' is not a stage key"),
        ("stage", "__", "JobRequest.stage: '__' has no letters or digits"),
        ("stage_uri", "s3://b/p/stage.json; rm -rf /", "JobRequest.stage_uri"),
        ("stage_uri", "s3://b/$(whoami)/stage.json", "JobRequest.stage_uri"),
        ("memory_per_worker", "4GB", "JobRequest.memory_per_worker: '4GB' is not a Kubernetes memory quantity"),
        ("memory_per_worker", "100Mi", "below 512Mi"),
        ("cpus_per_worker", 0, "JobRequest.cpus_per_worker"),
        ("gpus_per_worker", 0, "JobRequest.gpus_per_worker"),
        ("namespace", "Kd_Ray", "JobRequest.namespace"),
        ("s3_endpoint", "seaweedfs:8333", "http(s):// URL"),
        ("active_deadline_s", 0, "JobRequest.active_deadline_s"),
        ("ttl_s", -1, "JobRequest.ttl_s"),
        ("s3_secret", "Bad Secret", "JobRequest.s3_secret"),
    ],
)
def test_job_request_rejects_bad_input_naming_the_field(field, value, words):
    with pytest.raises(KdrayError) as info:
        request(**{field: value})
    assert words in str(info.value)


# ---- Dockerfile, checked without a container engine ----------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def test_dockerfile_is_pinned_non_root_and_installs_with_constraints():
    inst = dockerfile_instructions()
    args = dict(a.split("=", 1) for op, a in inst if op == "ARG" and "=" in a)
    assert args["BASE_IMAGE"] == "python:3.11-slim-bookworm"
    froms = [a for op, a in inst if op == "FROM"]
    assert len(froms) >= 2 and all(f.startswith("${BASE_IMAGE}") for f in froms)  # multi-stage, one base
    last_from = max(i for i, (op, _) in enumerate(inst) if op == "FROM")
    users = [a for op, a in inst[last_from:] if op == "USER"]
    assert users and users[-1].split(":")[0] == "1000", users
    runs = " ".join(a for op, a in inst if op == "RUN")
    assert re.search(r"pip install -c constraints\.txt \"?\.", runs), "kdray must install with constraints.txt"
    assert "torch==${TORCH_VERSION}" in runs and args["TORCH_VERSION"] == "2.13.0"
    assert "dataset-fashion-mnist" in runs and "useradd --uid 1000" in runs
    assert not [a for op, a in inst if op == "ENTRYPOINT"]
    assert [a for op, a in inst if op == "CMD"] == ['["kdray", "--help"]']


def test_dockerfile_and_manifests_hold_no_secrets_or_registry_hosts():
    inst = dockerfile_instructions()
    for op, a in inst:
        if op in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", a) or [a.split()[0]]
            assert not [n for n in names if SECRETISH.search(n)], a
    files = [
        ROOT / "Dockerfile",
        ROOT / ".dockerignore",
        ROOT / "docs" / "kubernetes.md",
        *K8S.rglob("*.yaml"),
        *K8S.rglob("*.json"),
    ]
    host = re.compile(
        r"https?://(?!(localhost|127\.0\.0\.1|[a-z0-9-]+\.kdray\.svc(\.cluster\.local)?)[:/])|"
        r"\b(docker\.io|quay\.io|ghcr\.io|gcr\.io|pypi\.org|download\.pytorch\.org)\b"
    )
    for f in files:
        text = f.read_text()
        assert not host.search(text), f"{f.relative_to(ROOT)}: {host.search(text).group(0)}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".env", "runs"} <= set(ignored)
