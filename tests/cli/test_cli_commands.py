"""The CLI's cluster and sweep commands on real runs: score, render, submit errors."""

from __future__ import annotations

import yaml
from helpers import synthetic_pipeline
from typer.testing import CliRunner

from kdray.cli import app
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline

runner = CliRunner()
DATA = {"name": "synthetic", "options": {"num_samples": 256, "image_size": 8, "num_classes": 4}}


def test_score_ranks_candidate_sources(tmp_path):
    doc = synthetic_pipeline(tmp_path, epochs=3)
    doc["stages"].append({**doc["stages"][0], "name": "weak", "optim": {"epochs": 1, "batch_size": 256, "lr": 1e-6}})
    doc["stages"].append(
        {
            "name": "target",
            "kind": "transfer",
            "source": "auto",
            "candidates": ["weak", "teacher"],
            "model": {"name": "cnn_small"},
            "data": {**DATA, "labels_per_class": 20},
        }
    )
    run_pipeline(parse_pipeline(doc), only=["teacher", "weak"], log=lambda m: None)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["score", str(path), "--stage", "target", "--layers"])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("| 1 |")]
    assert lines and "teacher" in lines[0], result.output
    assert "features.0" in result.output and "ranking: file://" in result.output


def test_score_needs_a_transfer_stage(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(synthetic_pipeline(tmp_path)))
    result = runner.invoke(app, ["score", str(path), "--stage", "teacher"])
    assert result.exit_code == 2 and "is a train stage" in result.output


def test_render_prints_valid_rayjobs(tmp_path):
    doc = synthetic_pipeline(tmp_path, workers=2)
    doc["storage"] = {"uri": "s3://kdray-bucket/runs"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["render", str(path)])
    assert result.exit_code == 0, result.output
    job = next(d for d in yaml.safe_load_all(result.output) if d and d.get("kind") == "RayJob")
    assert "kdray.worker" in job["spec"]["entrypoint"] and "s3://kdray-bucket/runs" in job["spec"]["entrypoint"]


def test_submit_to_an_unreachable_cluster_is_exit_2(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(synthetic_pipeline(tmp_path, address="http://127.0.0.1:9")))
    result = runner.invoke(app, ["submit", str(path), "--launcher", "ray"])
    assert result.exit_code == 2 and "127.0.0.1:9" in result.output and "Traceback" not in result.output


def test_sweep_command_rejects_a_bad_grid(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(synthetic_pipeline(tmp_path)))
    result = runner.invoke(app, ["sweep", str(path), "--stage", "nope", "--grid", "optim.lr=0.1,0.2"])
    assert result.exit_code == 2 and "no such stage" in result.output
