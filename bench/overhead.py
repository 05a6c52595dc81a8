"""kdray's training overhead against a plain PyTorch loop: same model, data, recipe, in one process.

    .venv/bin/python bench/overhead.py                    # cnn_small, 12,000 Fashion-MNIST images, 4 epochs
    .venv/bin/python bench/overhead.py --limit 60000 --epochs 3

Prints the steady-state throughput ratio kdray/plain (median samples/s over the epochs after the
first, both measured over the training steps only), the start-up of ``fit()`` (from the call to
the first training step of the worker) and its tear-down, and ``ray.init``. Plain and kdray
alternate (plain, kdray, plain, kdray) so that a noisy neighbour hits both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time

import torch

from kdray.contracts.stage import StageContext
from kdray.core.storage import Storage
from kdray.data import datasets as kdata
from kdray.engine.driver import ensure_ray, fit
from kdray.engine.loop import batches, build_optimizer
from kdray.engine.reaper import session_pids
from kdray.engine.spec import parse_pipeline
from kdray.models import create_model


def plain_loop(spec, threads: int, seed: int, channels_last: bool = True) -> list[float]:
    """The same recipe written as a plain PyTorch loop: samples/s of each epoch's training steps (in the
    channels_last layout that kdray's loop uses for convolutional models by default, ``run.channels_last``)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    train = kdata.load(spec.data, "train")
    x, y = kdata.normalize(train.x, train), train.y
    model = create_model(spec.model.name, num_classes=10, in_channels=1, image_size=28)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch: the stub lacks it
    steps = math.ceil(len(y) / spec.optim.batch_size)
    opt, sched = build_optimizer(spec.optim, [{"params": list(model.parameters())}], steps * spec.optim.epochs)
    rates = []
    idx_all = torch.arange(len(y))
    for epoch in range(spec.optim.epochs):
        model.train()
        t0 = time.perf_counter()
        for idx in batches(idx_all, spec.optim.batch_size, epoch, seed):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        rates.append(len(y) / (time.perf_counter() - t0))
    return rates


def cpu_seconds(pids: list[int]) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) used so far by each process, with a short name (Linux ``/proc``)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace").rsplit("/", 1)[-1] for a in argv if a][:3]
        out[pid] = (" ".join(words)[:60], (int(fields[11]) + int(fields[12])) / tick)
    return out


def ray_cpu_during(fn):
    """Run ``fn()``; return its result and the CPU seconds each process of this Ray cluster used meanwhile."""
    import ray

    node = ray._private.worker._global_node
    session, address = (
        node.session_name,
        "127.0.0.1:" + node.address.rsplit(":", 1)[1],
    )  # as embedded_cluster_env sets it
    before = cpu_seconds(session_pids(session, set(), address))
    result = fn()
    after = cpu_seconds(session_pids(session, set(), address))
    used: dict[str, float] = {}
    for pid, (name, secs) in after.items():
        used[name] = used.get(name, 0.0) + secs - before.get(pid, (name, 0.0))[1]
    return result, dict(sorted(used.items(), key=lambda kv: -kv[1]))


def kdray_fit(spec, root: Storage, name: str) -> dict:
    ctx = StageContext(spec, spec.stages[0], name, root.child(name), root, {}, lambda m: None)
    job = ctx.job()
    t_call = time.time()
    result = fit(job, root)
    t_back = time.time()
    hist = result.history
    loop_started = hist[0]["loop_started"]
    last_done = loop_started + sum(h["epoch_seconds"] for h in hist)
    return {
        "rates": [h["samples_per_s"] for h in hist],
        "startup_s": loop_started - t_call,
        "fit_s": t_back - t_call,
        "teardown_and_eval_s": t_back - last_done,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn_small")
    ap.add_argument("--limit", type=int, default=12000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="1: a Ray Train worker; 0: kdray's loop in this process")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--contiguous", action="store_true", help="both loops in the default layout (run.channels_last off)"
    )
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="kdray-bench-")
    doc = {
        "name": "bench",
        "storage": {"uri": f"file://{tmp}"},
        "run": {
            "workers": args.workers,
            "cpus_per_worker": args.threads,
            "max_failures": 0,
            "channels_last": not args.contiguous,
        },
        "stages": [
            {
                "name": "fit",
                "kind": "train",
                "model": {"name": args.model},
                "data": {"name": "fashion_mnist", "limit": args.limit, "test_limit": 2000},
                "optim": {"epochs": args.epochs, "batch_size": 128, "lr": 1e-3},
            }
        ],
    }
    spec = parse_pipeline(doc)
    t0 = time.perf_counter()
    ensure_ray(spec.run)
    ray_init_s = time.perf_counter() - t0

    plain, kd, startups, teardowns = [], [], [], []
    for r in range(args.rounds):
        plain += plain_loop(spec.stages[0], args.threads, seed=r, channels_last=not args.contiguous)[1:]
        out, ray_cpu = ray_cpu_during(lambda r=r: kdray_fit(spec, Storage(f"file://{tmp}"), f"round{r}"))
        kd += out["rates"][1:]
        startups.append(out["startup_s"])
        teardowns.append(out["teardown_and_eval_s"])
        print(
            f"round {r}: plain {statistics.median(plain[-(args.epochs - 1) :]):,.0f} samples/s, "
            f"kdray {statistics.median(out['rates'][1:]):,.0f} samples/s, fit start-up {out['startup_s']:.2f} s, "
            f"fit total {out['fit_s']:.1f} s",
            flush=True,
        )
        print(
            f"  CPU seconds of the Ray processes during that fit ({out['fit_s']:.0f} s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in ray_cpu.items() if v >= 0.05),
            flush=True,
        )
    figures = {
        "model": args.model,
        "examples": args.limit,
        "epochs": args.epochs,
        "threads": args.threads,
        "channels_last": not args.contiguous,
        "plain_samples_per_s": statistics.median(plain),
        "kdray_samples_per_s": statistics.median(kd),
        "ratio_kdray_over_plain": statistics.median(kd) / statistics.median(plain),
        "fit_startup_s": statistics.median(startups),
        "fit_startup_s_all": startups,
        "eval_and_teardown_s": statistics.median(teardowns),
        "ray_init_s": ray_init_s,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
