"""Where a ``kdray run`` on Ray spends its seconds: a timeline from Ray's own logs.

    .venv/bin/python bench/phases.py                  # 2 train stages (cnn_small, 2,000 images, 1 epoch), workers: 1
    .venv/bin/python bench/phases.py --stages 1 --cluster   # joining a `kdray cluster up` cluster

Runs one ``kdray run --max-concurrent 1`` (embedded Ray, or with ``--cluster`` a cluster started by
``kdray cluster up`` before and stopped after) and reads the session's logs: the raylet's "Started worker
process" lines (which actor each process became, from its ``worker-*.out``), Ray Train's controller log
(``logs/train/ray-train-sys-controller-*.log``: its phases, with Ray Train's own durations) and the
driver's connect and disconnect. Prints one line per event, seconds from the command's start.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runstart import KDRAY, spec_file  # the same pipelines as bench/runstart.py

STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
KEEP = ("Requesting resources", "PlacementGroupCleaner launched", "worker actors created", "Train context initialized")
KEEP += ("Train function launched", "Worker group startup completed", "Shutting down")


def at(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def session_of(pid: int, roots: list[str]) -> str:
    for root in roots:
        found = glob.glob(os.path.join(root, f"session_*_{pid}"))  # an embedded cluster names its driver's pid
        if found:
            return found[0]
    return ""


def timeline(session: str) -> list[tuple[float, str]]:
    logs = os.path.join(session, "logs")
    events: list[tuple[float, str]] = []
    actor_of = {}
    for out in glob.glob(os.path.join(logs, "worker-*.out")):
        with open(out, errors="replace") as f:
            m = re.search(r":actor_name:(\w+)", f.read())
        actor_of[out.rsplit("-", 1)[-1][: -len(".out")]] = m.group(1) if m else "idle pool worker"
    with open(os.path.join(logs, "raylet.out"), errors="replace") as f:
        for line in f:
            m = STAMP.match(line)
            if not m:
                continue
            if "Started worker process with pid" in line:
                pid = re.search(r"pid (\d+)", line).group(1)  # type: ignore[union-attr]
                events.append((at(m.group(1)), f"process started: {actor_of.get(pid, '?')} (pid {pid})"))
            elif "Disconnecting driver" in line:
                events.append((at(m.group(1)), "driver disconnected"))
    for path in glob.glob(os.path.join(logs, "train", "ray-train-sys-controller-*.log")):
        with open(path) as f:
            for line in f:
                doc = json.loads(line)
                if any(k in doc["message"] for k in KEEP):
                    events.append((doc["timestamp_ns"] / 1e9, "controller: " + doc["message"].splitlines()[0][:100]))
    return sorted(events)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--cluster", action="store_true", help="join a cluster started by `kdray cluster up`")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="kdray-bench-phases-")
    env = dict(os.environ, KDRAY_CLUSTER_FILE=os.path.join(tmp, "cluster.json"), NO_COLOR="1")
    roots = [os.environ.get("RAY_TMPDIR", "/tmp") + "/ray"]
    if args.cluster:
        subprocess.run([*KDRAY, "cluster", "up"], env=env, check=True, capture_output=True)
        with open(env["KDRAY_CLUSTER_FILE"]) as f:
            doc = json.load(f)
        roots = [doc["temp_dir"]]
    try:
        spec = spec_file(tmp, 1, args.stages, args.limit, "cnn_small")
        t0 = time.time()
        proc = subprocess.Popen(
            [*KDRAY, "run", spec, "--max-concurrent", "1"], env=env, stderr=subprocess.PIPE, text=True
        )
        _, err = proc.communicate()
        t1 = time.time()
        if proc.returncode != 0:
            sys.exit(err[-3000:])
        session = os.path.join(roots[0], doc["session"]) if args.cluster else session_of(proc.pid, roots)
        print(f"{0.0:6.2f}  command started")
        for t, what in timeline(session):
            if t >= t0 - 1:
                print(f"{t - t0:6.2f}  {what}")
        print(f"{t1 - t0:6.2f}  command exited")
    finally:
        if args.cluster:
            subprocess.run([*KDRAY, "cluster", "down"], env=env, capture_output=True)


if __name__ == "__main__":
    main()
