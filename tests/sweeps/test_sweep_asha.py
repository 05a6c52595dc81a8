"""Sweeps that stop weak trials early (ASHA), the Pareto report, the chosen student, the sweep flow."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import REPO, synthetic_pipeline

from kdray.contracts.checkpoint import open_artifact
from kdray.core.errors import SpecError
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline
from kdray.sweeps.pareto import ChooseSpec, choose, dominates, pareto_front
from kdray.sweeps.spec import AshaSpec, load_sweep, parse_sweep, sample_settings
from kdray.sweeps.sweep import run_sweep

STUDENT = {
    "name": "student",
    "kind": "distill",
    "teacher": "teacher",
    "model": {"name": "mlp_64"},
    "data": {"name": "synthetic", "options": {"num_samples": 256, "image_size": 8, "num_classes": 4}},
    "optim": {"epochs": 3, "batch_size": 32},
}


def row(name, acc, params, size=None, latency=1.0, **more):
    size = size if size is not None else 4 * params
    return {
        "trial": name,
        "model": name,
        "val_acc": acc,
        "parameters": params,
        "size_bytes": size,
        "latency_ms": latency,
        **more,
    }


def test_the_pareto_front_of_hand_made_rows():
    rows = [
        row("big", 0.90, 100_000, latency=3.0),  # the most accurate: on the front
        row("mid", 0.85, 20_000, latency=1.0),  # smaller and faster than big: on the front
        row("worse-mid", 0.84, 30_000, latency=1.5),  # mid beats it on every count
        row("tiny", 0.60, 1_000, latency=0.2),  # the smallest: on the front
        row("tiny-slow", 0.60, 1_000, latency=0.9),  # as tiny but slower: dominated
        row("fast-but-large", 0.70, 50_000, latency=0.1),  # the fastest: on the front
        row("unmeasured", 0.99, 10, latency=None),  # missing an objective: never on the front
    ]
    assert pareto_front(rows) == [0, 1, 3, 5]
    assert dominates(rows[1], rows[2], ["val_acc"], ["parameters"]) and not dominates(rows[0], rows[1], [], [])
    assert not dominates(rows[3], rows[3], ["val_acc"], ["parameters"]), "a row does not dominate itself"
    assert pareto_front(rows[:6], minimize=("parameters",)) == [0, 1, 3, 4], "on accuracy and parameters alone"
    twins = [row("a", 0.8, 10), row("b", 0.8, 10)]
    assert pareto_front(twins) == [0, 1], "equal rows do not dominate each other"


def test_the_chosen_student_is_the_best_within_its_budget():
    rows = [row("big", 0.90, 100_000, latency=3.0), row("mid", 0.85, 20_000, latency=1.0), row("tiny", 0.6, 1000)]
    rows = [{**r, "val_loss": 1 - r["val_acc"]} for r in rows]
    best, note = choose(rows, ChooseSpec(max_params=50_000))
    assert best["trial"] == "mid" and "mid" in note and "parameters <= 50,000" in note
    assert choose(rows, ChooseSpec(max_latency_ms=5.0))[0]["trial"] == "big"
    assert choose(rows, ChooseSpec(max_size_mb=0.01))[0]["trial"] == "tiny", "4,000 bytes <= 10 kB"
    assert choose(rows, ChooseSpec(max_params=50_000, max_latency_ms=0.5), "val_loss", "min")[0] is None
    best, _ = choose(rows, ChooseSpec(max_latency_ms=2.0), "val_loss", "min")
    assert best["trial"] == "mid"
    none, note = choose(rows, ChooseSpec(max_params=10))
    assert none is None and "No finished trial fits" in note and "parameters 1,000" in note


@pytest.mark.parametrize(
    "change,message",
    [
        ({"scheduler": "hyperband"}, "scheduler"),
        ({"scheduler": {"asha": {"reduction_factor": 1}}}, "reduction_factor"),
        ({"scheduler": {"asha": {"grace_period": 0}}}, "grace_period"),
        ({"choose": {}}, "give a budget"),
        ({"choose": {"max_params": 10, "export": "tflite"}}, "export"),
    ],
)
def test_bad_scheduler_and_choose_specs_are_clear_errors(change, message):
    base = {"stage": "student", "space": {"optim.lr": {"grid": [0.001]}}}
    with pytest.raises(SpecError, match=message):
        parse_sweep({**base, **change})


def test_scheduler_spellings():
    base = {"stage": "student", "space": {"optim.lr": {"grid": [0.001]}}}
    assert parse_sweep(base).asha is None and parse_sweep({**base, "scheduler": "none"}).asha is None
    assert parse_sweep({**base, "scheduler": "asha"}).asha == AshaSpec()
    sw = parse_sweep({**base, "scheduler": {"asha": {"grace_period": 2, "max_t": 4}}, "choose": {"max_params": 9}})
    assert sw.options()["scheduler"] == AshaSpec(grace_period=2, max_t=4)
    assert sw.options()["choose"].max_params == 9


def test_the_example_sweeps_parse():
    paths = sorted((REPO / "examples" / "sweeps").glob("*.yaml"))
    assert paths
    sweeps = {p.name: load_sweep(str(p)) for p in paths}
    asha = sweeps["fmnist_students_asha.yaml"]
    assert asha.asha == AshaSpec(grace_period=1, reduction_factor=2) and asha.choose.max_params == 60000
    assert len(sample_settings(asha)) == 16


@pytest.mark.slow
def test_asha_stops_a_bad_trial_and_the_chosen_student_is_published_exported_and_usable(tmp_path, ray_local):
    spec = parse_pipeline(synthetic_pipeline(tmp_path, workers=1, extra_stages=[STUDENT]))
    trials = [
        {"model.name": "mlp_64", "optim.lr": 0.003},
        {"model.name": "mlp_32", "optim.lr": 0.003},
        {"model.name": "mlp_64", "optim.lr": 1e-7},  # learns nothing: ASHA stops it at its first rung
    ]
    asha = AshaSpec(grace_period=1, reduction_factor=2)
    logs: list[str] = []
    report = run_sweep(
        spec,
        "student",
        trials,
        max_concurrent=1,  # in order: the good trials set the rungs the bad one is cut at
        scheduler=asha,
        choose=ChooseSpec(max_params=1_000_000),
        latency_batch=16,
        latency_runs=3,
        log=logs.append,
    )
    by = {t["trial"]: t for t in report["trials"]}
    bad = by["student-t2"]
    assert bad["status"] == "stopped" and bad["epoch"] == 1 and bad["uri"] is None
    assert bad["rank"] == 3 and report["stopped"] >= 1
    assert by["student-t0"]["status"] == "ran", "the first trial sets every rung: it is never stopped"
    sweep = open_artifact(report["uri"])
    md = sweep.read_bytes("sweep.md").decode()
    assert "stopped early at epoch 1" in md and "ASHA" in md and "## Pareto report" in md
    assert {"sweep.json", "sweep.png", "pareto.png"} <= set(sweep.manifest["files"])
    progress = [m for m in logs if "trials done" in m]
    assert len(progress) == 3 and "3/3 trials done" in progress[-1] and "best so far" in progress[-1]

    finished = [t for t in report["trials"] if t["status"] != "stopped"]
    assert [r["trial"] for r in report["pareto"]] == [t["trial"] for t in finished], "stopped trials have no row"
    assert all(r["parameters"] > 0 and r["size_bytes"] > 0 and r["latency_ms"] > 0 for r in report["pareto"])
    assert any(r["pareto"] for r in report["pareto"])

    chosen = report["chosen"]
    best = max(finished, key=lambda t: t["val_acc"])
    assert chosen["trial"] == best["trial"] and chosen["uri"].endswith("/chosen")
    art = open_artifact(chosen["uri"])
    assert art.manifest["chosen"]["trial"] == best["trial"]
    assert art.weights_sha256 == open_artifact(best["uri"]).weights_sha256
    assert chosen["export"]["format"] == "onnx" and chosen["export"]["max_abs_diff"] <= 1e-4
    assert json.loads(art.read_bytes("history.json"))[-1]["epoch"] == 3
    assert "## Chosen student" in md and chosen["uri"] in md

    # a later pipeline reads the chosen student by its URI: evaluated here on the test split, once
    later = parse_pipeline(
        {
            "name": "later",
            "storage": {"uri": f"file://{tmp_path}/later"},
            "stages": [{"name": "eval", "kind": "evaluate", "models": [chosen["uri"]], "exported": ["onnx"]}],
        }
    )
    (outcome,) = run_pipeline(later, log=lambda m: None)
    (evaluated,) = open_artifact(outcome.uri).read_json("report.json")["models"]
    assert evaluated["uri"] == chosen["uri"] and evaluated["top1"] > 0.5
    assert evaluated["onnx_top1"] == pytest.approx(evaluated["top1"], abs=1e-6), "its ONNX export, evaluated beside it"

    # rerun (as after an interruption): the finished trials are cached, the stopped one runs again;
    # a budget nothing fits publishes no chosen student and says so
    again = run_sweep(
        spec,
        "student",
        trials,
        max_concurrent=1,
        scheduler=asha,
        choose=ChooseSpec(max_params=10),
        latency_batch=16,
        latency_runs=3,
        log=lambda m: None,
    )
    by_again = {t["trial"]: t for t in again["trials"]}
    for t in finished:
        assert by_again[t["trial"]]["status"] == "cached" and by_again[t["trial"]]["uri"] == t["uri"]
    assert by_again["student-t2"]["status"] == "stopped"
    assert again["chosen"]["uri"] is None and "No finished trial fits" in again["chosen"]["note"]


def test_asha_needs_the_loop_inside_the_trial(tmp_path):
    spec = parse_pipeline(synthetic_pipeline(tmp_path, workers=2, extra_stages=[STUDENT]))
    with pytest.raises(SpecError, match="scheduler asha"):
        run_sweep(spec, "student", [{"optim.lr": 0.001}], scheduler=AshaSpec(), log=lambda m: None)


@pytest.mark.slow
def test_the_sweep_flow_publishes_the_chosen_student(tmp_path, ray_local):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.testing.utilities import prefect_test_harness

    from flows.sweep import sweep_flow

    spec = tmp_path / "p.yaml"
    student = {**STUDENT, "optim": {"epochs": 2, "batch_size": 32}}
    spec.write_text(yaml.safe_dump(synthetic_pipeline(tmp_path, workers=1, extra_stages=[student])))
    sweep = tmp_path / "s.yaml"
    doc = {
        "stage": "student",
        "space": {"optim.lr": {"grid": [0.003, 1e-7]}},
        "max_concurrent": 1,
        "scheduler": {"asha": {"grace_period": 1, "reduction_factor": 2}},
        "choose": {"max_params": 1_000_000, "export": "onnx"},
        "latency_batch": 16,
    }
    sweep.write_text(yaml.safe_dump({"sweep": doc}))
    with prefect_test_harness(server_startup_timeout=120):
        result = sweep_flow(str(spec), str(sweep))
        with get_client(sync_client=True) as client:
            keys = [result["key"], f"{result['key']}-chosen"]
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    by_key = {a.key: a for a in artifacts}
    chosen = result["chosen"]
    assert chosen["trial"] == "student-t0" and result["stopped"] == 1
    assert open_artifact(chosen["uri"]).manifest["chosen"]["trial"] == "student-t0"
    link = by_key[f"{result['key']}-chosen"]  # Prefect stores a link artifact as a Markdown link
    assert link.data == f"[student-t0 (mlp_64)]({chosen['uri']})"
    md = by_key[result["key"]].data
    assert "Chosen student" in md and "stopped early at epoch 1" in md and "max abs difference" in md
