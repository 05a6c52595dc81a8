"""The transfer stage end to end: mapping applied in the workers, layer rules, report, source: auto."""

from __future__ import annotations

import pytest
import torch
from helpers import synthetic_pipeline

from kdray.contracts.checkpoint import open_artifact
from kdray.core.errors import KdrayError
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline

TARGET_DATA = {
    "name": "synthetic",
    "classes": [2, 3],
    "options": {"num_samples": 256, "image_size": 8, "num_classes": 4},
}


def target(transfer=None, model="cnn_small", source="teacher", **kw):
    return {
        "name": "target",
        "kind": "transfer",
        "source": source,
        "model": {"name": model},
        "data": TARGET_DATA,
        "optim": {"epochs": 2, "batch_size": 32, "lr": 3e-3},
        "transfer": transfer or {},
        **kw,
    }


def run(doc, logs=None):
    return run_pipeline(parse_pipeline(doc), log=(logs.append if logs is not None else lambda m: None))


def test_new_head_freeze_and_report(tmp_path):
    logs = []
    transfer = {
        "mapping": [{"match": "name"}],
        "layers": [{"select": "features.0*", "action": "freeze"}],
        "batchnorm": "frozen",
    }
    out = run(synthetic_pipeline(tmp_path, extra_stages=[target(transfer)]), logs)
    source, tgt = open_artifact(out[0].uri), open_artifact(out[1].uri)
    report = tgt.read_json("transfer_report.json")
    entries = {e["key"]: e for e in report["tensors"]}
    assert set(entries) == set(tgt.state_dict()), "every target tensor is reported exactly once"
    assert entries["classifier.weight"]["status"] == "reinitialised"
    assert "4 -> 2" in entries["classifier.weight"]["reason"]
    assert entries["features.0.0.0.weight"]["frozen"] is True
    s, t = source.state_dict(), tgt.state_dict()
    assert torch.equal(s["features.0.0.0.weight"], t["features.0.0.0.weight"]), "frozen: unchanged by training"
    assert torch.equal(s["features.0.0.1.running_mean"], t["features.0.0.1.running_mean"]), "frozen BatchNorm stats"
    assert not torch.equal(s["features.1.0.0.weight"], t["features.1.0.0.weight"]), "unfrozen layers trained"
    assert tgt.manifest["transfer"]["copied"] > 0 and tgt.manifest["source"]["uri"] == source.uri
    assert any("classifier.weight" in m for m in logs), "the report table goes to the log"
    assert tgt.manifest["history"][-1]["val_acc"] > 0.8


def test_l2sp_and_lr_scale_train(tmp_path):
    transfer = {
        "layers": [{"select": "features.*", "action": "lr_scale", "lr_scale": 0.1}],
        "l2sp": {"alpha": 0.01, "beta": 0.0001},
    }
    out = run(synthetic_pipeline(tmp_path, extra_stages=[target(transfer)]))
    hist = open_artifact(out[1].uri).manifest["history"]
    assert len(hist) == 2 and hist[-1]["train_loss"] < hist[0]["train_loss"] * 1.5


def test_cross_architecture_by_shape(tmp_path):
    out = run(
        synthetic_pipeline(tmp_path, extra_stages=[target({"mapping": [{"match": "shape"}]}, model="resnet_small")])
    )
    report = open_artifact(out[1].uri).read_json("transfer_report.json")
    assert any(e["status"] == "copied" for e in report["tensors"])


def test_name_mapping_across_architectures_fails_before_training(tmp_path):
    with pytest.raises(KdrayError, match="resnet_small") as err:
        run(synthetic_pipeline(tmp_path, extra_stages=[target({"mapping": [{"match": "name"}]}, model="resnet_small")]))
    assert "cnn_small" in str(err.value)


def test_rule_that_matches_nothing(tmp_path):
    bad = {"mapping": [{"match": "explicit", "pairs": {"head.*": "classifier.*"}}]}
    with pytest.raises(KdrayError, match="head"):
        run(synthetic_pipeline(tmp_path, extra_stages=[target(bad)]))


def test_source_auto_picks_the_better_candidate(tmp_path):
    doc = synthetic_pipeline(tmp_path, epochs=3)
    weak = {**doc["stages"][0], "name": "weak", "optim": {"epochs": 1, "batch_size": 256, "lr": 1e-6}}
    doc["stages"].append(weak)
    doc["stages"].append(target(source="auto", candidates=["weak", "teacher"]))
    out = run(doc)
    manifest = open_artifact(out[2].uri).manifest
    ranking = manifest["source"]["ranking"]
    assert [r["ref"] for r in ranking][0] == "teacher" and ranking[0]["logme"] > ranking[1]["logme"]
    assert manifest["source"]["uri"] == out[0].uri


def test_same_sized_head_for_other_classes_starts_fresh(tmp_path):
    """Source on classes 0-1, target on classes 2-3: the head has the right shape, the wrong meaning."""
    doc = synthetic_pipeline(tmp_path)
    doc["stages"][0]["data"] = {**TARGET_DATA, "classes": [0, 1]}
    logs = []
    out = run({**doc, "stages": [*doc["stages"], target()]}, logs)
    report = open_artifact(out[1].uri).read_json("transfer_report.json")
    head = next(e for e in report["tensors"] if e["key"] == "classifier.weight")
    assert head["status"] == "reinitialised"
    assert any("the classifier head starts fresh" in m for m in logs)
    copied = next(e for e in report["tensors"] if e["key"] == "features.0.0.0.weight")
    assert copied["status"] == "copied"


def test_share_trains_two_tasks_with_one_trunk(tmp_path):
    """Joint parameter sharing: tasks A (classes 0-1) and B (classes 2-3) train one tied trunk."""
    doc = synthetic_pipeline(tmp_path)
    share = {
        "name": "joint",
        "kind": "share",
        "model": {"name": "cnn_small"},
        "data": {**TARGET_DATA, "classes": [0, 1]},
        "data_b": TARGET_DATA,
        "shared": ["features.*", "head"],
        "optim": {"epochs": 2, "batch_size": 32, "lr": 3e-3},
    }
    logs = []
    out = run(
        {**doc, "stages": [doc["stages"][0], share, {"name": "eval", "kind": "evaluate", "models": ["joint"]}]}, logs
    )
    art = open_artifact(out[1].uri)
    row = open_artifact(out[2].uri).read_json("report.json")["models"][0]
    assert (
        row["top1"] > 0.8
        and open_artifact(out[2].uri).read_json("report.json")["data"] == art.manifest["spec"]["data_b"]
    ), "evaluated on task B"
    assert art.manifest["shared"] == ["features.0", "features.1", "head"]
    assert art.manifest["model"]["kwargs"]["num_classes"] == 2
    assert art.manifest["history"][-1]["val_acc"] > 0.8, "task B learnt through the shared trunk"
    assert any("tied modules" in m for m in logs)


def test_share_with_a_glob_that_matches_nothing(tmp_path):
    doc = synthetic_pipeline(tmp_path)
    share = {
        "name": "joint",
        "kind": "share",
        "model": {"name": "cnn_small"},
        "data": TARGET_DATA,
        "data_b": TARGET_DATA,
        "shared": ["trunk.*"],
    }
    with pytest.raises(KdrayError, match="trunk"):
        run({**doc, "stages": [share]})
