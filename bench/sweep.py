"""Eight students in one `kdray sweep` against eight sequential `kdray run` commands; or (``--asha``)
a 16-trial sweep with ASHA early stopping against the same 16 trials without it.

    .venv/bin/python bench/sweep.py                  # 4 student sizes x 2 learning rates, 2 epochs each
    .venv/bin/python bench/sweep.py --asha --limit 20000 --epochs 4   # 4 sizes x 4 learning rates

Both sides start from the same finished teacher (trained first, not timed). The sequential side
runs `kdray run SPEC <overrides>` eight times as fresh processes, as a user scripting a loop would;
the sweep side runs `kdray sweep SPEC --stage student --grid ... --max-concurrent 2` once. Each side
has its own storage root, so neither finds the other's results. Prints both wall times and the
ratio sweep / sequential (target: <= 0.6).

``--asha``: both sides run `kdray sweep SPEC --sweep SWEEP.yaml` over the same 16 trials (4 MLP widths
x 4 learning rates, ``--epochs`` each), with the same Pareto report and chosen student (under 60,000
parameters, exported to ONNX); one side has ``scheduler: {asha: {grace_period: 1, reduction_factor:
2}}``, the other ``scheduler: none``. Each side has its own storage root; the (untimed) teacher is
trained once and copied to both.
Prints both wall times, the ratio ASHA / none, the trials stopped early and the chosen students.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
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


def kdray(*args: str) -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "kdray")
    out = subprocess.run([exe, *args], check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return out.stdout


ASHA_LRS = [1e-4, 3e-4, 1e-3, 3e-3]


def asha_sweep(scheduler: object, max_concurrent: int) -> dict:
    return {
        "sweep": {
            "stage": "student",
            "space": {"model.name": {"grid": MODELS}, "optim.lr": {"grid": ASHA_LRS}},
            "max_concurrent": max_concurrent,
            "scheduler": scheduler,
            "choose": {"max_params": 60000, "export": "onnx"},
        }
    }


def asha_main(args: argparse.Namespace) -> None:
    """16 trials with ASHA against the same 16 without early stopping."""
    base = tempfile.mkdtemp(prefix="kdray-bench-asha-")
    sides = {"none": "none", "asha": {"asha": {"grace_period": 1, "reduction_factor": 2}}}
    paths = {}
    for side, scheduler in sides.items():
        path = os.path.join(base, f"{side}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(spec(os.path.join(base, side), args.limit, args.epochs), f)
        with open(os.path.join(base, f"{side}-sweep.yaml"), "w") as f:
            yaml.safe_dump(asha_sweep(scheduler, args.max_concurrent), f)
        paths[side] = path
    kdray("run", paths["none"], "--only", "teacher")  # the shared starting point, not timed: trained once,
    teacher = os.path.join(base, "none", "bench-sweep", "teacher")  # copied to the other side's storage
    shutil.copytree(teacher, os.path.join(base, "asha", "bench-sweep", "teacher"))

    out: dict = {"trials": len(MODELS) * len(ASHA_LRS), "examples": args.limit, "epochs": args.epochs}
    for side in ("none", "asha"):  # without early stopping first: the machine is as warm for both
        t0 = time.perf_counter()
        printed = kdray("sweep", paths[side], "--sweep", os.path.join(base, f"{side}-sweep.yaml"))
        seconds = time.perf_counter() - t0
        uri = next(line.split(": ", 1)[1] for line in printed.splitlines() if line.startswith("sweep report: "))
        with open(os.path.join(uri.removeprefix("file://"), "manifest.json")) as f:
            version = json.load(f)["version"]
        with open(os.path.join(uri.removeprefix("file://"), version, "sweep.json")) as f:
            report = json.load(f)
        chosen = report.get("chosen") or {}
        export = chosen.get("export") or {}
        stopped = sorted(t["epoch"] for t in report["trials"] if t["status"] == "stopped")
        out[side] = {
            "wall_s": round(seconds, 1),
            "epochs_trained": args.epochs * (out["trials"] - len(stopped)) + sum(stopped),
            "stopped_early": report["stopped"],
            "stopped_at_epochs": stopped,
            "best": {k: report["trials"][0][k] for k in ("trial", "settings", "val_acc")},
            "chosen": {k: chosen.get(k) for k in ("trial", "model", "val_acc", "parameters", "latency_ms")},
            "export_max_abs_diff": export.get("max_abs_diff"),
            "export_latency": export.get("latency"),
        }
    out["ratio_asha_over_none"] = round(out["asha"]["wall_s"] / out["none"]["wall_s"], 3)
    out["load_average_after"] = os.getloadavg()  # wall times on a shared machine: read them with the load
    out["max_concurrent"], out["cpus"] = args.max_concurrent, os.cpu_count()
    print(json.dumps(out, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-concurrent", type=int, default=2)
    ap.add_argument("--asha", action="store_true", help="16 trials with ASHA against the same 16 without it")
    args = ap.parse_args()
    if args.asha:
        asha_main(args)
        return
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
