"""Eight students in one `kdray sweep` against eight sequential `kdray run` commands.

    .venv/bin/python bench/sweep.py                  # 4 student sizes x 2 learning rates, 2 epochs each

Both sides start from the same finished teacher (trained first, not timed). The sequential side
runs `kdray run SPEC <overrides>` eight times as fresh processes, as a user scripting a loop would;
the sweep side runs `kdray sweep SPEC --stage student --grid ... --max-concurrent 2` once. Each side
has its own storage root, so neither finds the other's results. Prints both wall times and the
ratio sweep / sequential (target: <= 0.6).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import yaml

MODELS = ["mlp_32", "mlp_64", "mlp_128", "mlp_256"]
LRS = [0.001, 0.003]


def spec(root: str, limit: int, epochs: int) -> dict:
    data = {"name": "fashion_mnist", "limit": limit, "test_limit": 2000}
    return {
        "name": "bench-sweep",
        "storage": {"uri": f"file://{root}"},
        "run": {"workers": 1, "cpus_per_worker": 1},
        "stages": [
            {
                "name": "teacher",
                "kind": "train",
                "model": {"name": "cnn_small"},
                "data": data,
                "optim": {"epochs": 2, "lr": 2e-3},
            },
            {
                "name": "student",
                "kind": "distill",
                "teacher": "teacher",
                "model": {"name": "mlp_64"},
                "data": data,
                "optim": {"epochs": epochs, "lr": 1e-3},
                "losses": [{"name": "cross_entropy", "weight": 0.1}, {"name": "hinton_kl", "weight": 0.9}],
            },
        ],
    }


def kdray(*args: str) -> None:
    exe = os.path.join(os.path.dirname(sys.executable), "kdray")
    subprocess.run([exe, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-concurrent", type=int, default=2)
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="kdray-bench-sweep-")
    paths = {}
    for side in ("sequential", "sweep"):
        path = os.path.join(base, f"{side}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(spec(os.path.join(base, side), args.limit, args.epochs), f)
        paths[side] = path
        kdray("run", path, "--only", "teacher")  # the shared starting point, not timed

    t0 = time.perf_counter()
    for model, lr in itertools.product(MODELS, LRS):
        kdray(
            "run",
            paths["sequential"],
            f"stages.student.model.name={model}",
            f"stages.student.optim.lr={lr}",
            "--only",
            "student",
        )
    sequential = time.perf_counter() - t0

    t0 = time.perf_counter()
    kdray(
        "sweep",
        paths["sweep"],
        "--stage",
        "student",
        "--grid",
        "model.name=" + ",".join(MODELS),
        "--grid",
        "optim.lr=" + ",".join(map(str, LRS)),
        "--max-concurrent",
        str(args.max_concurrent),
    )
    sweep = time.perf_counter() - t0

    print(
        json.dumps(
            {
                "students": len(MODELS) * len(LRS),
                "examples": args.limit,
                "epochs": args.epochs,
                "sequential_s": round(sequential, 1),
                "sweep_s": round(sweep, 1),
                "ratio_sweep_over_sequential": round(sweep / sequential, 3),
                "max_concurrent": args.max_concurrent,
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
