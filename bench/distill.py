"""Distillation on Fashion-MNIST: kdray against a plain PyTorch loop of the same recipe, same seeds.

    .venv/bin/python bench/distill.py                         # everything (about 40 min on 2 CPUs)
    .venv/bin/python bench/distill.py --parts accuracy --seeds 0 1 2
    .venv/bin/python bench/distill.py --parts scarce speed memory

Parts:
  accuracy  MLP-512 student, 5 epochs, full labels: scratch vs hinton_kl (T=2, T=4) vs
            weighted_output_mse; kdray (TorchTrainer, in-process) next to a plain loop.
  scarce    the student keeps labels for 1,000 images (100 per class) and sees the teacher's
            outputs on all 60,000: KD vs a scratch student trained on the same labels.
  speed     epoch time of cached KD / student-only, and online-KD throughput kdray / plain loop.
  memory    peak RSS of a process running cached KD vs online KD (one subprocess each).

The teacher (cnn_small, 5 epochs on all labels) is trained once by kdray and shared. Results are
appended to --out (JSON lines) as they come, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from kdray.contracts.checkpoint import open_artifact
from kdray.contracts.specs import DataSpec, OptimSpec
from kdray.data import datasets as kdata
from kdray.engine.loop import batches, build_optimizer
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline
from kdray.models import create_model

TEACHER = {
    "name": "teacher",
    "kind": "train",
    "model": {"name": "cnn_small"},
    "data": {"name": "fashion_mnist"},
    "optim": {"epochs": 5, "batch_size": 128, "lr": 2e-3},
}
OPTIM = {"epochs": 5, "batch_size": 128, "lr": 1e-3}
RECIPES = {
    "scratch": [{"name": "cross_entropy", "weight": 1.0}],
    "hinton_T2": [{"name": "cross_entropy", "weight": 0.1}, {"name": "hinton_kl", "weight": 0.9, "temperature": 2}],
    "hinton_T4": [{"name": "cross_entropy", "weight": 0.1}, {"name": "hinton_kl", "weight": 0.9, "temperature": 4}],
    "weighted_mse": [
        {"name": "cross_entropy", "weight": 0.5},
        {"name": "weighted_output_mse", "weight": 0.5, "weighting": "confidence"},
    ],
}


GPU = False  # --gpu: every run on the local CUDA device, in-process (no Ray), without AMP


def pipeline(root: str, students: list[dict], workers: int = 0, cpus: int = 2) -> dict:
    run = {"workers": 0, "use_gpu": True, "amp": False} if GPU else {"workers": workers, "cpus_per_worker": cpus}
    return {
        "name": "bench-distill",
        "storage": {"uri": f"file://{root}"},
        "run": {**run, "max_failures": 0},
        "stages": [TEACHER, *students],
    }


def student(
    name: str, recipe: str, seed: int, data: dict | None = None, cache: str = "auto", model: str = "mlp_512"
) -> dict:
    return {
        "name": name,
        "kind": "distill",
        "teacher": "teacher",
        "model": {"name": model},
        "data": data or {"name": "fashion_mnist"},
        "optim": OPTIM,
        "losses": RECIPES[recipe],
        "teacher_cache": cache,
        "run": {"seed": seed},
    }


def kdray_run(root: str, stage: dict, workers: int = 0, force: bool = False) -> dict:
    out = run_pipeline(
        parse_pipeline(pipeline(root, [stage], workers)), force=[stage["name"]] if force else False, log=lambda m: None
    )
    return {**open_artifact(out[-1].uri).manifest, "uri": out[-1].uri}


def test_acc(m: dict) -> float:
    """The published model's accuracy on the test split (the loop itself watches the validation split)."""
    spec = DataSpec.model_validate(m["spec"]["data"])
    test = kdata.load(spec, "test")
    model = open_artifact(m["uri"]).build_model().eval()
    with torch.no_grad():
        logits = torch.cat([model(kdata.normalize(test.x[i : i + 1024], test)) for i in range(0, len(test), 1024)])
    return float((logits.argmax(1) == test.y).float().mean())


# --------------------------------------------------------------------------- the plain PyTorch loop


def plain_student(
    teacher: torch.nn.Module, recipe: str, seed: int, data: dict, threads: int = 2, online: bool = False
) -> dict:
    """The same recipe, written out: same init seed, batch order, schedule and loss formulas."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if GPU else "cpu")
    spec = DataSpec.model_validate(data)
    train, test = kdata.load(spec, "train"), kdata.load(spec, "test")
    x, y = kdata.normalize(train.x, train).to(device), train.y.to(device)
    xt, yt = kdata.normalize(test.x, test).to(device), test.y.to(device)
    teacher = teacher.to(device).eval()
    with torch.no_grad():
        cached = None if online else torch.cat([teacher(x[i : i + 1024]) for i in range(0, len(x), 1024)])
    torch.manual_seed(seed)
    model = create_model("mlp_512", num_classes=10, in_channels=1, image_size=28).to(device)
    o = OptimSpec.model_validate(OPTIM)
    steps = math.ceil(len(y) / o.batch_size)
    opt, sched = build_optimizer(o, [{"params": list(model.parameters())}], steps * o.epochs)
    rates = []
    for epoch in range(o.epochs):
        model.train()
        t0 = time.perf_counter()
        for idx in batches(torch.arange(len(y)), o.batch_size, epoch, seed):
            idx = idx.to(device)
            xb, yb = x[idx], y[idx]
            s = model(xb)
            if online:
                with torch.no_grad():
                    t = teacher(xb)
            else:
                t = cached[idx] if cached is not None else None
            loss = 0.0
            for term in RECIPES[recipe]:
                loss = loss + term["weight"] * plain_term(term, s, t, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        rates.append(len(y) / (time.perf_counter() - t0))
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    return {"test_acc": acc, "samples_per_s": rates}


def plain_term(term: dict, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if term["name"] == "cross_entropy":
        keep = y >= 0
        return F.cross_entropy(s[keep], y[keep]) if keep.any() else s.sum() * 0
    if term["name"] == "hinton_kl":
        T = term["temperature"]
        return (
            F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True) * T * T
        )
    if term["name"] == "weighted_output_mse":
        w = F.softmax(t, 1).max(1).values
        return ((s - t).pow(2).sum(1) * w).sum() / w.sum()
    raise ValueError(term["name"])


# --------------------------------------------------------------------------- parts


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"


def part_accuracy(root: str, teacher, seeds, emit) -> None:
    for recipe in RECIPES:
        for seed in seeds:
            m = kdray_run(root, student(f"acc-{recipe.replace('_', '-').lower()}", recipe, seed))
            p = plain_student(teacher, recipe, seed, {"name": "fashion_mnist"})
            emit(
                {
                    "part": "accuracy",
                    "recipe": recipe,
                    "seed": seed,
                    "kdray": test_acc(m),
                    "plain": p["test_acc"],
                }
            )


def part_scarce(root: str, teacher, seeds, emit) -> None:
    data = {"name": "fashion_mnist", "labels_per_class": 100}
    for recipe in ("scratch", "hinton_T4"):
        for seed in seeds:
            stage = student(f"scarce-{recipe.replace('_', '-').lower()}", recipe, seed, data={**data, "seed": seed})
            m = kdray_run(root, stage)
            p = plain_student(teacher, recipe, seed, {**data, "seed": seed})
            emit(
                {
                    "part": "scarce",
                    "recipe": recipe,
                    "seed": seed,
                    "kdray": test_acc(m),
                    "plain": p["test_acc"],
                }
            )


def part_speed(root: str, teacher, emit, workers: int = 1) -> None:
    seed = 100  # timings: always run again (force), never read from an earlier artifact
    only = kdray_run(root, student("speed-student-only", "scratch", seed), workers=workers, force=True)
    cached = kdray_run(root, student("speed-cached", "hinton_T4", seed, cache="on"), workers=workers, force=True)
    online = kdray_run(root, student("speed-online", "hinton_T4", seed, cache="off"), workers=workers, force=True)
    plain_online = plain_student(teacher, "hinton_T4", seed, {"name": "fashion_mnist"}, online=True)
    med = lambda hist: statistics.median(h["epoch_seconds"] for h in hist[1:])  # noqa: E731
    rate = lambda hist: statistics.median(h["samples_per_s"] for h in hist[1:])  # noqa: E731
    emit(
        {
            "part": "speed",
            "workers": workers,
            "epoch_s_student_only": med(only["history"]),
            "epoch_s_cached_kd": med(cached["history"]),
            "epoch_s_online_kd": med(online["history"]),
            "ratio_cached_over_student_only": med(cached["history"]) / med(only["history"]),
            "online_kd_samples_per_s_kdray": rate(online["history"]),
            "online_kd_samples_per_s_plain": statistics.median(plain_online["samples_per_s"][1:]),
            "ratio_online_kdray_over_plain": rate(online["history"])
            / statistics.median(plain_online["samples_per_s"][1:]),
        }
    )


def part_memory(root: str, emit) -> None:
    rss = {}
    for mode in ("on", "off"):
        out = subprocess.run(
            [sys.executable, __file__, "--rss-probe", mode, "--root", root], capture_output=True, text=True, check=True
        )
        rss[mode] = json.loads(out.stdout.strip().splitlines()[-1])["max_rss_mb"]
    emit(
        {
            "part": "memory",
            "peak_rss_mb_cached": rss["on"],
            "peak_rss_mb_online": rss["off"],
            "ratio_cached_over_online": rss["on"] / rss["off"],
        }
    )


def rss_probe(root: str, cache: str) -> None:
    kdray_run(root, student(f"rss-{cache}", "hinton_T4", 200, cache=cache))
    print(json.dumps({"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def summarise(rows: list[dict]) -> None:
    for part in ("accuracy", "scarce"):
        sel = [r for r in rows if r["part"] == part]
        if not sel:
            continue
        print(f"\n{part}: test accuracy (%), mean ± std over seeds")
        print("| recipe | kdray | plain PyTorch | kdray − plain (points) |\n|---|---|---|---|")
        for recipe in dict.fromkeys(r["recipe"] for r in sel):
            k = [r["kdray"] for r in sel if r["recipe"] == recipe]
            p = [r["plain"] for r in sel if r["recipe"] == recipe]
            print(
                f"| {recipe} | {mean_std(k)} | {mean_std(p)} | {100 * (statistics.mean(k) - statistics.mean(p)):+.2f} |"
            )
    for r in rows:
        if r["part"] in ("speed", "memory"):
            print(json.dumps(r, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["accuracy", "scarce", "speed", "memory"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "kdray-bench-distill"))
    ap.add_argument("--out", default=None, help="JSON-lines file for results (default: <root>/results.jsonl)")
    ap.add_argument("--rss-probe", choices=["on", "off"], help=argparse.SUPPRESS)
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="accuracy parts on the local GPU, in-process, no AMP")
    ap.add_argument("--speed-workers", type=int, default=1, help="speed part: 1 = a Ray Train worker, 0 = in-process")
    args = ap.parse_args()
    global GPU
    GPU = args.gpu
    if args.rss_probe:
        return rss_probe(args.root, args.rss_probe)
    out = args.out or os.path.join(args.root, "results.jsonl")
    os.makedirs(args.root, exist_ok=True)
    if not args.summary_only:
        teacher_manifest = open_artifact(
            run_pipeline(parse_pipeline(pipeline(args.root, [], workers=1)), log=print)[0].uri
        )
        teacher = teacher_manifest.build_model()
        print(f"teacher validation accuracy {teacher_manifest.manifest['history'][-1]['val_acc']:.4f}", flush=True)

        def emit(row: dict) -> None:
            print(json.dumps(row), flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")

        for part in args.parts:
            if part == "accuracy":
                part_accuracy(args.root, teacher, args.seeds, emit)
            elif part == "scarce":
                part_scarce(args.root, teacher, args.seeds, emit)
            elif part == "speed":
                part_speed(args.root, teacher, emit, args.speed_workers)
            elif part == "memory":
                part_memory(args.root, emit)
    with open(out) as f:
        summarise([json.loads(line) for line in f if line.strip()])


if __name__ == "__main__":
    main()
