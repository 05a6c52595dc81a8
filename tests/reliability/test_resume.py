"""Every failure can be resumed: a complete last checkpoint without an artifact publishes from the checkpoint.

Two ways to get there, as a user meets them: the disk fills while publishing (an injected ENOSPC at the
commit, ``kdray.engine.diagnostics.publish_store``), and the artifact folder is deleted (kdray's own hint
for a corrupt artifact). The rerun must publish the same weights without training again, in process
(``workers: 0``) and on Ray Train (``workers: 1``).
"""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import synthetic_pipeline

from kdray.contracts.checkpoint import read_artifact
from kdray.core.errors import StorageError
from kdray.core.storage import Storage
from kdray.engine.pipeline import plan, run_pipeline
from kdray.engine.spec import parse_pipeline


def teacher_spec(tmp_path, workers: int = 0):
    return parse_pipeline(synthetic_pipeline(tmp_path, workers=workers, epochs=2))


def artifact_folder(spec, tmp_path):
    return tmp_path / "runs" / "synth" / "teacher" / plan(spec)["teacher"]


def test_a_publish_that_fails_on_a_full_disk_is_resumed_from_the_checkpoint(tmp_path, monkeypatch, capsys):
    spec = teacher_spec(tmp_path)
    marker = tmp_path / "fired"
    monkeypatch.setenv("KDRAY_INJECT_FAULT", json.dumps({"stage": "teacher", "how": "publish", "marker": str(marker)}))
    with pytest.raises(StorageError) as err:
        run_pipeline(spec, log=lambda m: None)
    assert marker.exists(), "the fault fired"
    assert "the disk is full" in str(err.value) and "writable" not in str(err.value), str(err.value)
    assert read_artifact(Storage(f"file://{artifact_folder(spec, tmp_path)}")) is None, "nothing was committed"

    capsys.readouterr()
    outcome = run_pipeline(spec, log=lambda m: None)[0]  # the marker makes the fault fire only once
    assert outcome.status == "ran"
    assert "publishing from it" in capsys.readouterr().out
    art = read_artifact(outcome.uri)
    assert art is not None
    history = art.manifest["history"]
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["resumed"] == 0, "no epoch was trained again"


def test_a_deleted_artifact_is_published_again_from_the_checkpoint(tmp_path, capsys):
    spec = teacher_spec(tmp_path)
    first = run_pipeline(spec, log=lambda m: None)[0]
    weights = read_artifact(first.uri).weights_sha256  # type: ignore[union-attr]
    shutil.rmtree(artifact_folder(spec, tmp_path))
    capsys.readouterr()
    again = run_pipeline(spec, log=lambda m: None)[0]
    assert again.status == "ran" and "publishing from it" in capsys.readouterr().out
    assert read_artifact(again.uri).weights_sha256 == weights, "the same weights, from the last checkpoint"  # type: ignore[union-attr]


def test_a_corrupt_finished_checkpoint_is_still_called_corrupt(tmp_path):
    spec = teacher_spec(tmp_path)
    run_pipeline(spec, log=lambda m: None)
    shutil.rmtree(artifact_folder(spec, tmp_path))
    ckpts = sorted((tmp_path / "runs" / "_ray").glob("*/in_process/checkpoint_*"))
    (ckpts[-1] / "method.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(Exception, match="not a readable safetensors file") as err:
        run_pipeline(spec, log=lambda m: None)
    assert "--force" in str(err.value)


@pytest.mark.slow
def test_a_deleted_artifact_is_published_again_on_ray(tmp_path, ray_local):
    spec = teacher_spec(tmp_path, workers=1)
    first = run_pipeline(spec, log=lambda m: None)[0]
    weights = read_artifact(first.uri).weights_sha256  # type: ignore[union-attr]
    shutil.rmtree(artifact_folder(spec, tmp_path))
    again = run_pipeline(spec, log=lambda m: None)[0]
    assert again.status == "ran"
    assert read_artifact(again.uri).weights_sha256 == weights  # type: ignore[union-attr]
