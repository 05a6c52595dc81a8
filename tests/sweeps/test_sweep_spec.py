"""Sweeps from a spec: search spaces (grid, choice, uniform, loguniform, randint), samples, validation metrics."""

from __future__ import annotations

import math

import pytest
import yaml
from helpers import synthetic_pipeline
from typer.testing import CliRunner

from kdray.cli import app
from kdray.contracts.checkpoint import open_artifact
from kdray.core.errors import SpecError
from kdray.engine.spec import parse_pipeline
from kdray.sweeps.spec import parse_sweep, sample_settings
from kdray.sweeps.sweep import expand, run_sweep

STUDENT = {
    "name": "student",
    "kind": "distill",
    "teacher": "teacher",
    "model": {"name": "mlp_64"},
    "data": {"name": "synthetic", "options": {"num_samples": 256, "image_size": 8, "num_classes": 4}},
    "optim": {"epochs": 2, "batch_size": 32},
}
SWEEP = {
    "stage": "student",
    "space": {
        "model.name": {"grid": ["mlp_32", "mlp_64"]},
        "optim.lr": {"loguniform": [1e-4, 1e-2]},
        "optim.weight_decay": {"uniform": [0.0, 0.1]},
        "optim.batch_size": {"randint": [16, 65]},
        "loss_weight": {"choice": [0.5, 1.0]},
    },
    "num_samples": 3,
    "seed": 7,
}


def test_sampled_trials_cover_the_grid_and_stay_in_their_ranges():
    sweep = parse_sweep({"sweep": SWEEP})
    trials = sample_settings(sweep)
    assert len(trials) == 2 * 3, "the grid crossed, num_samples times"
    assert [t["model.name"] for t in trials] == ["mlp_32", "mlp_64"] * 3
    for t in trials:
        assert 1e-4 <= t["optim.lr"] <= 1e-2 and 0 <= t["optim.weight_decay"] <= 0.1
        assert isinstance(t["optim.batch_size"], int) and 16 <= t["optim.batch_size"] < 65
        assert t["loss_weight"] in (0.5, 1.0)
    assert sample_settings(sweep) == trials, "seeded: the same spec gives the same trials (so a rerun resumes)"
    assert sample_settings(parse_sweep({**SWEEP, "seed": 8})) != trials
    lrs = [math.log10(t["optim.lr"]) for t in sample_settings(parse_sweep({**SWEEP, "num_samples": 200}))]
    assert min(lrs) < -3.5 and max(lrs) > -2.5, "log-uniform spreads over the decades"


def test_sampled_trials_expand_into_stages(tmp_path):
    spec = parse_pipeline(synthetic_pipeline(tmp_path, extra_stages=[STUDENT]))
    space = {k: v for k, v in SWEEP["space"].items() if k != "loss_weight"}
    trials = sample_settings(parse_sweep({**SWEEP, "space": space, "num_samples": 2}))
    doc, rows = expand(spec, "student", trials)
    expanded = parse_pipeline(doc)
    assert [r["trial"] for r in rows] == [f"student-t{i}" for i in range(4)]
    assert expanded.stage("student-t3").optim.lr == trials[3]["optim.lr"]
    assert expanded.stage("student-t1").model.name == "mlp_64"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"metric": "test_acc"}, "validation split only"),
        ({"mode": "best"}, "max or min"),
        ({"space": {}}, "space"),
        ({"space": {"optim.lr": {"uniform": [0.1, 0.01]}}}, "low < high"),
        ({"space": {"optim.lr": {"loguniform": [0, 0.01]}}}, "low > 0"),
        ({"space": {"optim.lr": {"grid": [1], "choice": [2]}}}, "exactly one"),
        ({"space": {"optim.lr": {"normal": [0, 1]}}}, "normal"),
        ({"num_samples": 0}, "num_samples"),
    ],
)
def test_bad_sweep_specs_are_clear_errors(change, message):
    with pytest.raises(SpecError, match=message):
        parse_sweep({**SWEEP, **change})


def test_cli_refuses_a_test_metric_and_a_sweep_without_a_space(tmp_path):
    spec = tmp_path / "p.yaml"
    spec.write_text(yaml.safe_dump(synthetic_pipeline(tmp_path, extra_stages=[STUDENT])))
    bad = CliRunner().invoke(
        app, ["sweep", str(spec), "--stage", "student", "--grid", "optim.lr=0.001,0.01", "--metric", "test_acc"]
    )
    assert bad.exit_code == 2 and "validation split only" in bad.output
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"sweep": {**SWEEP, "metric": "test_acc"}}))
    bad = CliRunner().invoke(app, ["sweep", str(spec), "--sweep", str(sweep)])
    assert bad.exit_code == 2 and "test_acc" in bad.output
    none = CliRunner().invoke(app, ["sweep", str(spec)])
    assert none.exit_code == 2 and "--sweep" in none.output


@pytest.mark.slow
def test_a_sweep_from_a_spec_runs_its_sampled_trials(tmp_path, ray_local):
    spec = parse_pipeline(synthetic_pipeline(tmp_path, workers=1, extra_stages=[STUDENT]))
    sweep = parse_sweep(
        {
            "stage": "student",
            "space": {"optim.lr": {"loguniform": [3e-4, 3e-2]}},
            "num_samples": 2,
            "metric": "val_loss",
            "mode": "min",
        }
    )
    report = run_sweep(
        spec, sweep.stage, sample_settings(sweep), metric=sweep.metric, mode=sweep.mode, log=lambda m: None
    )
    losses = [t["val_loss"] for t in report["trials"]]
    assert len(losses) == 2 and losses == sorted(losses), "ranked by val_loss, lowest first"
    assert {open_artifact(t["uri"]).manifest["spec"]["optim"]["lr"] for t in report["trials"]} == {
        s["optim.lr"] for s in sample_settings(sweep)
    }


@pytest.mark.slow
def test_the_sweep_flow_publishes_the_ranked_report(tmp_path, ray_local):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.testing.utilities import prefect_test_harness

    from flows.sweep import sweep_flow

    spec = tmp_path / "p.yaml"
    spec.write_text(yaml.safe_dump(synthetic_pipeline(tmp_path, workers=1, extra_stages=[STUDENT])))
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"sweep": {"stage": "student", "space": {"optim.lr": {"grid": [0.001, 0.01]}}}}))
    with prefect_test_harness(server_startup_timeout=120):
        result = sweep_flow(str(spec), str(sweep))
        with get_client(sync_client=True) as client:
            (artifact,) = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[result["key"]]))
            )
    assert result["key"] == "synth-student-sweep" and result["best"]["rank"] == 1
    assert artifact.type == "markdown" and "student-t0" in artifact.data and result["uri"] in artifact.data
