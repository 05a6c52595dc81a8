"""Relative paths in a spec are taken from the spec file's folder; stage keys stay what they were."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from helpers import REPO
from safetensors.torch import save_file

from kdray.contracts.usermodels import build_model
from kdray.core.errors import SpecError
from kdray.engine.pipeline import plan
from kdray.engine.spec import load_pipeline, parse_pipeline

ROOT = REPO

# Computed on main before spec-relative paths existed: an example's keys must never change with it.
PINNED = {
    "examples/fmnist_cnn_to_mlp_hinton.yaml": {
        "teacher": "dae9beab89fc",
        "scratch": "8eec6bce364c",
        "student": "9a5e24c925b7",
        "eval": "9e779ab90c5d",
    },
    "examples/fmnist_user_teacher_parquet.yaml": {
        "teacher": "ef9eafa6f3e9",
        "student": "07557f57d9da",
        "report": "1301702b5d06",
    },
}

NETS = """
import torch.nn as nn


def tiny(num_classes: int, image_size: int = 8):
    return nn.Sequential(nn.Flatten(), nn.Linear(image_size * image_size, 16), nn.ReLU(), nn.Linear(16, num_classes))
"""

SPEC = """
name: paths
storage: {uri: file://./runs}
run: {workers: 0}
stages:
  - name: teacher
    kind: train
    model: {import: "nets.py:tiny", weights: init.safetensors}
    data: {name: parquet, path: ./shards}
"""


@pytest.fixture
def chdir_to(monkeypatch):
    return monkeypatch.chdir


@pytest.mark.parametrize("example", sorted(PINNED))
def test_the_keys_of_the_examples_are_pinned(example, chdir_to):
    chdir_to(ROOT)  # the examples are run from the repository root (their own comments say so)
    assert plan(load_pipeline(example)) == PINNED[example]


def test_keys_do_not_depend_on_the_folder_a_spec_is_run_from(chdir_to, tmp_path):
    chdir_to(tmp_path)
    spec = load_pipeline(ROOT / "examples/fmnist_cnn_to_mlp_hinton.yaml")
    assert plan(spec) == PINNED["examples/fmnist_cnn_to_mlp_hinton.yaml"]
    assert spec.storage.uri == "file://./runs", "storage stays relative to the shell"


def project(tmp_path: Path) -> Path:
    """A user's folder: nets.py, init weights, a spec; the shards folder only has to exist."""
    folder = tmp_path / "proj" / "exp"
    (folder / "shards").mkdir(parents=True)
    (folder / "nets.py").write_text(NETS)
    (folder / "spec.yaml").write_text(SPEC)
    return folder


def test_relative_paths_are_taken_from_the_spec_folder(chdir_to, tmp_path):
    folder = project(tmp_path)
    chdir_to(tmp_path)
    spec = load_pipeline("proj/exp/spec.yaml")
    model, data = spec.stages[0].model, spec.stages[0].data
    assert data.path == "proj/exp/shards"
    assert model.import_ == "proj/exp/nets.py:tiny"
    assert model.weights == "proj/exp/init.safetensors"
    kwargs = {"num_classes": 3, "image_size": 8}
    first = build_model(model, kwargs, weights=False)
    save_file({k: v.contiguous() for k, v in first.state_dict().items()}, folder / "init.safetensors")
    loaded = build_model(model, kwargs)  # the weights file is read from the spec's folder
    assert all((a == b).all() for a, b in zip(first.state_dict().values(), loaded.state_dict().values()))

    # the same spec run from its own folder has the same keys: they hash the paths as written
    keys = plan(spec)
    chdir_to(folder)
    here = load_pipeline("spec.yaml")
    assert here.stages[0].data.path == "./shards" and plan(here) == keys
    # ... and so does the spec after a round trip through JSON (a Ray job, a child process, a sweep trial)
    chdir_to(tmp_path)
    again = parse_pipeline(spec.model_dump(mode="json"), "round trip")
    assert again.stages[0].data.path == "proj/exp/shards" and plan(again) == keys


def test_a_path_outside_the_shell_folder_becomes_absolute(chdir_to, tmp_path):
    folder = project(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    chdir_to(elsewhere)
    spec = load_pipeline(folder / "spec.yaml")
    assert spec.stages[0].data.path == str(folder / "shards")
    assert os.path.isabs(spec.stages[0].model.import_.partition(":")[0])


def test_overrides_stay_relative_to_the_shell(chdir_to, tmp_path):
    project(tmp_path)
    (tmp_path / "other").mkdir()
    chdir_to(tmp_path)
    spec = load_pipeline("proj/exp/spec.yaml", ["stages.teacher.data.path=other"])
    assert spec.stages[0].data.path == "other"
    assert "data.path" not in spec.written.get("teacher", {}), "an override's path is hashed as typed"


def test_a_missing_module_file_is_named_where_it_was_looked_for(chdir_to, tmp_path):
    folder = project(tmp_path)
    (folder / "nets.py").unlink()
    chdir_to(tmp_path)
    with pytest.raises(SpecError, match=r"proj/exp/nets\.py"):
        load_pipeline("proj/exp/spec.yaml")


def test_a_spec_written_for_the_shell_folder_still_works(chdir_to, tmp_path):
    """Before this rule paths were taken from the shell's folder: a path found only there is still read."""
    (tmp_path / "nets.py").write_text(NETS)
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "spec.yaml").write_text(
        textwrap.dedent(SPEC).replace(", weights: init.safetensors", "").replace("./shards", "./specs")
    )
    chdir_to(tmp_path)
    spec = load_pipeline("specs/spec.yaml")
    assert spec.stages[0].model.import_ == "nets.py:tiny"
    assert spec.stages[0].data.path == "./specs" and spec.written == {}
