"""Sweeps through Ray Tune: trials are cached stages sharing one teacher cache; a ranked report."""

from __future__ import annotations

import pytest
from helpers import synthetic_pipeline

from kdray.contracts.checkpoint import open_artifact
from kdray.core.errors import SpecError
from kdray.engine.spec import parse_pipeline
from kdray.sweeps.spec import parse_grid
from kdray.sweeps.sweep import expand, run_sweep

DATA = {"name": "synthetic", "options": {"num_samples": 256, "image_size": 8, "num_classes": 4}}
STUDENT = {
    "name": "student",
    "kind": "distill",
    "teacher": "teacher",
    "model": {"name": "mlp_64"},
    "data": DATA,
    "optim": {"epochs": 2, "batch_size": 32},
}


def test_grid_parsing_and_expansion(tmp_path):
    grid = parse_grid(["model.name=mlp_32,mlp_64", "optim.lr=[0.001, 0.003]"])
    assert grid == {"model.name": ["mlp_32", "mlp_64"], "optim.lr": [0.001, 0.003]}
    spec = parse_pipeline(synthetic_pipeline(tmp_path, extra_stages=[STUDENT]))
    doc, trials = expand(spec, "student", grid)
    assert [t["trial"] for t in trials] == ["student-t0", "student-t1", "student-t2", "student-t3"]
    assert trials[3]["settings"] == {"model.name": "mlp_64", "optim.lr": 0.003}
    expanded = parse_pipeline(doc)
    assert expanded.stage("student-t3").optim.lr == 0.003 and expanded.stage("student-t0").model.name == "mlp_32"
    with pytest.raises(SpecError, match="no such stage"):
        expand(spec, "nope", grid)
    with pytest.raises(SpecError, match="did you mean 'cnn_small'"):
        parse_pipeline(expand(spec, "student", parse_grid(["model.name=cnn_smal"]))[0])


@pytest.mark.slow
def test_sweep_runs_trials_shares_the_teacher_cache_and_resumes(tmp_path, ray_local, monkeypatch):
    doc = synthetic_pipeline(tmp_path, workers=1, extra_stages=[STUDENT])
    doc["storage"]["uri"] = "file://./runs"  # relative, as in the examples: trials must find the teacher there too
    monkeypatch.chdir(tmp_path)
    spec = parse_pipeline(doc)
    logs = []
    report = run_sweep(
        spec,
        "student",
        parse_grid(["model.name=mlp_32,mlp_64", "optim.lr=0.001,0.01"]),
        max_concurrent=2,
        log=logs.append,
    )
    trials = report["trials"]
    assert len(trials) == 4 and [t["rank"] for t in trials] == [1, 2, 3, 4]
    accs = [t["val_acc"] for t in trials]
    assert accs == sorted(accs, reverse=True) and accs[0] > 0.6
    caches = {open_artifact(t["uri"]).manifest["teacher"]["cache"] for t in trials}
    assert len(caches) == 1 and None not in caches, "all students read one teacher cache"
    assert sum("building teacher cache" in m for m in logs) == 1
    sweep = open_artifact(report["uri"])
    assert {"sweep.json", "sweep.md", "sweep.png"} <= {p.rsplit("/", 1)[-1] for p in sweep.store.list()}

    again = run_sweep(
        spec,
        "student",
        parse_grid(["model.name=mlp_32,mlp_64", "optim.lr=0.001,0.01"]),
        max_concurrent=2,
        log=lambda m: None,
    )
    assert {t["status"] for t in again["trials"]} == {"cached"}, "a finished sweep trains nothing again"
    assert [t["uri"] for t in again["trials"]] == [t["uri"] for t in trials]
