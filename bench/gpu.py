"""The GPU path through Ray Train against a plain PyTorch loop: same model, data and recipe, bf16 autocast.

    .venv/bin/python bench/gpu.py                                 # cnn_small, resnet_small, cnn_large
    .venv/bin/python bench/gpu.py --models resnet_small --epochs 4 --limit 50000

Needs a CUDA device; on a machine without one it says so and exits with code 1. Data: the synthetic
dataset as 3x32x32 images (``--limit`` of them), kept on the GPU by the plain loop. For each model, one
run of the plain loop (channels_last, bf16 autocast, AdamW, batches indexed on the GPU) and one
``kdray.engine.driver.fit`` through a 1-GPU ``TorchTrainer`` (``workers: 1, use_gpu: true, amp: true``),
alternating. Prints steady-state samples/s (median over the epochs after the first), their ratio
kdray / plain, and the GPU utilisation that ``nvidia-smi`` reports during the kdray run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

from kdray.contracts.stage import StageContext
from kdray.core.storage import Storage
from kdray.data import datasets as kdata
from kdray.engine.driver import ensure_ray, fit
from kdray.engine.loop import build_optimizer
from kdray.engine.spec import parse_pipeline
from kdray.models import create_model


def plain_loop(stage, seed: int) -> list[float]:
    """The recipe as a plain PyTorch loop on the GPU: samples/s of each epoch's training steps."""
    torch.manual_seed(seed)
    device = torch.device("cuda")
    train = kdata.load(stage.data, "train")
    x = kdata.normalize(train.x, train).to(device).contiguous(memory_format=torch.channels_last)
    y = train.y.to(device)
    model = create_model(stage.model.name, num_classes=10, in_channels=3, image_size=32).to(device)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    bs = stage.optim.batch_size
    steps = math.ceil(len(y) / bs)
    opt, sched = build_optimizer(stage.optim, [{"params": list(model.parameters())}], steps * stage.optim.epochs)
    rates = []
    for epoch in range(stage.optim.epochs):
        order = torch.randperm(len(y), device=device, generator=torch.Generator(device).manual_seed(epoch))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(y), bs):
            idx = order[i : i + bs]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        torch.cuda.synchronize()
        rates.append(len(y) / (time.perf_counter() - t0))
    return rates


class Utilisation:
    """GPU utilisation samples from ``nvidia-smi`` every half second while the block runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.5)

    def __enter__(self) -> Utilisation:
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn_small,resnet_small,cnn_large")
    ap.add_argument("--limit", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device; this machine has none (torch.cuda.is_available() is False).")
        sys.exit(1)

    tmp = tempfile.mkdtemp(prefix="kdray-bench-gpu-")
    root = Storage(f"file://{tmp}")
    rows = []
    for model in args.models.split(","):
        doc = {
            "name": "gpu",
            "storage": {"uri": root.uri()},
            "run": {"workers": 1, "use_gpu": True, "amp": True, "cpus_per_worker": 4, "max_failures": 0},
            "stages": [
                {
                    "name": "fit",
                    "kind": "train",
                    "model": {"name": model},
                    "data": {
                        "name": "synthetic",
                        "options": {"num_samples": args.limit, "image_size": 32, "channels": 3, "num_classes": 10},
                    },
                    "optim": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": 1e-3},
                }
            ],
        }
        spec = parse_pipeline(doc)
        ensure_ray(spec.run)
        plain = plain_loop(spec.stages[0], seed=0)[1:]
        ctx = StageContext(spec, spec.stages[0], model, root.child(model), root, {}, lambda m: None)
        with Utilisation() as util:
            result = fit(ctx.job(), root)
        kd = [h["samples_per_s"] for h in result.history][1:]
        row = {
            "model": model,
            "params": sum(
                p.numel() for p in create_model(model, num_classes=10, in_channels=3, image_size=32).parameters()
            ),
            "plain_samples_per_s": statistics.median(plain),
            "kdray_samples_per_s": statistics.median(kd),
            "ratio": statistics.median(kd) / statistics.median(plain),
            "gpu_utilisation_median": statistics.median(util.samples) if util.samples else None,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    figures = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
