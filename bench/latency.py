"""How much the evaluate stage's latency of one model moves between measurements: old rule against new.

    .venv/bin/python bench/latency.py              # a 98-parameter model and cnn_small, 12 measurements each

Each measurement runs in a fresh process (a cold start, as an evaluate stage is), so the spread between
measurements is what two runs of the same report would show. The old rule is 2 warm-up passes and the
median of 10; the new one is ``kdray.evaluate.latency.model_latency`` (warm-up until 50 ms have passed,
then at least 10 passes and 200 ms, the median, with the interquartile range). Prints, per model and
rule, the median of the measurements and the ratio of the largest to the smallest (1.0 is stable).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time, torch
from kdray.models import create_model
from kdray.evaluate.latency import model_latency
name, rule = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
if name == "tiny":
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
    x = torch.randn(128, 1, 2, 4)
else:
    model = create_model(name, num_classes=10, in_channels=1, image_size=28)
    x = torch.randn(128, 1, 28, 28)
model.eval()
with torch.no_grad():
    if rule == "old":
        for _ in range(2):
            model(x)
        times = []
        for _ in range(10):
            t = time.perf_counter(); model(x); times.append((time.perf_counter() - t) * 1000)
        print(json.dumps(statistics.median(times)))
    else:
        print(json.dumps(model_latency(model, x, 128, 10)["median_ms"]))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    for name in ("tiny", "cnn_small"):
        for rule in ("old", "new"):
            values = []
            for _ in range(args.repeats):
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, name, rule], capture_output=True, text=True, check=True
                )
                values.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(
                f"{name:<10} {rule}: median {statistics.median(values):.4f} ms, "
                f"max/min over {args.repeats} fresh processes {max(values) / min(values):.2f}"
            )


if __name__ == "__main__":
    main()
