"""Errors that tell the truth: what a user's mistake looks like from the installed command.

Each case reached a user as a traceback, a misleading hint or a silent OK: a user model that does not fit
its images (in the loop here and in a Ray Train worker, and in ``kdray inspect``), a model head wider than
the data's classes (a normal thing that the teacher cache called corrupt), and ``kdray validate`` saying
OK for files that do not exist and for S3 storage without credentials.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent
DATA = {"name": "synthetic", "options": {"num_samples": 256, "image_size": 8, "num_classes": 4}}
BAD_NET = '''import torch.nn as nn


class Net(nn.Module):
    """A Linear sized for 10x10 images, given 8x8 ones."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.fc = nn.Linear(100, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))
'''


def kdray(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, command: str = "kdray"
) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a user's shell sets no RAY_*
    return subprocess.run(
        [str(BIN / command), *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )


def write_spec(tmp_path: Path, stages: list[dict], run: dict | None = None, storage: str | None = None) -> Path:
    doc = {
        "name": "told",
        "storage": {"uri": storage or f"file://{tmp_path}/runs"},
        "run": run or {"workers": 0},
        "stages": stages,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def assert_one_paragraph(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors, done.stderr[-3000:]
    return errors[-1]


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_user_model_that_does_not_fit_the_images_is_one_paragraph_naming_file_line_and_shape(tmp_path, workers):
    (tmp_path / "nets.py").write_text(BAD_NET)
    stage = {
        "name": "teacher",
        "kind": "train",
        "model": {"import": "nets.py:Net"},
        "data": DATA,
        "optim": {"epochs": 1},
    }
    spec = write_spec(tmp_path, [stage], run={"workers": workers, "cpus_per_worker": 1})
    error = assert_one_paragraph(kdray(["run", str(spec)], cwd=tmp_path))
    assert "stage 'teacher'" in error and "model.import" in error
    assert "nets.py:12 (in forward)" in error  # the user's file and line
    assert "(32, 1, 8, 8)" in error or "1, 8, 8)" in error  # the input shape
    assert "mat1 and mat2" in error  # the message
    log = error.split("The full traceback is in ")[-1].rstrip(".")
    text = Path(log).read_text()
    assert "Traceback" in text and "nets.py" in text

    debug = kdray(["run", str(spec), "--debug"], cwd=tmp_path)
    assert debug.returncode == 2 and "Traceback" in debug.stderr  # --debug shows it


def test_inspect_of_a_user_model_that_does_not_fit_is_one_paragraph(tmp_path):
    (tmp_path / "nets.py").write_text(BAD_NET)
    stage = {"name": "teacher", "kind": "train", "model": {"import": "nets.py:Net"}, "data": DATA}
    spec = write_spec(tmp_path, [stage])
    error = assert_one_paragraph(kdray(["inspect", str(spec), "--stage", "teacher"], cwd=tmp_path))
    assert "nets.py:12" in error and "mat1 and mat2" in error


def test_heads_wider_than_the_data_classes_distil_through_the_teacher_cache(tmp_path):
    """num_classes: 10 on 4 classes (as a 1,000-class pretrained teacher on a subset): the cache holds the
    teacher's real width, and the stage runs instead of calling a fresh cache corrupt."""
    wide = {"name": "cnn_small", "num_classes": 10}
    optim = {"epochs": 1, "batch_size": 32}
    stages = [
        {"name": "teacher", "kind": "train", "model": wide, "data": DATA, "optim": optim},
        {
            "name": "student",
            "kind": "distill",
            "teacher": "teacher",
            "model": {"name": "mlp_64", "num_classes": 10},
            "data": DATA,
            "optim": optim,
            "teacher_cache": "on",
            "losses": [{"name": "hinton_kl", "weight": 1.0}],
        },
    ]
    done = kdray(["run", str(write_spec(tmp_path, stages))], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "corrupt" not in done.stderr
    meta = next((tmp_path / "runs" / "_cache" / "teacher").glob("*/meta.json")).read_text()
    assert '"num_classes": 10' in meta


def test_validate_names_missing_files_and_s3_without_credentials(tmp_path):
    missing_data = {**DATA, "name": "parquet", "path": "no/such/folder"}
    missing_data.pop("options")
    stage = {"name": "teacher", "kind": "train", "model": {"name": "mlp_64"}, "data": missing_data}
    for command, args in (("kdray", ["validate"]), ("kdray", ["run"]), ("kdray-flow", [])):
        done = kdray([*args, str(write_spec(tmp_path, [stage]))], cwd=tmp_path, command=command)
        error = assert_one_paragraph(done)
        assert "stages.teacher.data.path" in error and "no/such/folder" in error, (command, error)

    stage = {
        "name": "teacher",
        "kind": "train",
        "model": {"name": "mlp_64", "weights": "nope.safetensors"},
        "data": DATA,
    }
    error = assert_one_paragraph(kdray(["validate", str(write_spec(tmp_path, [stage]))], cwd=tmp_path))
    assert "stages.teacher.model.weights" in error and "nope.safetensors" in error

    stage = {"name": "teacher", "kind": "train", "model": {"name": "mlp_64"}, "data": DATA}
    spec = write_spec(tmp_path, [stage], storage="s3://bucket/prefix")
    nothing = {  # no keys anywhere: not in the environment, no shared files, no instance role
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for command in (["validate", str(spec)], ["run", str(spec)]):
        error = assert_one_paragraph(kdray(command, cwd=tmp_path, env=nothing))
        assert "storage.uri" in error and "credentials" in error
