"""The README's "Your own model and data", followed literally from an empty folder, so it cannot rot.

The test reads the section's blocks: the ``python`` block becomes ``nets.py``, the ``yaml`` block
``spec.yaml``, and every ``kdray ...`` line of its ``bash`` blocks is run as written (in this process),
on a folder of PNGs exported from Fashion-MNIST. Only the run is made small: ``run.workers=0`` and one
epoch, given as overrides (the spec stays as the README shows it).
"""

from __future__ import annotations

import gzip
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from helpers import FMNIST, REPO, needs_fmnist
from PIL import Image
from typer.testing import CliRunner

from kdray.cli import app

README = REPO / "README.md"
SMALL_RUN = ["run.workers=0", "stages.net.optim.epochs=1"]


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def kdray_lines(text: str) -> list[list[str]]:
    """Every ``kdray ...`` command of the section's bash blocks, without its comment."""
    out = []
    for block in blocks(text, "bash"):
        for line in block.splitlines():
            if line.startswith("kdray "):
                out.append(shlex.split(line.split("#", 1)[0])[1:])
    return out


def export_pngs(folder: Path, classes: int = 3, per_class: int = 20) -> None:
    """``folder/<class>/<n>.png``: the first Fashion-MNIST training images of a few classes."""
    with gzip.open(FMNIST / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FMNIST / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True)
        for n, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            Image.fromarray(images[i]).save(folder / f"class{c}" / f"{n:03d}.png")


def test_the_section_has_what_a_newcomer_needs():
    text = section("Your own model and data")
    assert len(blocks(text, "python")) == 1 and len(blocks(text, "yaml")) == 1
    spec = blocks(text, "yaml")[0]
    assert "import:" in spec and len(spec.strip().splitlines()) <= 12, "a complete spec of about ten lines"
    assert "pip install" in text and "spec file's folder" in text
    commands = {c[0] if c[0] != "data" else "data import" for c in kdray_lines(text)}
    assert {"data import", "validate", "inspect", "plan", "run"} <= commands


def test_every_subcommand_is_in_the_command_list():
    listed = {c[0] for c in kdray_lines(section("Using it"))}
    names = {c.name or c.callback.__name__ for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert names <= listed, f"missing from the README's command list: {sorted(names - listed)}"


@needs_fmnist
def test_following_the_section_from_an_empty_folder_trains_and_evaluates(tmp_path, monkeypatch):
    text = section("Your own model and data")
    monkeypatch.chdir(tmp_path)
    export_pngs(tmp_path / "images")
    (tmp_path / "nets.py").write_text(blocks(text, "python")[0])
    (tmp_path / "spec.yaml").write_text(blocks(text, "yaml")[0])
    runner = CliRunner()
    outputs = {}
    for args in kdray_lines(text):
        if args[0] == "run":
            args = [*args, *SMALL_RUN, "--json"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"kdray {' '.join(args)}: {result.output}"
        outputs[args[0]] = result.stdout
    assert (tmp_path / "shards" / "dataset.json").is_file()
    assert "Linear" in outputs["inspect"] and "would run" in outputs["plan"]
    outcomes = json.loads(outputs["run"])
    assert [o["stage"] for o in outcomes] == ["net", "eval"] and all(o["status"] == "ran" for o in outcomes)
    assert set(outcomes[1]["reports"]) >= {"report.md", "report.html"}
    assert 0.0 <= outcomes[1]["metrics"]["models"]["net"]["top1"] <= 1.0
    again = json.loads(runner.invoke(app, ["plan", "spec.yaml", *SMALL_RUN, "--json"]).stdout)["stages"]
    assert [s["status"] for s in again] == ["cached", "cached"]
    assert [(s["key"], s["uri"]) for s in again] == [(o["key"], o["uri"]) for o in outcomes], "plan's keys are run's"


@pytest.mark.parametrize("folder", ["runs", "./runs"])
def test_ls_takes_a_bare_folder_and_refuses_a_missing_one(tmp_path, monkeypatch, folder):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    missing = runner.invoke(app, ["ls", folder])
    assert missing.exit_code == 2 and "runs" in missing.output
    (tmp_path / "runs").mkdir()
    empty = runner.invoke(app, ["ls", folder, "--json"])
    assert empty.exit_code == 0 and json.loads(empty.stdout) == []
