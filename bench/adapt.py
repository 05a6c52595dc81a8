"""Domain adaptation on shifted Fashion-MNIST: every method on two shifts, against source-only,
next to a plain PyTorch loop of source-only and DANN (same seeds, same recipe).

    .venv/bin/python bench/adapt.py                                   # CPU: slow (about 1 h on 2 cores)
    .venv/bin/python bench/adapt.py --gpu --seeds 0 1 2               # one GPU: a few minutes

Shifts (the target domain; the source is clean Fashion-MNIST):
  rotnoise  every image rotated by 30 degrees, plus Gaussian noise sigma 0.2
  invert    intensities inverted (1 - x): feature alignment is known to fail here by aligning the
            wrong classes; the numbers are reported as they come out.

Each kdray run is a real pipeline stage (``kind: adapt``, in-process loop: ``workers: 0``): the
source-only baseline comes from the stage itself. The selection rule is part of each row; the
``oracle`` rows (selection by target test accuracy) are upper bounds and not deployable.
Results are appended to --out as JSON lines; --summary-only prints the tables again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile

import torch
import torch.nn.functional as F

from kdray.adapt.methods import dann_lambda, grad_reverse
from kdray.contracts.checkpoint import open_artifact
from kdray.contracts.specs import DataSpec, OptimSpec
from kdray.data import datasets as kdata
from kdray.engine.loop import batches, build_optimizer
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline
from kdray.models import create_model

SHIFTS = {
    "rotnoise": [{"name": "rotation", "degrees": 30}, {"name": "gaussian_noise", "sigma": 0.2}],
    "invert": [{"name": "invert"}],
}
METHODS = {  # name -> (method block, selection rule)
    "source_only": ({"name": "source_only"}, "source_val"),
    "dann": ({"name": "dann", "weight": 1.0}, "source_val"),
    "mmd": ({"name": "mmd", "weight": 1.0}, "source_val"),
    "coral": ({"name": "coral", "weight": 1.0}, "source_val"),
    "entropy_min": ({"name": "entropy_min", "weight": 0.3}, "entropy"),
    "shot": ({"name": "shot", "weight": 1.0, "beta": 0.3}, "entropy"),
    "dann_oracle": ({"name": "dann", "weight": 1.0}, "oracle"),
}


def source_data(limit: int) -> dict:
    return {"name": "fashion_mnist", "limit": limit, "test_limit": 5000}


def target_data(shift: str, limit: int) -> dict:
    return {**source_data(limit), "shifts": SHIFTS[shift]}


def doc(root: str, args, stages: list[dict]) -> dict:
    source = {
        "name": "source",
        "kind": "train",
        "model": {"name": "cnn_small"},
        "data": source_data(args.limit),
        "optim": {"epochs": args.epochs, "batch_size": 128, "lr": 2e-3},
    }
    return {
        "name": "bench-adapt",
        "storage": {"uri": f"file://{root}"},
        "run": {"workers": 0, "use_gpu": args.gpu, "amp": False, "cpus_per_worker": 2},
        "stages": [source, *stages],
    }


def adapt_stage(method: str, shift: str, seed: int, args) -> dict:
    block, selection = METHODS[method]
    stage = {
        "name": f"{method.replace('_', '-')}-{shift}-s{seed}",
        "kind": "adapt",
        "model": {"name": "cnn_small"},
        "source_domain": source_data(args.limit),
        "target_domain": target_data(shift, args.limit),
        "method": block,
        "selection": selection,
        "run": {"seed": seed},
        "optim": {"epochs": args.adapt_epochs, "batch_size": 128, "lr": 1e-3 if method == "shot" else 2e-3},
    }
    if method == "shot":
        stage["source"] = "source"  # source-free: adapts the trained source model
    return stage


# --------------------------------------------------------------------------- plain PyTorch


def plain_adapt(method: str, shift: str, seed: int, args, device: torch.device) -> float:
    """Source-only or DANN written out: one joint forward of source and target, GRL with the DANN schedule."""
    src, tgt = DataSpec.model_validate(source_data(args.limit)), DataSpec.model_validate(target_data(shift, args.limit))
    s_train, t_train, t_test = kdata.load(src, "train"), kdata.load(tgt, "train"), kdata.load(tgt, "test")
    xs, ys = kdata.normalize(s_train.x, s_train).to(device), s_train.y.to(device)
    xt = kdata.normalize(t_train.x, t_train).to(device)
    xtt, ytt = kdata.normalize(t_test.x, t_test).to(device), t_test.y.to(device)
    s_val = kdata.load(src, "test")
    xsv, ysv = kdata.normalize(s_val.x, s_val).to(device)[:2000], s_val.y.to(device)[:2000]
    torch.manual_seed(seed)
    model = create_model("cnn_small", num_classes=10, in_channels=1, image_size=28).to(device)
    disc = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)).to(device)
    params = list(model.parameters()) + (list(disc.parameters()) if method == "dann" else [])
    o = OptimSpec(epochs=args.adapt_epochs, batch_size=128, lr=2e-3)
    steps = math.ceil(len(ys) / o.batch_size)
    opt, sched = build_optimizer(o, [{"params": params}], steps * o.epochs)
    gen = torch.Generator().manual_seed(seed * 7919)
    best, best_val = None, -1.0
    for epoch in range(o.epochs):
        model.train()
        for step, idx in enumerate(batches(torch.arange(len(ys)), o.batch_size, epoch, seed)):
            p = min((epoch + step / steps) / o.epochs, 1.0)
            tidx = torch.randint(len(xt), (o.batch_size,), generator=gen).to(device)
            x = torch.cat([xs[idx.to(device)], xt[tidx]]) if method == "dann" else xs[idx.to(device)]
            feats = model.embed(x)
            logits = model.classifier(feats)
            n = len(idx)
            loss = F.cross_entropy(logits[:n], ys[idx.to(device)])
            if method == "dann":
                d = disc(grad_reverse(feats, dann_lambda(p))).squeeze(1)
                dom = torch.cat([torch.zeros(n), torch.ones(len(x) - n)]).to(device)  # source 0, target 1
                loss = loss + F.binary_cross_entropy_with_logits(d, dom)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            val = float((model(xsv).argmax(1) == ysv).float().mean())  # selection: source validation
            if val > best_val:
                best_val = val
                best = float(
                    (torch.cat([model(xtt[i : i + 2000]) for i in range(0, len(ytt), 2000)]).argmax(1) == ytt)
                    .float()
                    .mean()
                )
    return best


# --------------------------------------------------------------------------- driver


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"


def summarise(rows: list[dict]) -> None:
    for shift in SHIFTS:
        sel = [r for r in rows if r["shift"] == shift and r["part"] == "kdray"]
        if not sel:
            continue
        print(f"\n{shift}: target test accuracy (%), mean ± std over seeds")
        print("| method | selection | kdray target acc | source-only (same runs) | gain (points) | plain PyTorch |")
        print("|---|---|---|---|---|---|")
        for method in METHODS:
            r = [x for x in sel if x["method"] == method]
            if not r:
                continue
            plain = [x["acc"] for x in rows if x["part"] == "plain" and x["shift"] == shift and x["method"] == method]
            gain = statistics.mean(x["target_acc"] - x["source_only_acc"] for x in r)
            print(
                f"| {method} | {r[0]['selection']}{' (not deployable)' if r[0]['selection'] == 'oracle' else ''} | "
                f"{mean_std([x['target_acc'] for x in r])} | {mean_std([x['source_only_acc'] for x in r])} | "
                f"{100 * gain:+.2f} | {mean_std(plain) if plain else ''} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--shifts", nargs="+", default=list(SHIFTS))
    ap.add_argument("--limit", type=int, default=60000, help="source and target training images")
    ap.add_argument("--epochs", type=int, default=5, help="source model epochs")
    ap.add_argument("--adapt-epochs", type=int, default=5)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--no-plain", action="store_true")
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "kdray-bench-adapt"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args()
    out = args.out or os.path.join(args.root, "results.jsonl")
    os.makedirs(args.root, exist_ok=True)
    if not args.summary_only:
        device = torch.device("cuda" if args.gpu else "cpu")

        def emit(row: dict) -> None:
            print(json.dumps(row), flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")

        for shift in args.shifts:
            for method in args.methods:
                for seed in args.seeds:
                    stage = adapt_stage(method, shift, seed, args)
                    res = run_pipeline(parse_pipeline(doc(args.root, args, [stage])), log=lambda m: None)
                    a = open_artifact(res[-1].uri).manifest["adapt"]
                    emit({"part": "kdray", "shift": shift, "method": method, "seed": seed, **a})
                    if not args.no_plain and method in ("source_only", "dann"):
                        emit(
                            {
                                "part": "plain",
                                "shift": shift,
                                "method": method,
                                "seed": seed,
                                "acc": plain_adapt(method, shift, seed, args, device),
                            }
                        )
    with open(out) as f:
        summarise([json.loads(line) for line in f if line.strip()])


if __name__ == "__main__":
    main()
