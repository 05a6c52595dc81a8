"""Training speed of convolutional models in the channels_last memory layout against the default one.

    .venv/bin/python bench/layout.py                          # cnn_small, resnet_small, cnn_large on 1 thread
    .venv/bin/python bench/layout.py --threads 2 --rounds 3

kdray's loop puts convolutional networks in channels_last (``run.channels_last``, on by default):
this measures what that buys on this machine. Same model, same Fashion-MNIST batches (128 rows),
AdamW; contiguous and channels_last alternate (``--rounds`` times) so that a noisy neighbour hits
both. Figure: training samples/s of each, and channels_last / contiguous.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kdray.data import datasets as kdata
from kdray.models import create_model


def rate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), 1e-3)

    def step(i: int) -> None:
        j = (i * 128) % (len(x) - 128)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x[j : j + 128]), y[j : j + 128]).backward()
        opt.step()

    for i in range(3):  # warm-up: oneDNN picks its kernels
        step(i)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * 128 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn_small,resnet_small,cnn_large")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train = kdata.fashion_mnist("train")
    x, y = kdata.normalize(train.x[:6400], train), train.y[:6400]
    figures = {}
    for name in args.models.split(","):
        rates: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
        for _ in range(args.rounds):
            for layout, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
                torch.manual_seed(0)
                model = create_model(name, num_classes=10, in_channels=1, image_size=28)
                model = model.to(memory_format=fmt)  # type: ignore[call-overload]  # torch: the stub lacks it
                rates[layout].append(rate(model, x.contiguous(memory_format=fmt), y, args.steps))
        ratio = statistics.median(rates["channels_last"]) / statistics.median(rates["contiguous"])
        print(
            f"{name}: contiguous {', '.join(f'{r:,.0f}' for r in rates['contiguous'])} samples/s, channels_last "
            f"{', '.join(f'{r:,.0f}' for r in rates['channels_last'])} samples/s: ratio {ratio:.2f}",
            flush=True,
        )
        figures[name] = {**rates, "ratio_channels_last_over_contiguous": ratio}
    figures["threads"] = args.threads
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
