"""Deploy ``pipeline_flow`` for one spec on a cron schedule, to a local or a Kubernetes work pool.

    python flows/deploy.py --spec examples/fmnist_cnn_to_mlp_hinton.yaml --cron "0 3 * * *" --pool kdray-local
    python flows/deploy.py --spec examples/fmnist_cnn_to_mlp_hinton.yaml --cron "0 3 * * *" --pool kdray-k8s \\
        --image kdray:latest storage.uri=s3://kdray/runs

Deployments live on a Prefect server, so PREFECT_API_URL must point at one (``prefect server start``;
the temporary server of a plain flow run cannot schedule). A missing pool is created: ``kdray-local``
as a process pool, ``kdray-k8s`` from ``k8s/base/prefect-base-job-template.json``. Then start a
worker: ``prefect worker start --pool kdray-local``. Deploying again updates the deployment.

A process-pool run works in this checkout (its flow file and relative paths resolve here); a
Kubernetes run works in ``/opt/kdray``, where the image keeps the same files, and its pod is
sized by ``k8s_job_variables`` from the spec's run settings.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Sequence
from uuid import UUID

from kdray.core.errors import KdrayError
from kdray.engine.spec import PipelineSpec, load_pipeline
from kdray.k8s.render import cpu_quantity

REPO = Path(__file__).resolve().parent.parent
ENTRYPOINT = "flows/pipeline.py:pipeline_flow"
IMAGE_SOURCE = "/opt/kdray"  # where the Dockerfile copies flows/ and examples/
LOCAL_POOL, K8S_POOL = "kdray-local", "kdray-k8s"
K8S_TEMPLATE = REPO / "k8s/base/prefect-base-job-template.json"
DEFAULT_IMAGE, DEFAULT_NAMESPACE = "kdray:latest", "kdray"
DRIVER_CPUS = 1.0  # the flow process itself (and Ray's head, when it trains in the pod)
MEMORY_PER_CPU_GI = 2


def k8s_job_variables(
    spec: PipelineSpec, *, image: str = DEFAULT_IMAGE, namespace: str = DEFAULT_NAMESPACE
) -> dict[str, Any]:
    """Job variables of the ``kdray-k8s`` pool's base job template for one pipeline's flow-run pod.

    With ``launcher: local`` the stages train inside the flow-run pod (embedded Ray), so the pod
    is sized for the largest stage: ``cpus = 1 + workers * cpus_per_worker`` (a ``workers: 0``
    stage runs its loop in the flow process: ``max(1, cpus_per_worker)``), memory
    ``2 GiB * ceil(cpus)``, and with ``use_gpu`` one GPU per worker (``gpu_limit``, the
    ``nvidia.com/gpu`` limit). With ``ray``/``kuberay`` the workers run elsewhere and the pod
    only submits and watches: one CPU. Requests equal limits (Guaranteed QoS: a training pod
    is not the first one evicted). ``env`` holds no secrets; S3 keys come from the pool's Secret.
    """
    cpus, gpus = DRIVER_CPUS, 0
    for stage in spec.stages:
        run = spec.run_for(stage)
        if run.launcher != "local":
            continue
        if run.workers == 0:
            cpus = max(cpus, run.cpus_per_worker)
        else:
            cpus = max(cpus, DRIVER_CPUS + run.workers * run.cpus_per_worker)
        if run.use_gpu:
            gpus = max(gpus, max(run.workers, 1))
    memory = f"{MEMORY_PER_CPU_GI * math.ceil(cpus)}Gi"
    variables: dict[str, Any] = {
        "image": image,
        "namespace": namespace,
        "name": spec.name,
        "labels": {"app.kubernetes.io/name": "kdray", "kdray.io/pipeline": spec.name},
        "cpu_request": cpu_quantity(cpus),
        "cpu_limit": cpu_quantity(cpus),
        "memory_request": memory,
        "memory_limit": memory,
        "env": {"KDRAY_PIPELINE": spec.name},
    }
    if gpus:
        variables["gpu_limit"] = str(gpus)
    return variables


def is_local_path(spec_uri: str) -> bool:
    return "://" not in spec_uri or spec_uri.startswith("file://")


def build_deployment(
    spec_uri: str,
    *,
    cron: str,
    pool: str = LOCAL_POOL,
    pool_type: str = "process",
    name: str | None = None,
    timezone: str = "UTC",
    overrides: Sequence[str] = (),
    image: str = DEFAULT_IMAGE,
    namespace: str = DEFAULT_NAMESPACE,
):
    """A ``RunnerDeployment`` of ``pipeline_flow`` for one spec (nothing is sent to the API).

    The deployment's parameters hold the spec URI (a local path made absolute for a process
    pool) and the overrides; its pull step sets the working directory where the flow file is.
    """
    from prefect.runner.storage import LocalStorage
    from prefect.schedules import Cron

    from flows.pipeline import pipeline_flow

    spec = load_pipeline(spec_uri, list(overrides))
    kubernetes = pool_type == "kubernetes"
    if is_local_path(spec_uri) and not kubernetes:
        spec_uri = str(Path(spec_uri.removeprefix("file://")).resolve())
    try:
        schedule = Cron(cron, timezone=timezone)
        deployment = pipeline_flow.to_deployment(
            name or f"{spec.name}-{'k8s' if kubernetes else 'local'}",
            schedule=schedule,
            parameters={"spec_uri": spec_uri, "overrides": list(overrides)},
            work_pool_name=pool,
            job_variables=k8s_job_variables(spec, image=image, namespace=namespace) if kubernetes else {},
            tags=["kdray", spec.name],
            description=f"kdray pipeline {spec.name!r} from {spec_uri}",
        )
    except ValueError as e:  # pydantic checks the cron string and the timezone
        raise KdrayError(
            f"--cron {cron!r} / --timezone {timezone!r}: {e}",
            hint='Give five cron fields, e.g. "0 3 * * *" (03:00 daily), and an IANA timezone.',
        ) from None
    deployment.entrypoint = ENTRYPOINT  # type: ignore[union-attr]  # to_deployment is sync here
    deployment.storage = LocalStorage(IMAGE_SOURCE if kubernetes else str(REPO))  # type: ignore[union-attr]
    return deployment


def api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise KdrayError(
            "PREFECT_API_URL is not set: deployments need a running Prefect server",
            hint="Start one (prefect server start) and export PREFECT_API_URL=http://127.0.0.1:4200/api.",
        )
    return url


def ensure_work_pool(pool: str) -> str:
    """The work pool's type, creating ``kdray-k8s`` (repo template) or a process pool if missing."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    url = api_url()
    try:
        with get_client(sync_client=True) as client:
            try:
                return client.read_work_pool(pool).type
            except ObjectNotFound:
                pass
            if pool == K8S_POOL:
                template = json.loads(K8S_TEMPLATE.read_text())
                create = WorkPoolCreate(name=pool, type="kubernetes", base_job_template=template)
            else:
                create = WorkPoolCreate(
                    name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template()
                )
            return client.create_work_pool(create).type
    except httpx.TransportError as e:
        raise KdrayError(
            f"cannot reach the Prefect API at {url}: {e}",
            hint="Check that the server is running (prefect server start) and PREFECT_API_URL.",
        ) from None


def deploy(spec_uri: str, *, cron: str, pool: str = LOCAL_POOL, **kwargs: Any) -> UUID:
    """Create or update the deployment of ``spec_uri`` on ``pool`` (created if missing); return its id."""
    pool_type = ensure_work_pool(pool)
    return build_deployment(spec_uri, cron=cron, pool=pool, pool_type=pool_type, **kwargs).apply()


def main(argv: list[str] | None = None) -> UUID:
    parser = argparse.ArgumentParser(description="Deploy pipeline_flow for a spec on a cron schedule.")
    parser.add_argument("--spec", required=True, help="pipeline YAML: a path, file://... or s3://...")
    parser.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * *"')
    parser.add_argument("--pool", default=LOCAL_POOL, help=f"work pool ({LOCAL_POOL} or {K8S_POOL})")
    parser.add_argument("--name", help="deployment name (default: <pipeline>-local or <pipeline>-k8s)")
    parser.add_argument("--timezone", default="UTC")
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="image of Kubernetes flow-run pods")
    parser.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="namespace of Kubernetes flow-run pods")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. storage.uri=s3://kdray/runs")
    args = parser.parse_args(argv)
    pool_type = ensure_work_pool(args.pool)
    deployment = build_deployment(
        args.spec,
        cron=args.cron,
        pool=args.pool,
        pool_type=pool_type,
        name=args.name,
        timezone=args.timezone,
        overrides=args.overrides,
        image=args.image,
        namespace=args.namespace,
    )
    deployment_id = deployment.apply()
    print(
        f"deployment {deployment.flow_name}/{deployment.name} ({deployment_id}) on pool {args.pool!r}, "
        f"cron {args.cron!r} {args.timezone}; run it now: prefect deployment run "
        f"'{deployment.flow_name}/{deployment.name}'"
    )
    return deployment_id


if __name__ == "__main__":
    import sys

    try:
        main()
    except KdrayError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
