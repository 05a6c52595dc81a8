"""Fault tolerance and placement on real Ray: a killed worker, several nodes on one machine."""

from __future__ import annotations

import json

import pytest
from helpers import synthetic_pipeline
from helpers.raynodes import ray_nodes

from kdray.contracts.stage import StageContext
from kdray.core.storage import Storage
from kdray.engine.driver import fit
from kdray.engine.pipeline import plan
from kdray.engine.spec import parse_pipeline

pytestmark = pytest.mark.slow


def job_for(tmp_path, **extras):
    doc = synthetic_pipeline(tmp_path, workers=2, epochs=4, max_failures=1, cpus_per_worker=1)
    doc["stages"][0]["data"]["options"]["num_samples"] = 2048  # epochs of about a second: checkpoints commit
    spec = parse_pipeline(doc)
    root = Storage(spec.storage.uri)
    key = plan(spec)["teacher"]
    ctx = StageContext(spec, spec.stages[0], key, root.child(f"synth/teacher/{key}"), root, {}, lambda m: None)
    return ctx.job(**extras), root


def test_a_killed_worker_resumes_from_the_last_checkpoint(tmp_path, ray_local):
    """Rank 1's process is killed (SIGKILL) in the middle of epoch 3: Ray restarts the worker group,
    which resumes from the last committed checkpoint, so at most one epoch is trained again."""
    marker = tmp_path / "killed"
    job, root = job_for(tmp_path, fault={"epoch": 2, "step": 3, "rank": 1, "marker": str(marker), "how": "kill"})
    result = fit(job, root)
    assert marker.exists(), "the fault fired"
    resumed = [h["resumed"] for h in result.history]
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert resumed[0] == 0 and resumed[-1] == 1, "the run resumed once"
    assert resumed in ([0, 0, 1, 1], [0, 1, 1, 1]), f"at most one finished epoch trained again: {resumed}"
    assert result.history[-1]["val_acc"] > 0.6


def test_three_nodes_train_one_stage(tmp_path):
    """A Ray cluster of three worker nodes (plus a head with no CPUs) on this machine; every rank
    lands on a different node. ray.cluster_utils.Cluster starts real raylets."""
    with ray_nodes(3, cpus=1) as cluster:
        spec = parse_pipeline(synthetic_pipeline(tmp_path, workers=3, epochs=1, cpus_per_worker=1))
        root = Storage(spec.storage.uri)
        key = plan(spec)["teacher"]
        ctx = StageContext(spec, spec.stages[0], key, root.child(f"synth/teacher/{key}"), root, {}, lambda m: None)
        log_dir = tmp_path / "placement"
        result = fit(ctx.job(placement_log=str(log_dir)), root)
        ranks = [json.loads(p.read_text()) for p in sorted(log_dir.glob("rank*.json"))]
        assert [r["rank"] for r in ranks] == [0, 1, 2]
        assert len({r["node_id"] for r in ranks}) == 3, "each rank on its own node"
        assert cluster.head_node.unique_id not in {r["node_id"] for r in ranks}
        assert result.history[-1]["val_acc"] > 0.3
