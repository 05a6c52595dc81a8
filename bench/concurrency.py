"""Wall time of a pipeline with two independent training stages: run concurrently / one at a time.

    .venv/bin/python bench/concurrency.py                       # 2 x cnn_small, workers: 0, 1 CPU each
    .venv/bin/python bench/concurrency.py --workers 1 --rounds 1  # the same as two Ray Train runs

The pipeline has two ``train`` stages that read nothing (``a``: cnn_small, ``b``: the same recipe with
another seed), on Fashion-MNIST if it is installed, else on the synthetic dataset. Each round runs it
twice into fresh storage: ``run_pipeline(..., max_concurrent=1)`` (stages one after the other, in this
process) and ``run_pipeline(...)`` (both at once, each in a child process), alternating which goes
first, and prints both wall times and their ratio. Every stage holds ``cpus_per_worker`` CPUs (times
``workers`` for a Ray Train run), so on a 2-CPU machine two 1-CPU stages fit side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def pipeline(root: str, args: argparse.Namespace) -> dict:
    if (FMNIST / "train-images-idx3-ubyte.gz").exists():
        data = {"name": "fashion_mnist", "path": str(FMNIST), "limit": args.limit, "test_limit": 2000}
    else:
        data = {"name": "synthetic", "options": {"num_samples": args.limit, "image_size": 28, "num_classes": 10}}

    def stage(name: str, seed: int) -> dict:
        return {
            "name": name,
            "kind": "train",
            "model": {"name": args.model},
            "data": data,
            "optim": {"epochs": args.epochs, "batch_size": 128, "lr": 1e-3},
            "run": {"seed": seed},
        }

    return {
        "name": "concurrency",
        "storage": {"uri": f"file://{root}"},
        "run": {"workers": args.workers, "cpus_per_worker": args.cpus_per_worker, "max_failures": 0},
        "stages": [stage("a", 0), stage("b", 1)],
    }


def timed(root: str, args: argparse.Namespace, max_concurrent: int | None) -> float:
    spec = parse_pipeline(pipeline(root, args))
    t0 = time.perf_counter()
    out = run_pipeline(spec, log=print if args.verbose else (lambda m: None), max_concurrent=max_concurrent)
    seconds = time.perf_counter() - t0
    assert [o.status for o in out] == ["ran", "ran"], out
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn_small")
    ap.add_argument("--limit", type=int, default=12000, help="training images per stage")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="0: the loop in the stage's process; >= 1: Ray Train")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--verbose", action="store_true", help="print the pipelines' log lines")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    sequential: list[float] = []
    concurrent: list[float] = []
    for r in range(args.rounds):
        order = [1, None] if r % 2 == 0 else [None, 1]
        for max_concurrent in order:
            seconds = timed(tempfile.mkdtemp(prefix="kdray-bench-conc-"), args, max_concurrent)
            (sequential if max_concurrent == 1 else concurrent).append(seconds)
            print(f"round {r}: {'one at a time' if max_concurrent == 1 else 'concurrent'} {seconds:.1f} s", flush=True)
    figures = {
        "model": args.model,
        "examples_per_stage": args.limit,
        "epochs": args.epochs,
        "workers": args.workers,
        "cpus_per_worker": args.cpus_per_worker,
        "cpu_count": os.cpu_count(),
        "sequential_s": sequential,
        "concurrent_s": concurrent,
        "ratio_concurrent_over_sequential": statistics.median(concurrent) / statistics.median(sequential),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
