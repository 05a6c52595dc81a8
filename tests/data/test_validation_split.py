"""Honest model selection: a seeded, stratified validation split, and no choice that reads the test split.

The poisoning tests run the same pipeline twice, once with the test split's labels shuffled
(``shuffle_test_labels``, an option of the synthetic dataset): every choice (the epochs' metrics, the
adapt stage's selected epoch, ``source: auto``, a sweep's ranking) must come out identical, while the
evaluation, the one reader of the test split, sees the poison.
"""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from helpers import synthetic_pipeline

from kdray.contracts.checkpoint import open_artifact
from kdray.contracts.specs import DataSpec
from kdray.core.errors import DataError, SpecError
from kdray.data import datasets as kdata
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline
from kdray.sweeps.spec import parse_grid
from kdray.sweeps.sweep import check_metric, run_sweep

DATA = {"name": "synthetic", "options": {"num_samples": 256, "image_size": 8, "num_classes": 4}}
TIMING = {"samples_per_s", "epoch_seconds", "loop_started"}


def rows(split: kdata.Split) -> set[str]:
    return {hashlib.sha256(r.numpy().tobytes()).hexdigest() for r in split.x}


def test_validation_split_is_disjoint_stratified_and_stable():
    spec = DataSpec(name="synthetic", options={"num_samples": 512}, seed=5)
    train, val, test = (kdata.load(spec, s) for s in ("train", "val", "test"))
    assert len(val) == round(0.1 * 512) and len(train) + len(val) == 512, "carved out of the training pool"
    assert not rows(train) & rows(val) and not rows(val) & rows(test) and not rows(train) & rows(test)
    assert sorted(torch.bincount(val.y).tolist()) == [12, 13, 13, 13], "stratified: each class its share"
    again = kdata.load(spec, "val")
    assert torch.equal(again.x, val.x) and torch.equal(again.y, val.y) and again.fingerprint == val.fingerprint
    # carved before limit and label withholding: the same rows, all labelled, whatever those settings are
    scarce = kdata.load(spec.model_copy(update={"limit": 100, "labels_per_class": 2}), "val")
    assert torch.equal(scarce.x, val.x) and bool((scarce.y >= 0).all())
    assert len(kdata.load(spec.model_copy(update={"limit": 100}), "train")) == 100
    # another seed, another validation split; an absolute size; off
    assert not torch.equal(kdata.load(spec.model_copy(update={"seed": 6}), "val").x, val.x)
    assert len(kdata.load(spec.model_copy(update={"val_size": 40}), "val")) == 40
    off = spec.model_copy(update={"val_fraction": 0.0})
    assert len(kdata.load(off, "val")) == 0 and len(kdata.load(off, "train")) == 512


def test_validation_split_of_a_class_subset_and_a_real_dataset():
    spec = DataSpec(name="digits", classes=[3, 5, 7])
    train, val, test = (kdata.load(spec, s) for s in ("train", "val", "test"))
    assert set(val.y.tolist()) == {0, 1, 2} and val.num_classes == 3
    assert not rows(train) & rows(val) and not rows(val) & rows(test)


def test_too_large_a_validation_split_is_a_clear_error():
    with pytest.raises(DataError, match="val_size"):
        kdata.load(DataSpec(name="synthetic", options={"num_samples": 16}, val_size=16), "val")


def test_sweep_metric_must_be_a_validation_metric():
    check_metric("val_acc")
    check_metric("val_loss", "min")
    for bad in ("test_acc", "target_acc", "train_loss"):
        with pytest.raises(SpecError, match="validation split only"):
            check_metric(bad)


# --------------------------------------------------------------------------- poisoning the test split


def poisoned(doc: dict) -> dict:
    """The same document with every synthetic dataset's test labels shuffled."""
    doc = copy.deepcopy(doc)

    def walk(node):
        if isinstance(node, dict):
            if node.get("name") == "synthetic" and "options" in node:
                node["options"] = {**node["options"], "shuffle_test_labels": True}
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return doc


def choices(doc: dict) -> dict:
    """Every choice a pipeline run makes, and every per-epoch figure, by stage; plus the evaluation."""
    out = run_pipeline(parse_pipeline(doc), log=lambda m: None)
    found: dict = {}
    for o in out:
        m = open_artifact(o.uri).manifest
        if o.kind == "evaluate":
            found["evaluate"] = open_artifact(o.uri).read_json("report.json")["models"]
            continue
        found[o.stage] = {
            "history": [{k: v for k, v in h.items() if k not in TIMING} for h in m["history"]],
            "weights": m["weights"]["sha256"],
            "source": [{k: v for k, v in r.items() if k != "uri"} for r in (m.get("source") or {}).get("ranking", [])],
            "adapt": {k: (m.get("adapt") or {}).get(k) for k in ("selection", "selected_epoch")},
        }
    return found


def pipeline(tmp_path) -> dict:
    doc = synthetic_pipeline(tmp_path, epochs=3)
    teacher = doc["stages"][0]
    weak = {**teacher, "name": "weak", "optim": {"epochs": 1, "batch_size": 256, "lr": 1e-6}}
    student = {
        "name": "student",
        "kind": "distill",
        "teacher": "teacher",
        "model": {"name": "mlp_32"},
        "data": DATA,
        "optim": {"epochs": 2, "batch_size": 32, "lr": 3e-3},
    }
    target = {
        "name": "target",
        "kind": "transfer",
        "source": "auto",
        "candidates": ["weak", "teacher"],
        "model": {"name": "cnn_small"},
        "data": {**DATA, "classes": [2, 3]},
        "optim": {"epochs": 2, "batch_size": 32, "lr": 3e-3},
    }
    shifted = {**DATA, "shifts": [{"name": "rotation", "degrees": 30}, {"name": "gaussian_noise", "sigma": 0.2}]}
    adapt = {
        "name": "adapt",
        "kind": "adapt",
        "model": {"name": "cnn_small"},
        "source_domain": DATA,
        "target_domain": shifted,
        "method": {"name": "coral"},
        "selection": "source_val",
        "optim": {"epochs": 3, "batch_size": 32, "lr": 3e-3},
    }
    evaluate = {"name": "eval", "kind": "evaluate", "models": ["teacher", "student"]}
    doc["stages"] += [weak, student, target, adapt, evaluate]
    return doc


def test_no_choice_reads_the_test_split(tmp_path):
    clean = choices(pipeline(tmp_path / "clean"))
    dirty = choices(poisoned(pipeline(tmp_path / "dirty")))
    for stage in ("teacher", "weak", "student", "target", "adapt"):
        assert clean[stage] == dirty[stage], f"{stage}: a choice or a per-epoch figure moved with the test labels"
    assert clean["target"]["source"][0]["ref"] == "teacher", "source: auto still chose (on training data)"
    assert clean["adapt"]["adapt"]["selected_epoch"] is not None
    assert all("val_acc" in h and "test_acc" not in h for h in clean["teacher"]["history"])
    # ... while the evaluation, the one reader of the test split, sees the poison
    top1 = {r["stage"]: r["top1"] for r in clean["evaluate"]}
    poisoned_top1 = {r["stage"]: r["top1"] for r in dirty["evaluate"]}
    assert top1["teacher"] > 0.6 and poisoned_top1["teacher"] < top1["teacher"] - 0.3
    assert all("validation" in r["selection"] for r in clean["evaluate"])


def test_oracle_selection_reads_target_validation_labels_not_test(tmp_path):
    shifted = {**DATA, "shifts": [{"name": "rotation", "degrees": 30}]}
    adapt = {
        "name": "adapt",
        "kind": "adapt",
        "model": {"name": "cnn_small"},
        "source_domain": DATA,
        "target_domain": shifted,
        "method": {"name": "coral"},
        "selection": "oracle",
        "optim": {"epochs": 3, "batch_size": 32, "lr": 3e-3},
    }
    clean = choices(synthetic_pipeline(tmp_path / "clean", extra_stages=[adapt]))
    dirty = choices(poisoned(synthetic_pipeline(tmp_path / "dirty", extra_stages=[adapt])))
    assert clean["adapt"] == dirty["adapt"]


@pytest.mark.slow
def test_sweep_ranking_ignores_the_test_split(tmp_path, ray_local):
    student = {
        "name": "student",
        "kind": "distill",
        "teacher": "teacher",
        "model": {"name": "mlp_32"},
        "data": DATA,
        "optim": {"epochs": 2, "batch_size": 32},
    }
    grid = parse_grid(["optim.lr=0.0003,0.01"])
    ranked = []
    for doc in (
        synthetic_pipeline(tmp_path / "clean", workers=1, extra_stages=[student]),
        poisoned(synthetic_pipeline(tmp_path / "dirty", workers=1, extra_stages=[student])),
    ):
        report = run_sweep(parse_pipeline(doc), "student", grid, max_concurrent=2, log=lambda m: None)
        assert report["metric"] == "val_acc"
        ranked.append([(t["trial"], t["val_acc"]) for t in report["trials"]])
    assert ranked[0] == ranked[1]
