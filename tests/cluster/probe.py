"""What tests/cluster/run.sh asks a container: Ray's view of the cluster and the S3 bucket's content.

Runs inside a container of the compose stack, passed as text (the image holds no tests):

    podman exec -i CONTAINER python -c "$(cat tests/cluster/probe.py)" COMMAND [ARGS]

It uses only Ray's public APIs (job submission, state) and boto3, never kdray, so that it reads
what kdray wrote as an independent client would. Prints JSON (or the object's bytes for s3-get).

    ray-nodes                 alive Ray nodes: id, IP, CPUs, head or not
    ray-jobs PREFIX           Ray jobs whose submission id starts with PREFIX: id, status
    ray-placement PREFIX      the nodes (id, IP) of the Ray Train workers of those jobs
    s3-ready                  exit 0 once the bucket answers a signed request
    s3-ls PREFIX              keys under PREFIX in the bucket
    s3-get KEY                the object's bytes on standard output
    s3-put KEY                standard input stored as KEY
"""

from __future__ import annotations

import json
import os
import sys

BUCKET = os.environ.get("KDRAY_BUCKET", "kdray")
DASHBOARD = os.environ.get("KDRAY_PROBE_DASHBOARD", "http://ray-head:8265")


def s3():
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=os.environ["KDRAY_S3_ENDPOINT"],
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        config=Config(connect_timeout=5, read_timeout=20, retries={"max_attempts": 2}, s3={"addressing_style": "path"}),
    )


def s3_keys(prefix: str) -> list[str]:
    keys: list[str] = []
    for page in s3().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def jobs(prefix: str) -> list:
    from ray.job_submission import JobSubmissionClient

    return [j for j in JobSubmissionClient(DASHBOARD).list_jobs() if (j.submission_id or "").startswith(prefix)]


def nodes(alive_only: bool = True) -> list[dict]:
    from ray.util.state import list_nodes

    out = []
    for n in list_nodes(address=DASHBOARD, limit=1000, detail=True, raise_on_missing_output=False):
        if alive_only and n.state != "ALIVE":
            continue
        out.append(
            {
                "node_id": n.node_id,
                "ip": n.node_ip,
                "state": n.state,
                "head": bool(n.is_head_node),
                "cpu": (n.resources_total or {}).get("CPU", 0.0),
            }
        )
    return out


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "ray-nodes":
        print(json.dumps(nodes()))
    elif cmd == "ray-jobs":
        print(
            json.dumps(
                [{"id": j.submission_id, "job_id": j.job_id, "status": str(j.status.value)} for j in jobs(args[0])]
            )
        )
    elif cmd == "ray-placement":
        from ray.util.state import list_actors

        job_ids = {j.job_id for j in jobs(args[0]) if j.job_id}
        ips = {n["node_id"]: n["ip"] for n in nodes(alive_only=False)}
        actors = [
            a
            for a in list_actors(address=DASHBOARD, limit=10000, detail=True, raise_on_missing_output=False)
            if a.class_name == "RayTrainWorker" and a.job_id in job_ids
        ]
        print(
            json.dumps(
                {
                    "jobs": sorted(job_ids),
                    "workers": [
                        {"node_id": a.node_id, "ip": ips.get(a.node_id), "state": a.state, "pid": a.pid} for a in actors
                    ],
                }
            )
        )
    elif cmd == "s3-ready":
        client = s3()
        client.list_buckets()
        client.head_bucket(Bucket=BUCKET)
    elif cmd == "s3-ls":
        print(json.dumps(s3_keys(args[0])))
    elif cmd == "s3-get":
        sys.stdout.buffer.write(s3().get_object(Bucket=BUCKET, Key=args[0])["Body"].read())
    elif cmd == "s3-put":
        s3().put_object(Bucket=BUCKET, Key=args[0], Body=sys.stdin.buffer.read())
    else:
        print(f"unknown command {cmd!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
