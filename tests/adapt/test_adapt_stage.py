"""The adapt stage end to end: shifted target domain, baseline always, selection rules, bad input."""

from __future__ import annotations

import pytest
from helpers import synthetic_pipeline

from kdray.contracts.checkpoint import open_artifact
from kdray.contracts.specs import DataSpec
from kdray.core.errors import KdrayError
from kdray.core.metrics import metrics_for, predict
from kdray.data import datasets as kdata
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline

SOURCE = {"name": "synthetic", "options": {"num_samples": 256, "image_size": 8, "num_classes": 4}}
TARGET = {**SOURCE, "shifts": [{"name": "rotation", "degrees": 30}, {"name": "gaussian_noise", "sigma": 0.2}]}


def adapt(method, **kw):
    return {
        "name": f"adapt-{method.replace('_', '-')}",
        "kind": "adapt",
        "model": {"name": "cnn_small"},
        "source_domain": SOURCE,
        "target_domain": TARGET,
        "method": {"name": method},
        "optim": {"epochs": 2, "batch_size": 32, "lr": 3e-3},
        **kw,
    }


def run(doc, logs=None):
    return run_pipeline(parse_pipeline(doc), log=(logs.append if logs is not None else lambda m: None))


@pytest.mark.parametrize("method", ["dann", "coral", "mmd", "entropy_min"])
def test_methods_report_the_source_only_baseline(tmp_path, method):
    logs = []
    out = run(synthetic_pipeline(tmp_path, extra_stages=[adapt(method, selection="entropy")]), logs)
    m = open_artifact(out[-1].uri).manifest
    a = m["adapt"]
    assert a["selection"] == "entropy" and a["deployable"] is True
    assert 0 <= a["source_only_acc"] <= 1 and a["gain"] == pytest.approx(a["target_acc"] - a["source_only_acc"])
    hist = m["history"]
    assert all({"val_entropy", "val_snd", "val_source_acc", "selection_score"} <= set(h) for h in hist)
    assert a["selected_epoch"] == max((h for h in hist if h["selected"]), key=lambda h: h["epoch"])["epoch"]
    assert any("source-only" in line for line in logs)


def test_baseline_is_reused_from_storage(tmp_path):
    doc = synthetic_pipeline(tmp_path, extra_stages=[adapt("dann")])
    run(doc)
    logs = []
    run_pipeline(parse_pipeline(doc), force=["adapt-dann"], log=logs.append)
    assert any("source-only baseline: reused" in line for line in logs)


def test_shot_is_source_free_and_oracle_is_flagged(tmp_path):
    doc = synthetic_pipeline(tmp_path, extra_stages=[adapt("shot", source="teacher", selection="oracle")])
    logs = []
    out = run(doc, logs)
    m = open_artifact(out[-1].uri).manifest
    assert m["adapt"]["deployable"] is False and m["adapt"]["baseline"]["uri"] == out[0].uri
    assert any("NOT DEPLOYABLE" in line for line in logs)
    assert all("val_source_acc" not in h for h in m["history"]), "source-free: no source data at all"


def test_selected_epoch_is_what_is_published(tmp_path):
    out = run(
        synthetic_pipeline(
            tmp_path,
            extra_stages=[adapt("coral", selection="oracle", optim={"epochs": 3, "batch_size": 32, "lr": 3e-3})],
        )
    )
    m = open_artifact(out[-1].uri).manifest
    best = max(m["history"], key=lambda h: h["val_acc"])  # oracle: target validation labels
    assert m["adapt"]["selected_epoch"] == best["epoch"]
    val = kdata.load(DataSpec.model_validate(m["spec"]["target_domain"]), "val")
    published = open_artifact(out[-1].uri).build_model()
    acc = metrics_for(predict(published, kdata.normalize(val.x, val), 512), val.y)["top1"]
    assert acc == pytest.approx(best["val_acc"], abs=1e-6), "the published weights are the selected epoch's"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"target_domain": {**TARGET, "labels_per_class": 5}}, "target labels are never used for training"),
        ({"method": {"name": "shot"}}, "source-free"),
        ({"method": {"name": "shot"}, "source": "teacher", "selection": "source_val"}, "needs source data"),
        ({"method": {"name": "dann", "weight": -1}}, "weight"),
        ({"method": {"name": "mmd", "kernels": []}}, "kernels"),
        ({"method": {"name": "dan"}}, "did you mean 'dann'"),
        ({"target_domain": {**SOURCE, "shifts": [{"name": "rotation", "degres": 30}]}}, "degres"),
        ({"target_domain": {**SOURCE, "shifts": [{"name": "gaussian_noise", "sigma": -1}]}}, "sigma"),
    ],
)
def test_bad_adapt_specs(tmp_path, change, message):
    with pytest.raises(KdrayError, match=message):
        parse_pipeline(synthetic_pipeline(tmp_path, extra_stages=[{**adapt("dann"), **change}]))


def test_source_with_another_class_count(tmp_path):
    other = {**SOURCE, "options": {**SOURCE["options"], "num_classes": 3}}
    doc = synthetic_pipeline(
        tmp_path,
        extra_stages=[
            adapt("dann", source="teacher", source_domain=other, target_domain={**other, "shifts": TARGET["shifts"]})
        ],
    )
    with pytest.raises(KdrayError, match="4 classes"):
        run(doc)
