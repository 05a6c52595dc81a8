"""The distill stage: online and cached teachers, cross-family pairs, and its bad-input errors."""

from __future__ import annotations

import json

import pytest
from helpers import synthetic_pipeline

from kdray.contracts.checkpoint import open_artifact
from kdray.core.errors import KdrayError
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline

DATA = {"name": "synthetic", "options": {"num_samples": 256, "image_size": 8, "num_classes": 4}}


def student(name="student", model="mlp_64", losses=None, **kw):
    return {
        "name": name,
        "kind": "distill",
        "teacher": "teacher",
        "model": {"name": model},
        "data": DATA,
        "optim": {"epochs": 2, "batch_size": 32, "lr": 3e-3},
        "losses": losses or [{"name": "cross_entropy", "weight": 0.5}, {"name": "hinton_kl", "weight": 0.5}],
        **kw,
    }


def run(doc, logs=None):
    return run_pipeline(parse_pipeline(doc), log=(logs.append if logs is not None else lambda m: None))


def test_cached_and_online_teacher_give_the_same_training(tmp_path):
    logs = []
    out = run(
        synthetic_pipeline(
            tmp_path,
            extra_stages=[
                student("cached", teacher_cache="on"),
                student("online", teacher_cache="off"),
                student("again", model="mlp_128", teacher_cache="auto"),
            ],
        ),
        logs,
    )
    cached, online, again = (open_artifact(o.uri).manifest for o in out[1:])
    assert cached["teacher"]["cache"] and online["teacher"]["cache"] is None
    assert again["teacher"]["cache"] == cached["teacher"]["cache"], "students share one cache"
    assert any("teacher cache hit" in m for m in logs)
    for a, b in zip(cached["history"], online["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert cached["history"][-1]["val_acc"] > 0.6


def test_a_stale_cache_is_rebuilt_not_used(tmp_path):
    doc = synthetic_pipeline(tmp_path, extra_stages=[student(teacher_cache="on")])
    out = run(doc)
    cache = open_artifact(out[1].uri).manifest["teacher"]["cache"]
    from kdray.core.storage import Storage

    store = Storage(cache)
    meta = json.loads(store.read_bytes("meta.json"))
    store.write_bytes("meta.json", json.dumps({**meta, "rows": 3}).encode())
    logs = []
    run_pipeline(parse_pipeline(doc), force=["student"], log=logs.append)
    assert any("does not match; rebuilding" in m for m in logs)
    assert json.loads(store.read_bytes("meta.json"))["rows"] == 230, "the training split: 256 less 26 validation rows"


def test_feature_losses_run_the_teacher_online_and_say_why(tmp_path):
    hint = [{"name": "cross_entropy"}, {"name": "feature_hint", "student_layer": "layers.1", "teacher_layer": "head"}]
    logs = []
    out = run(synthetic_pipeline(tmp_path, extra_stages=[student(losses=hint)]), logs)
    manifest = open_artifact(out[1].uri).manifest
    assert manifest["teacher"]["cache"] is None and "feature_hint" in manifest["teacher"]["cache_reason"]
    with pytest.raises(KdrayError, match="teacher_cache: on is impossible"):
        run(synthetic_pipeline(tmp_path / "b", extra_stages=[student(losses=hint, teacher_cache="on")]))


def test_bad_module_path_lists_close_names(tmp_path):
    hint = [{"name": "feature_hint", "student_layer": "layers.7", "teacher_layer": "head"}]
    with pytest.raises(KdrayError, match="layers.7") as err:
        run(synthetic_pipeline(tmp_path, extra_stages=[student(losses=hint)]))
    assert "layers.1" in str(err.value)


def test_teacher_for_another_task_is_refused(tmp_path):
    other = {**DATA, "options": {**DATA["options"], "num_classes": 3}}
    with pytest.raises(KdrayError, match="num_classes=4 but the student"):
        run(synthetic_pipeline(tmp_path, extra_stages=[student(data=other)]))


def test_teacher_by_artifact_uri(tmp_path):
    first = run(synthetic_pipeline(tmp_path, epochs=1))
    doc = synthetic_pipeline(tmp_path, epochs=1, extra_stages=[{**student(), "teacher": first[0].uri}])
    doc["stages"] = doc["stages"][1:]
    out = run(doc)
    assert open_artifact(out[0].uri).manifest["parents"][0]["uri"] == first[0].uri


@pytest.mark.parametrize(
    "teacher,pupil",
    [
        ("cnn_small", "mlp_64"),
        ("cnn_small", "gru_small"),
        ("cnn_small", "vit_tiny"),
        ("vit_tiny", "cnn_small"),
        ("gru_small", "cnn_small"),
        ("resnet_small", "mlp_32"),
    ],
)
def test_cross_family_distillation(tmp_path, teacher, pupil):
    doc = synthetic_pipeline(tmp_path, epochs=1, extra_stages=[student(model=pupil)])
    doc["stages"][0]["model"]["name"] = teacher
    out = run(doc)
    hist = open_artifact(out[1].uri).manifest["history"]
    assert hist and hist[0]["train_loss"] == hist[0]["train_loss"]  # finite, not NaN


def test_data_free_distillation_synthesises_inputs_from_the_teacher(tmp_path):
    """DeepInversion on a small case: the student never sees a training image, only inputs optimised
    to match the teacher's BatchNorm statistics, and still beats chance on the real test split."""
    logs = []
    df = student(
        "data-free",
        model="mlp_64",
        losses=[{"name": "hinton_kl", "temperature": 4}],
        data_free={"samples": 256, "steps": 60, "batch_size": 128, "lr": 0.1},
    )
    df["optim"] = {"epochs": 8, "batch_size": 32, "lr": 3e-3}
    out = run(synthetic_pipeline(tmp_path, epochs=3, extra_stages=[df]), logs)
    manifest = open_artifact(out[1].uri).manifest
    assert manifest["teacher"]["cache"] is None and "data_free" in manifest["teacher"]["cache_reason"]
    line = next(m for m in logs if "BatchNorm mismatch" in m)
    start, end = (float(v) for v in line.split("mismatch ")[1].split(",")[0].split(" -> "))
    assert end < start / 2, line
    assert manifest["history"][-1]["val_acc"] > 0.5, "well above the 0.25 of chance on the real validation split"


def test_data_free_needs_batchnorm(tmp_path):
    df = student("data-free", losses=[{"name": "hinton_kl"}], data_free={"samples": 8, "steps": 1})
    doc = synthetic_pipeline(tmp_path, epochs=1, extra_stages=[df])
    doc["stages"][0]["model"]["name"] = "mlp_64"
    with pytest.raises(KdrayError, match="no BatchNorm layer"):
        run(doc)
