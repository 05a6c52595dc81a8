"""Third-party registry entries through Python entry points: a real package, installed by pip.

The plug-in package is built and installed with ``pip install --no-deps --no-build-isolation
--target <tmp>`` (a real wheel build and install, into a folder instead of the shared virtualenv),
put on ``sys.path`` and ``PYTHONPATH``, and then found by the registries' entry-point loading:
``kdray ls`` names the distribution it came from, and a spec trains with its model.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from helpers import synthetic_pipeline
from typer.testing import CliRunner

from kdray.cli import app
from kdray.contracts.checkpoint import open_artifact
from kdray.data.datasets import DATASETS
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline
from kdray.models import MODELS

PYPROJECT = """
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "kdray-plugin-demo"
version = "0.1.0"

[project.entry-points."kdray.models"]
demo_mlp = "kdray_plugin_demo:demo_mlp"

[project.entry-points."kdray.datasets"]
demo_blobs = "kdray_plugin_demo:demo_blobs"
"""

MODULE = '''
"""A plug-in: one model and one dataset for kdray."""
import torch
import torch.nn as nn

from kdray.data.datasets import Split


def demo_mlp(num_classes: int = 10, in_channels: int = 1, image_size: int = 8, hidden: int = 32):
    """A two-layer MLP from the demo plug-in (no kdray model contract)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_channels * image_size * image_size, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


def demo_blobs(split: str, path=None) -> Split:
    """Two classes of 8x8 images: dark and bright."""
    gen = torch.Generator().manual_seed(0 if split == "train" else 1)
    y = torch.arange(128) % 2
    x = (0.3 + 0.4 * y.float()).view(-1, 1, 1, 1) + 0.1 * torch.randn(128, 1, 8, 8, generator=gen)
    return Split(x.clamp(0, 1), y, 2, 0.5, 0.25, "demo-blobs-" + split, ("dark", "bright"))
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "kdray_plugin_demo").mkdir(parents=True)
    (src / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (src / "kdray_plugin_demo" / "__init__.py").write_text(textwrap.dedent(MODULE))
    site = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*cmd, "--target", str(site), str(src)], check=True, timeout=300, capture_output=True)
    assert list(site.glob("kdray_plugin_demo-0.1.0.dist-info/entry_points.txt")), "pip installed the metadata"
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))
    for registry in (MODELS, DATASETS):
        monkeypatch.setattr(registry, "_plugins_loaded", False)
    yield
    for registry, name in ((MODELS, "demo_mlp"), (DATASETS, "demo_blobs")):
        registry.unregister(name)
    sys.modules.pop("kdray_plugin_demo", None)


def test_an_installed_plugin_registers_and_trains(plugin, tmp_path):
    assert "demo_mlp" in MODELS and "demo_blobs" in DATASETS
    assert MODELS.origin("demo_mlp") == "kdray-plugin-demo (entry point kdray_plugin_demo:demo_mlp)"
    listed = CliRunner().invoke(app, ["ls", "models"])
    assert listed.exit_code == 0
    assert "demo_mlp" in listed.output and "from kdray-plugin-demo" in listed.output

    doc = synthetic_pipeline(tmp_path, workers=0, epochs=3)
    doc["stages"][0]["model"] = {"name": "demo_mlp", "hidden": 16}
    doc["stages"][0]["data"] = {"name": "demo_blobs"}
    spec = parse_pipeline(doc)
    [outcome] = run_pipeline(spec, log=lambda m: None)
    art = open_artifact(outcome.uri)
    assert art.manifest["model"]["name"] == "demo_mlp" and art.manifest["model"]["kwargs"]["hidden"] == 16
    assert art.manifest["model"]["classifier"] == "3", "the plug-in's model was adopted: its last nn.Linear"
    assert art.build_model()[3].out_features == 2

    doc["stages"][0]["model"] = {"name": "demo_mlp", "hiden": 16}
    with pytest.raises(Exception, match="did you mean 'hidden'"):
        parse_pipeline(doc)
