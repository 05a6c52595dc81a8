"""The training loop and pipelines: local mode, real Ray workers, resume, lineage cache, determinism."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import quiet, synthetic_pipeline

from kdray.contracts.checkpoint import open_artifact
from kdray.contracts.stage import StageContext
from kdray.core.storage import Storage
from kdray.engine.driver import fit
from kdray.engine.pipeline import plan, run_pipeline
from kdray.engine.spec import parse_pipeline

EVAL = {"name": "eval", "kind": "evaluate", "models": ["teacher"]}


def test_local_pipeline_trains_evaluates_and_caches(tmp_path):
    spec = parse_pipeline(synthetic_pipeline(tmp_path, extra_stages=[EVAL], epochs=3))
    first = run_pipeline(spec, log=quiet)
    assert [o.status for o in first] == ["ran", "ran"]
    teacher = open_artifact(first[0].uri)
    hist = teacher.manifest["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3] and hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["val_acc"] > 0.6 and "test_acc" not in hist[-1], (
        "synthetic prototypes are learnable: well above 1/4 chance"
    )
    assert teacher.manifest["model"]["kwargs"] == {"num_classes": 4, "in_channels": 1, "image_size": 8, "dropout": 0.0}
    report = open_artifact(first[1].uri)
    files = report.store.list()
    assert {f.rsplit("/", 1)[-1] for f in files} >= {"report.json", "report.md", "curves.png", "manifest.json"}
    rows = report.read_json("report.json")["models"]
    assert rows[0]["stage"] == "teacher" and rows[0]["top1"] > 0.6, "the test split, read once by the evaluation"
    assert "validation" in rows[0]["selection"]
    assert rows[0]["parameters"] > 0 and rows[0]["latency_ms"] > 0 and rows[0]["bytes"] > 0

    again = run_pipeline(spec, log=quiet)
    assert [o.status for o in again] == ["cached", "cached"]
    assert open_artifact(again[0].uri).manifest == teacher.manifest

    forced = run_pipeline(spec, force=["eval"], log=quiet)
    assert [o.status for o in forced] == ["cached", "ran"]


def test_changing_a_stage_reruns_it_and_its_descendants_only(tmp_path):
    doc = synthetic_pipeline(tmp_path, extra_stages=[EVAL], epochs=1)
    keys = plan(parse_pipeline(copy.deepcopy(doc)))
    changed = copy.deepcopy(doc)
    changed["stages"][1]["latency_batches"] = 3
    keys2 = plan(parse_pipeline(changed))
    assert keys["teacher"] == keys2["teacher"] and keys["eval"] != keys2["eval"]
    changed["stages"][0]["optim"]["lr"] = 0.01
    keys3 = plan(parse_pipeline(changed))
    assert keys3["teacher"] != keys["teacher"] and keys3["eval"] != keys2["eval"]
    # placement (workers, GPUs) does not change results' identity; the seed does
    assert plan(parse_pipeline({**copy.deepcopy(doc), "run": {"workers": 2}})) == keys
    assert plan(parse_pipeline({**copy.deepcopy(doc), "run": {"workers": 0, "seed": 1}}))["teacher"] != keys["teacher"]


def test_training_is_deterministic_on_cpu(tmp_path):
    a = run_pipeline(parse_pipeline(synthetic_pipeline(tmp_path / "a")), log=quiet)[0]
    b = run_pipeline(parse_pipeline(synthetic_pipeline(tmp_path / "b")), log=quiet)[0]
    assert open_artifact(a.uri).weights_sha256 == open_artifact(b.uri).weights_sha256


@pytest.mark.slow
def test_two_ray_workers(tmp_path, ray_local):
    spec = parse_pipeline(synthetic_pipeline(tmp_path, workers=2, epochs=2))
    out = run_pipeline(spec, log=quiet)[0]
    art = open_artifact(out.uri)
    hist = art.manifest["history"]
    assert len(hist) == 2 and hist[-1]["val_acc"] > 0.6
    # Ray kept its own checkpoints of the run in storage, under the deterministic run name
    run_dir = art.manifest["ray_run"]
    assert run_dir.endswith(f"synth-teacher-{out.key}")
    assert any("checkpoint_" in p for p in Storage(f"file://{run_dir}").list())
    # --force trains again from scratch (it does not resume the finished run from its last checkpoint)
    again = open_artifact(run_pipeline(spec, force=True, log=quiet)[0].uri).manifest["history"]
    assert len(again) == 2 and again[0]["loop_started"] > hist[0]["loop_started"] and again[0]["resumed"] == 0


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, ray_local):
    spec = parse_pipeline(synthetic_pipeline(tmp_path, workers=1, epochs=3, max_failures=0))
    root = Storage(spec.storage.uri)
    key = plan(spec)["teacher"]
    ctx = StageContext(spec, spec.stages[0], key, root.child(f"synth/teacher/{key}"), root, {}, quiet)
    job = ctx.job(fault={"epoch": 1, "step": 2, "rank": 0, "marker": str(tmp_path / "fired"), "how": "raise"})
    with pytest.raises(Exception, match="injected fault"):
        fit(job, root)
    result = fit(job, root)  # the same RunConfig(name, storage_path): Ray finds the run and resumes
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert [h["resumed"] for h in result.history] == [0, 1, 1], "epoch 1 was kept, not trained again"


def test_an_interrupted_in_process_run_resumes_from_its_checkpoint_in_storage(tmp_path):
    """``workers: 0`` checkpoints to storage like Ray Train does: a rerun resumes, a half-written one is skipped."""
    spec = parse_pipeline(synthetic_pipeline(tmp_path, workers=0, epochs=3))
    root = Storage(spec.storage.uri)
    key = plan(spec)["teacher"]
    ctx = StageContext(spec, spec.stages[0], key, root.child(f"synth/teacher/{key}"), root, {}, quiet)
    job = ctx.job(fault={"epoch": 2, "step": 1, "rank": 0, "marker": str(tmp_path / "fired"), "how": "raise"})
    with pytest.raises(Exception, match="injected fault"):
        fit(job, root)
    run_dir = f"_ray/{job.run_name}/in_process"
    assert [p.rsplit("/", 1)[-1] for p in root.list(run_dir)] == ["checkpoint_000001", "checkpoint_000002"]
    # a checkpoint whose upload stopped half-way (no COMPLETE marker) is never resumed from
    root.write_bytes(f"{run_dir}/checkpoint_000003/method.safetensors", b"half")
    result = fit(job, root)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert [h["resumed"] for h in result.history] == [0, 0, 1], "epochs 1 and 2 were kept, not trained again"
    assert result.run_path and result.run_path.endswith(run_dir)
    fresh = fit(ctx.job(), Storage(f"file://{tmp_path / 'fresh'}"))
    assert fresh.model_state.keys() == result.model_state.keys()
    assert all(torch.equal(fresh.model_state[k], result.model_state[k]) for k in fresh.model_state), (
        "resuming gives the weights of an uninterrupted run"
    )


def test_worker_errors_surface_as_user_errors(tmp_path):
    doc = synthetic_pipeline(tmp_path)
    (tmp_path / "empty").mkdir()  # a folder that exists (a missing one is refused before any stage starts)
    doc["stages"][0]["data"] = {"name": "fashion_mnist", "path": str(tmp_path / "empty")}
    from kdray.core.errors import DataError

    with pytest.raises(DataError, match="no train-images"):
        run_pipeline(parse_pipeline(doc), log=quiet)
    assert not list((tmp_path / "runs").rglob("manifest.json")), "a failed stage publishes nothing"
