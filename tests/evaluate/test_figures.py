"""Figures that do not mislead: latency with warm-up, median and spread; top-k only where k < classes;
size ratios in words; a results table that never wraps and explains its columns; the lr really used."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import synthetic_pipeline

from kdray.cli import results_lines
from kdray.contracts.checkpoint import open_artifact
from kdray.core.meter import counted, short_time
from kdray.core.metrics import metrics_for
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline
from kdray.evaluate import latency
from kdray.evaluate.figures import ratio, speed, spread
from kdray.evaluate.latency import distinct, measure


def test_a_slow_first_call_does_not_make_the_latency(monkeypatch):
    clock = [0.0]  # a clock the calls advance: 50 ms for a cold first call, then 0.5 ms each
    monkeypatch.setattr(latency.time, "perf_counter", lambda: clock[0])
    calls = []

    def call():
        calls.append(1)
        clock[0] += 0.05 if len(calls) == 1 else 0.0005

    figures = measure(call, runs=10)
    assert figures["median_ms"] == pytest.approx(0.5) and figures["p75_ms"] == pytest.approx(0.5)
    assert figures["runs"] >= 10 and len(calls) > figures["runs"], "warm-up calls are not timed"


def test_ratios_and_spreads_read_the_right_way_round():
    assert ratio(0.0105) == "95x larger" and ratio(3.2) == "3.2x smaller" and ratio(1.0) == "same"
    assert speed({"speedup": 4.0, "speedup_distinct": True}) == "4.0x faster"
    assert speed({"speedup": 267.0, "speedup_distinct": False}).startswith("~"), "overlapping ranges: no claim"
    assert spread({"latency_ms": 0.112, "latency_p25_ms": 0.104, "latency_p75_ms": 0.131}) == "0.112 ms (0.104-0.131)"
    fast = {"latency_p25_ms": 0.10, "latency_p75_ms": 0.12}
    assert distinct(fast, {"latency_p25_ms": 1.0, "latency_p75_ms": 1.2})
    assert not distinct(fast, {"latency_p25_ms": 0.11, "latency_p75_ms": 11.2})


def test_short_times_and_counts():
    assert [short_time(s) for s in (0.0004, 0.0081, 0.34, 3.21, 42.0, 125.0)] == [
        "0.40 ms",
        "8.1 ms",
        "340 ms",
        "3.2 s",
        "42 s",
        "2:05",
    ]
    assert counted(1, "stage") == "1 stage" and counted(3, "stage") == "3 stages"


@pytest.mark.parametrize("classes,has_top5", [(2, False), (5, False), (10, True)])
def test_top5_only_with_more_than_five_classes(classes, has_top5):
    logits = torch.randn(32, classes, generator=torch.Generator().manual_seed(0))
    assert ("top5" in metrics_for(logits, torch.arange(32) % classes)) is has_top5


def report(model: str = "mlp_64") -> dict:
    row = {
        "stage": "student-with-a-long-name",
        "kind": "distill",
        "model": model,
        "top1": 0.8512,
        "parameters": 1_234_567,
        "latency_ms": 11.19,
        "latency_p25_ms": 10.9,
        "latency_p75_ms": 11.6,
        "latency_batch": 128,
        "agreement": 0.9012,
        "teacher": "teacher",
        "gain_over_scratch": 0.0123,
        "scratch": "scratch",
    }
    return {"pipeline": "p", "data": {"name": "fashion_mnist"}, "test_examples": 10_000, "models": [row]}


@pytest.mark.parametrize("columns", [40, 80, 120])
@pytest.mark.parametrize("model", ["mlp_64", "examples/usercode/fmnist_nets.py:AVeryLongClassNameForAUserModel"])
def test_the_results_never_wrap_and_explain_their_columns(columns, model):
    lines = results_lines(report(model), columns)
    assert all(len(line) <= columns for line in lines), "\n".join(lines)
    text = " ".join(" ".join(lines).split())
    assert "agreement:" in text and "gain:" in text and "latency:" in text, "a legend under the table"
    assert "teacher 'teacher'" in text and "baseline 'scratch'" in text


def test_a_cosine_schedule_records_the_lr_it_used_last(tmp_path):
    doc = synthetic_pipeline(tmp_path, workers=0, epochs=2)
    doc["stages"][0]["optim"]["schedule"] = "cosine"
    (outcome,) = run_pipeline(parse_pipeline(doc), log=lambda _m: None)
    history = json.loads(open_artifact(outcome.uri).read_bytes("history.json"))
    lrs = [h["lr"] for h in (history if isinstance(history, list) else history["history"])]
    assert len(lrs) == 2 and lrs[0] > lrs[1] > 0.0, lrs
