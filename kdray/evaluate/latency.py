"""Latency as a figure that holds from one run to the next: warm-up, then the median of repeats, with the spread.

One forward pass of a tiny model takes a tenth of a millisecond, and the first passes (thread pools
starting, memory being allocated, a CPU clocking up) or a passing burst of other work can take a
hundred times longer. So a measurement warms up until the pass time settles (at least ``WARMUP_RUNS``
passes and ``WARMUP_S`` seconds), then times at least ``runs`` passes and ``MIN_TIME_S`` seconds in
all, and reports the median with the interquartile range (``p25``..``p75``). A ratio of two latencies
(a student's speed-up) is only called a difference when their ranges do not overlap (``distinct``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from kdray.models import count_parameters

WARMUP_RUNS = 3
WARMUP_S = 0.05
MIN_TIME_S = 0.2
MAX_RUNS = 1000


def measure(call: Callable[[], Any], runs: int) -> dict[str, float]:
    """Time ``call`` after a warm-up: ``{"median_ms", "p25_ms", "p75_ms", "runs"}``."""
    t0 = time.perf_counter()
    done = 0
    while done < WARMUP_RUNS or time.perf_counter() - t0 < WARMUP_S:
        call()
        done += 1
        if done >= MAX_RUNS:
            break
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or (time.perf_counter() - start < MIN_TIME_S and len(times) < MAX_RUNS):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1000)
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return {"median_ms": statistics.median(times), "p25_ms": q1, "p75_ms": q3, "runs": len(times)}


@torch.no_grad()
def model_latency(model: torch.nn.Module, x: torch.Tensor, batch_size: int, runs: int) -> dict[str, float]:
    """The forward time of ``model`` on the first ``batch_size`` rows of ``x`` (eval mode, no gradients)."""
    model.eval()
    xb = x[:batch_size]
    return measure(lambda: model(xb), runs)


def as_row(figures: dict[str, float], prefix: str = "") -> dict[str, Any]:
    """The report's fields: ``latency_ms`` (the median), ``latency_p25_ms``, ``latency_p75_ms``, ``latency_runs``."""
    return {
        f"{prefix}latency_ms": figures["median_ms"],
        f"{prefix}latency_p25_ms": figures["p25_ms"],
        f"{prefix}latency_p75_ms": figures["p75_ms"],
        f"{prefix}latency_runs": int(figures["runs"]),
    }


def distinct(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two rows' latency ranges (p25..p75) do not overlap: only then is their ratio a difference."""
    try:
        return a["latency_p75_ms"] < b["latency_p25_ms"] or b["latency_p75_ms"] < a["latency_p25_ms"]
    except KeyError:
        return True


def model_row(ref: str, art: Any, model: torch.nn.Module, x: torch.Tensor, batch: int, runs: int) -> dict[str, Any]:
    """The fields every evaluate report row has, whatever the task: which artifact, its size, its latency."""
    return {
        "stage": ref,
        "uri": art.uri,
        "kind": art.manifest["kind"],
        "model": art.manifest["model"]["name"],
        "parameters": count_parameters(model),
        "bytes": art.manifest["weights"]["bytes"],
        **as_row(model_latency(model, x, batch, runs)),
        "latency_batch": min(batch, len(x)),
    }
