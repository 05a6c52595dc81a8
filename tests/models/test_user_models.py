"""Models from user code: an import path outside the package, pretrained weights, the ``pretrained`` kind.

The user module is written to a temporary folder put on ``sys.path`` (as PYTHONPATH or a Ray
``runtime_env`` would), so nothing here is part of kdray's own registry.
"""

from __future__ import annotations

import copy
import json
import sys
import textwrap

import pytest
import torch
from helpers import synthetic_pipeline
from safetensors.torch import save_file
from typer.testing import CliRunner

from kdray.cli import app
from kdray.contracts.checkpoint import open_artifact
from kdray.contracts.specs import ModelSpec
from kdray.contracts.usermodels import build_model
from kdray.core.errors import CheckpointMismatch, KdrayError, SpecError
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline
from kdray.models.hooks import embedding_and_logits, forward_with_features

USER_MODULE = '''
import torch.nn as nn


class Net(nn.Module):
    """A plain nn.Module: no embed, no classifier_name, its own attribute names."""

    def __init__(self, num_classes: int = 10, width: int = 32, image_size: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(image_size * image_size, width), nn.ReLU())
        self.head = nn.Linear(width, num_classes)
        self.aux = nn.Identity()

    def forward(self, x):
        return self.head(self.aux(self.body(x)))


def small(num_classes: int, depth: int = 1):
    layers = [nn.Flatten(), nn.Linear(64, 16), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(16, num_classes))


def broken(num_classes: int):
    raise RuntimeError("no GPU weights here")


class NoLinear(nn.Module):
    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(1, num_classes, 8)

    def forward(self, x):
        return self.conv(x).flatten(1)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    folder = tmp_path / "usercode"
    folder.mkdir()
    (folder / "kd_usernets.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", str(folder))
    yield "kd_usernets"
    sys.modules.pop("kd_usernets", None)


KW = {"num_classes": 4, "in_channels": 1, "image_size": 8}


def test_an_arbitrary_module_gets_the_contract(user_module):
    spec = ModelSpec.model_validate({"import": f"{user_module}:Net", "options": {"width": 16}})
    model = build_model(spec, KW)
    assert model.classifier_name == "head", "the last nn.Linear is the classifier"
    assert set(model.state_dict()) == {"body.1.weight", "body.1.bias", "head.weight", "head.bias"}
    x = torch.rand(5, 1, 8, 8)
    emb, logits = embedding_and_logits(model, x)
    assert emb.shape == (5, 16) and logits.shape == (5, 4)
    torch.testing.assert_close(model.head(model.embed(x)), model(x))
    twin = copy.deepcopy(model)  # e.g. a frozen copy: its embed reads its own classifier
    with torch.no_grad():
        twin.head.weight.zero_()
    torch.testing.assert_close(twin.embed(x), model.embed(x))
    out = forward_with_features(model, x, ["body.1", "aux"], embedding=True)
    assert out.features["body.1"].shape == (5, 16) and out.embedding.shape == (5, 16)

    seq = build_model(ModelSpec.model_validate({"import": f"{user_module}:small", "options": {"depth": 2}}), KW)
    assert seq.classifier_name == "5", "a Sequential's last Linear"
    explicit = build_model(ModelSpec.model_validate({"import": f"{user_module}:small", "classifier": "3"}), KW)
    assert explicit.classifier_name == "3"


def test_bad_user_models_name_the_field(user_module):
    with pytest.raises(Exception, match=r"model.import: cannot import module 'no_such_pkg.nets'"):
        ModelSpec.model_validate({"import": "no_such_pkg.nets:resnet50"})
    with pytest.raises(Exception, match=r"has no parameter 'widht'; did you mean 'width'"):
        ModelSpec.model_validate({"import": f"{user_module}:Net", "options": {"widht": 3}})
    with pytest.raises(Exception, match="exactly one of model.name"):
        ModelSpec.model_validate({"name": "cnn_small", "import": f"{user_module}:Net"})
    with pytest.raises(SpecError, match=r"model.import: kd_usernets:broken\(num_classes=4\) raised RuntimeError"):
        build_model(ModelSpec.model_validate({"import": f"{user_module}:broken"}), KW)
    with pytest.raises(KdrayError, match="has no nn.Linear.*model.classifier"):
        build_model(ModelSpec.model_validate({"import": f"{user_module}:NoLinear"}), KW)
    with pytest.raises(KdrayError, match="has no module 'heda'; did you mean 'head'"):
        build_model(ModelSpec.model_validate({"import": f"{user_module}:Net", "classifier": "heda"}), KW)


def test_pretrained_weights_with_a_prefix_map_and_checked_shapes(user_module, tmp_path):
    spec = ModelSpec.model_validate({"import": f"{user_module}:Net", "options": {"width": 16}})
    source = build_model(spec, KW)
    state = {
        f"backbone.{k.removeprefix('body.')}" if k.startswith("body.") else k: v for k, v in source.state_dict().items()
    }
    save_file(state, str(tmp_path / "net.safetensors"))
    spec = ModelSpec.model_validate(
        {
            "import": f"{user_module}:Net",
            "options": {"width": 16},
            "weights": f"file://{tmp_path}/net.safetensors",
            "weights_prefix": {"backbone.": "body."},
        }
    )
    loaded = build_model(spec, KW)
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), source(x))

    wrong = ModelSpec.model_validate({**spec.model_dump(), "options": {"width": 8}})
    with pytest.raises(CheckpointMismatch, match=r"body.1.weight: model \(8, 64\) vs file \(16, 64\)"):
        build_model(wrong, KW)
    unmapped = ModelSpec.model_validate({**spec.model_dump(), "weights_prefix": {}})
    with pytest.raises(CheckpointMismatch, match="missing in file: body.1.weight"):
        build_model(unmapped, KW)


def test_a_pretrained_user_teacher_distils_into_a_registry_student(user_module, tmp_path):
    """A user-module teacher trained once, published from its safetensors by a ``pretrained`` stage (no train
    stage for it), then distilled into ``mlp_64``; lineage records the weights' sha256 and the import path."""
    teacher_doc = synthetic_pipeline(tmp_path, workers=0, epochs=6)
    teacher_doc["stages"][0]["model"] = {"import": f"{user_module}:Net", "options": {"width": 32}}
    [trained] = run_pipeline(parse_pipeline(teacher_doc), log=lambda m: None)
    art = open_artifact(trained.uri)
    assert art.manifest["model"]["import"] == f"{user_module}:Net"
    rebuilt = art.build_model()  # the artifact rebuilds the user's class from the manifest
    assert rebuilt.classifier_name == "head"
    weights = art.store.uri("model.safetensors")

    data = teacher_doc["stages"][0]["data"]
    doc = {
        "name": "pre",
        "storage": {"uri": f"file://{tmp_path}/runs2"},
        "run": {"workers": 0},
        "stages": [
            {
                "name": "teacher",
                "kind": "pretrained",
                "model": {"import": f"{user_module}:Net", "options": {"width": 32}, "weights": weights},
                "data": data,
                "evaluate": True,
            },
            {
                "name": "student",
                "kind": "distill",
                "teacher": "teacher",
                "model": {"name": "mlp_64"},
                "data": data,
                "losses": [{"name": "hinton_kl", "temperature": 4.0}],
                "optim": {"epochs": 6, "batch_size": 32, "lr": 3e-3},
            },
        ],
    }
    outcomes = run_pipeline(parse_pipeline(doc), log=lambda m: None)
    teacher, student = (open_artifact(o.uri) for o in outcomes)
    digest = teacher.manifest["model"]["pretrained"]["sha256"]
    assert digest == art.weights_sha256, "lineage records the sha256 of the weights file"
    assert teacher.manifest["metrics"]["top1"] > 0.6, "the published weights are the trained ones"
    assert student.manifest["parents"][0]["uri"] == teacher.uri
    student_acc = student.manifest["metrics"].get("val_acc", student.manifest["metrics"].get("test_acc"))
    assert student_acc > 0.6


def test_cli_reports_bad_models_with_exit_2(user_module, tmp_path):
    doc = synthetic_pipeline(tmp_path, workers=0, epochs=1)
    runner = CliRunner()
    for model, expected in [
        ({"import": "no_such_pkg.nets:resnet50"}, "cannot import module 'no_such_pkg.nets'"),
        ({"import": f"{user_module}:broken"}, "raised RuntimeError: no GPU weights here"),
        ({"import": f"{user_module}:NoLinear"}, "has no nn.Linear"),
        ({"name": "cnn_small", "weights": f"file://{tmp_path}/none.safetensors"}, "model.weights: no weights file at"),
    ]:
        doc["stages"][0]["model"] = model
        path = tmp_path / "spec.yaml"
        path.write_text(json.dumps(doc))
        result = runner.invoke(app, ["run", str(path)])
        assert result.exit_code == 2, (model, result.output)
        assert expected in result.output and "Traceback" not in result.output, result.output


def test_inspect_prints_the_tree_with_shapes(user_module, tmp_path):
    doc = synthetic_pipeline(tmp_path, workers=0, epochs=1)
    doc["stages"][0]["model"] = {"import": f"{user_module}:Net", "options": {"width": 16}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(doc))
    result = CliRunner().invoke(app, ["inspect", str(path), "--stage", "teacher", "--batch", "5"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    assert "Linear" in lines["head"] and "5x4" in lines["head"] and "<- classifier" in lines["head"]
    assert lines["body.1"].split()[2:4] == ["1,040", "1,040"] and "5x16" in lines["body.1"]
    assert "(model)" in lines and "1,108" in lines["(model)"]

    result = CliRunner().invoke(app, ["inspect", str(path), "--stage", "techer"])
    assert result.exit_code == 2 and "no stage named 'techer'" in result.output and "teacher" in result.output
