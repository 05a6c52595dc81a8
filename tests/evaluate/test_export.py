"""Export: every registry model family round-trips through ONNX (onnxruntime vs PyTorch) and TorchScript."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from helpers import synthetic_pipeline
from typer.testing import CliRunner

from kdray.cli import app
from kdray.contracts.checkpoint import open_artifact, sha256
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline
from kdray.evaluate.export import EXPORTS, ExportError, export_artifact, export_model
from kdray.models import create_model

FAMILIES = ["mlp_64", "cnn_small", "resnet_small", "gru_small", "vit_tiny"]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_round_trips_through_onnx(name):
    model = create_model(name, num_classes=10, in_channels=1, image_size=28)
    data, record = export_model(model, (1, 28, 28), "onnx", name=name, latency_runs=3, latency_batch=16)
    assert record["check"]["max_abs_diff"] <= 1e-4 and record["check"]["argmax_agreement"] == 1.0
    assert record["sha256"] == sha256(data) and record["latency"]["exported_ms"] > 0
    # independently: onnxruntime on another batch size than the checked one gives PyTorch's logits
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    got = session.run(None, {"input": x.numpy()})[0]
    assert got.shape == (5, 10) and float(np.abs(got - expected).max()) <= 1e-4


@pytest.mark.parametrize("name", ["mlp_64", "cnn_small"])
def test_torchscript_round_trip(name):
    model = create_model(name, num_classes=4, in_channels=1, image_size=8)
    _, record = export_model(model, (1, 8, 8), "torchscript", name=name, latency_runs=3, latency_batch=16)
    assert record["format"] == "torchscript" and record["check"]["max_abs_diff"] <= 1e-4


class Stateful(nn.Module):
    """Python state that changes on every call: an export freezes it, so its outputs drift from PyTorch's."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x.flatten(1)) * self.calls


class FixedBatch(nn.Module):
    """A batch size read as a Python int: the export works at the traced size only."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x):
        return self.fc(x.reshape(len(x), 64))


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x):
        return torch.special.zeta(self.fc(x.flatten(1)), torch.tensor(2.0))


def test_a_model_that_cannot_be_exported_is_a_clear_error_naming_the_operator():
    with pytest.raises(ExportError, match=r"operator .*zeta"):
        export_model(Unsupported(), (1, 8, 8), "onnx", name="zeta-model")


def test_an_export_that_differs_from_pytorch_is_refused():
    with pytest.raises(ExportError, match=r"does not match PyTorch: max abs difference"):
        export_model(Stateful(), (1, 8, 8), "onnx", name="stateful")
    with pytest.raises(ExportError, match=r"fails on a batch of 64"):
        export_model(FixedBatch(), (1, 8, 8), "onnx", name="fixed-batch")


def test_export_an_artifact_from_the_cli(tmp_path):
    doc = synthetic_pipeline(tmp_path, epochs=1)
    out = run_pipeline(parse_pipeline(doc), log=lambda m: None)
    uri = out[0].uri
    before = open_artifact(uri).manifest
    result = CliRunner().invoke(app, ["export", uri, "--format", "onnx", "--latency-batch", "16"])
    assert result.exit_code == 0, result.output
    assert "max abs difference vs PyTorch" in result.output
    art = open_artifact(uri)
    assert art.manifest == before, "the artifact's manifest is left as it is"
    record = json.loads(art.home.read_bytes(EXPORTS))["exports"]["onnx"]
    data = art.home.read_bytes(record["file"])
    assert sha256(data) == record["sha256"] and record["weights_sha256"] == art.weights_sha256
    assert record["check"]["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [1, 8, 8]
    # a second format joins the record; the first stays
    record2 = export_artifact(uri, "torchscript", latency_runs=2, latency_batch=8)
    both = json.loads(art.home.read_bytes(EXPORTS))["exports"]
    assert set(both) == {"onnx", "torchscript"} and both["torchscript"]["sha256"] == record2["sha256"]
    bad = CliRunner().invoke(app, ["export", uri, "--format", "tflite"])
    assert bad.exit_code == 2 and "tflite" in bad.output
