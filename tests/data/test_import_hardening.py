"""Import and read hardening: decompression bombs, empty class folders, on/off, narrow heads, a full disk.

Each is bad input or a bad environment, so each must end in one paragraph that names the file or field
and the fix, with exit code 2 and no traceback.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import synthetic_pipeline
from PIL import Image
from typer.testing import CliRunner

from kdray.cli import app
from kdray.core.errors import StorageError
from kdray.core.storage import Storage
from kdray.data.files import MAX_PIXELS
from kdray.engine.spec import parse_pipeline


def class_folders(path: Path, classes: int = 2, per_class: int = 6, empty: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (path / f"c{c}").mkdir(parents=True, exist_ok=True)
        if c == empty:
            continue
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(path / f"c{c}" / f"{i:02d}.png")
    return path


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("side", [30000, 9000])  # beyond Pillow's own bomb limit; beyond kdray's pixel limit
def test_a_decompression_bomb_is_refused_at_import_naming_the_file(tmp_path, side):
    src = class_folders(tmp_path / "src")
    Image.new("1", (side, side)).save(src / "c1" / "zz.png")  # 1-bit zeros: a few kB that declare side^2 pixels
    out = cli("data", "import", str(src), str(tmp_path / "ds"))
    assert out.exit_code == 2, out.output
    assert "c1/zz.png" in out.output and "Traceback" not in out.output
    assert side * side > MAX_PIXELS
    assert not (tmp_path / "ds" / "dataset.json").exists()


def test_an_empty_class_folder_is_refused_at_import(tmp_path):
    src = class_folders(tmp_path / "src", classes=3, empty=1)
    out = cli("data", "import", str(src), str(tmp_path / "ds"))
    assert out.exit_code == 2, out.output
    assert "c1" in out.output and "no images" in out.output and "renumber" in out.output


def test_teacher_cache_off_unquoted_is_read_as_off(tmp_path):
    doc = synthetic_pipeline(
        tmp_path, extra_stages=[{"name": "s", "kind": "distill", "teacher": "teacher", "model": {"name": "mlp_32"}}]
    )
    doc["stages"][1]["data"] = doc["stages"][0]["data"]
    text = yaml.safe_dump(doc).replace("kind: distill", "kind: distill\n  teacher_cache: off")
    assert yaml.safe_load(text)["stages"][1]["teacher_cache"] is False  # what YAML 1.1 makes of it
    path = tmp_path / "p.yaml"
    path.write_text(text)
    out = cli("validate", str(path))
    assert out.exit_code == 0, out.output
    assert parse_pipeline(yaml.safe_load(text)).stages[1].teacher_cache == "off"
    assert (
        parse_pipeline(yaml.safe_load(text.replace("teacher_cache: off", "teacher_cache: on"))).stages[1].teacher_cache
        == "on"
    )


def test_a_head_narrower_than_the_data_is_refused_at_validate(tmp_path):
    doc = synthetic_pipeline(tmp_path)
    doc["stages"][0]["model"]["num_classes"] = 2  # the synthetic data has 4 classes
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = cli("validate", str(path))
    assert out.exit_code == 2, out.output
    assert "stages[0] (teacher).model.num_classes" in out.output and "head of 2 classes" in out.output


def test_evaluating_a_model_with_a_narrower_head_is_one_paragraph(tmp_path):
    doc = synthetic_pipeline(tmp_path, epochs=1)
    doc["stages"][0]["data"]["classes"] = [0, 1]  # trained for two of the four classes
    runs = tmp_path / "runs"
    teacher = parse_pipeline(doc)
    from kdray.engine.pipeline import run_pipeline

    uri = run_pipeline(teacher, log=lambda m: None)[0].uri
    data = {"name": "synthetic", "options": {"num_samples": 256, "image_size": 8, "num_classes": 4}}
    evaluate = {
        "name": "ev",
        "storage": {"uri": f"file://{runs}"},
        "stages": [{"name": "e", "kind": "evaluate", "models": [uri], "data": data}],
    }
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(evaluate))
    out = cli("run", str(path))
    assert out.exit_code == 2, out.output
    assert "has a head of 2 classes, but the test data (synthetic) has 4 classes" in out.output, out.output
    assert "IndexError" not in out.output and "Traceback" not in out.output


def test_a_full_disk_is_named_as_such(tmp_path, monkeypatch):
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError) as err:
        Storage(f"file://{tmp_path}").write_bytes("x.bin", b"data")
    text = str(err.value)
    assert "the disk is full" in text and "Free space" in text and "writable" not in text
    assert err.value.transient
    assert list(tmp_path.iterdir()) == [], "no partial file left behind"
