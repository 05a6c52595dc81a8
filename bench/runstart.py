"""A whole ``kdray run`` on Ray against the same run in-process: what a one-stage run and each further
stage cost on Ray, end to end (process start, ``ray.init``, Ray Train, tear-down, ``ray.shutdown``).

    .venv/bin/python bench/runstart.py                      # cnn_small, 2,000 images, 1 epoch, 3 rounds
    .venv/bin/python bench/runstart.py --modes local embedded cluster --rounds 3

Each case is one ``kdray run --max-concurrent 1`` command into fresh storage, timed from the start of
the process to its exit:

* ``local``: ``run.workers: 0`` (the loop in the command's process, no Ray);
* ``embedded``: ``run.workers: 1``, the command starts its own Ray cluster (the default);
* ``cluster``: ``run.workers: 1`` with a cluster started once by ``kdray cluster up`` (before the
  rounds; ``kdray cluster down`` after them), which every command joins.

Pipelines of 1 and of 2 independent ``train`` stages (seeds 0 and 1, run one after the other): the
one-stage overhead is ``T(ray, 1) - T(local, 1)``, a further stage's ``(T(ray, 2) - T(ray, 1)) -
(T(local, 2) - T(local, 1))``. The cases alternate within each round so a noisy neighbour hits all.

``--variant KEY=VALUE`` runs each Ray mode a second time with that environment variable set (for
``cluster``, a second cluster started with it), as ``<mode>+``: an A/B of one Ray setting in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
KDRAY = [sys.executable, "-c", "from kdray.cli import main; main()"]


def spec_file(folder: str, workers: int, stages: int, limit: int, model: str) -> str:
    doc = {
        "name": "runstart",
        "storage": {"uri": f"file://{folder}/store"},
        "run": {"workers": workers, "cpus_per_worker": 1, "max_failures": 0},
        "stages": [
            {
                "name": f"s{i}",
                "kind": "train",
                "model": {"name": model},
                "data": {"name": "fashion_mnist", "limit": limit, "test_limit": 500},
                "optim": {"epochs": 1, "batch_size": 128, "lr": 1e-3},
                "run": {"seed": i},
            }
            for i in range(stages)
        ],
    }
    path = os.path.join(folder, f"w{workers}-s{stages}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return path


def timed_run(spec: str, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([*KDRAY, "run", spec, "--max-concurrent", "1"], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn_small")
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["local", "embedded", "cluster"])
    ap.add_argument("--variant", help="KEY=VALUE: also run each Ray mode with this environment variable")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="kdray-bench-runstart-")
    env = dict(os.environ, NO_COLOR="1")
    envs = {mode: dict(env, KDRAY_CLUSTER_FILE=os.path.join(tmp, "none.json")) for mode in args.modes}
    if args.variant:
        key, _, value = args.variant.partition("=")
        for mode in [m for m in args.modes if m != "local"]:
            envs[f"{mode}+"] = dict(envs[mode], **{key: value})
    clusters = [m for m in envs if m.startswith("cluster")]
    for mode in clusters:
        envs[mode]["KDRAY_CLUSTER_FILE"] = os.path.join(tmp, f"{mode}.json")
        up = subprocess.run([*KDRAY, "cluster", "up"], env=envs[mode], capture_output=True, text=True)
        if up.returncode != 0:
            sys.exit(f"kdray cluster up failed:\n{up.stderr}")
    times: dict[str, list[float]] = {}
    try:
        for r in range(args.rounds):
            for mode, run_env in envs.items():
                for stages in (1, 2):
                    folder = tempfile.mkdtemp(dir=tmp, prefix=f"r{r}-{mode}-{stages}-")
                    spec = spec_file(folder, 0 if mode == "local" else 1, stages, args.limit, args.model)
                    seconds = timed_run(spec, run_env)
                    times.setdefault(f"{mode}/{stages}", []).append(seconds)
                    print(json.dumps({"round": r, "mode": mode, "stages": stages, "s": round(seconds, 2)}), flush=True)
    finally:
        for mode in clusters:
            subprocess.run([*KDRAY, "cluster", "down"], env=envs[mode], capture_output=True, text=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    summary: dict = {"median_s": {k: round(v, 2) for k, v in med.items()}}
    if "local/1" in med:
        for mode in envs:
            if mode == "local":
                continue
            one = [a - b for a, b in zip(times[f"{mode}/1"], times["local/1"])]
            further = [
                (r2 - r1) - (l2 - l1)
                for r1, r2, l1, l2 in zip(times[f"{mode}/1"], times[f"{mode}/2"], times["local/1"], times["local/2"])
            ]
            summary[mode] = {
                "one_stage_overhead_s": round(statistics.median(one), 2),
                "each_rounds": [round(x, 2) for x in one],
                "further_stage_overhead_s": round(statistics.median(further), 2),
                "further_rounds": [round(x, 2) for x in further],
            }
    summary["load_average"] = os.getloadavg()
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"times": times, **summary}, f, indent=2)


if __name__ == "__main__":
    main()
