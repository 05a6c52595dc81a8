"""Parquet shards of arrays of any fixed shape and dtype (``kdray data import X.npz DEST --as arrays``).

Token ids and float features round-trip exactly (dtype and values) through the shards, in memory and
through the streaming decode step; a registry sequence model (``gru_small`` with ``vocab_size``)
trains on imported token ids above chance, in process and streamed by Ray Data; and bad input (an
``.npz`` whose arrays differ in length, a row of the wrong size, a label outside the classes, a token
id outside the model's vocabulary) is one paragraph with exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import quiet
from helpers.datasets import CLASSES, VOCAB, T, write_tokens
from typer.testing import CliRunner

from kdray.cli import app
from kdray.contracts.checkpoint import open_artifact
from kdray.contracts.specs import DataSpec
from kdray.core.errors import DataError
from kdray.core.metrics import metrics_for, predict
from kdray.data import datasets as kdata
from kdray.data import stream
from kdray.data.files import import_dataset
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline

runner = CliRunner()


def pipeline(tmp_path: Path, data: dict, *, workers: int = 0, epochs: int = 6, name: str = "tokens", **model) -> dict:
    return {
        "name": name,
        "storage": {"uri": f"file://{tmp_path}/runs"},
        "run": {"workers": workers},
        "stages": [
            {
                "name": "net",
                "kind": "train",
                "model": {"name": "gru_small", "vocab_size": VOCAB, **model},
                "data": data,
                "optim": {"epochs": epochs, "batch_size": 32, "lr": 3e-3},
            }
        ],
    }


def accuracy_on_test(uri: str, data: dict) -> float:
    art = open_artifact(uri)
    test = kdata.load(DataSpec.model_validate({**data, "stream": False}), "test")
    assert test.x.dtype == torch.int64  # token ids stay integers all the way to the model
    logits = predict(art.build_model().eval(), kdata.normalize(test.x, test), 256)
    return metrics_for(logits, test.y)["top1"]


@pytest.fixture
def tokens(tmp_path) -> Path:
    result = runner.invoke(
        app, ["data", "import", str(write_tokens(tmp_path / "tokens.npz")), str(tmp_path / "ds"), "--shard-rows", "150"]
    )
    assert result.exit_code == 0, result.output
    assert f"4 classes, int64 [{T}], train 400 / test 120" in result.output
    return tmp_path / "ds"


# --------------------------------------------------------------------------- round trip


def test_token_ids_and_float_features_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(1)
    ids = rng.integers(-(2**40), 2**40, size=(50, 7)).astype(np.int64)  # beyond float32's and int32's range
    feats = rng.normal(size=(50, 3, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=50)
    pixels = rng.integers(0, 256, size=(50, 4, 4)).astype(np.uint8)  # image-shaped: arrays only when asked
    for name, x, as_ in (("ids", ids, None), ("feats", feats, None), ("forced", pixels, "arrays")):
        src = tmp_path / f"{name}.npz"
        np.savez(src, x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
        meta = import_dataset(str(src), str(tmp_path / name), as_=as_, shard_rows=16, log=quiet)
        saved = json.loads((tmp_path / name / "dataset.json").read_text())
        assert saved == meta and meta["format"] == "kdray-array"
        assert meta["shape"] == list(x.shape[1:]) and meta["dtype"] == x.dtype.name
        assert meta["splits"]["train"]["rows"] == 40 and len(meta["splits"]["train"]["shards"]) == 3
        assert sum(meta["splits"]["test"]["counts"]) == 10
        assert ("mean" in meta) == (x.dtype == np.float32), "mean/std only for float arrays"
        if x.dtype == np.float32:
            assert meta["mean"] == pytest.approx(float(x[:40].mean()), abs=1e-5)
        for split, rows in (("train", slice(0, 40)), ("test", slice(40, 50))):
            loaded = kdata.DATASETS.get("parquet")(split, path=str(tmp_path / name))
            assert loaded.x.dtype == torch.from_numpy(x).dtype and loaded.x.shape == x[rows].shape
            assert np.array_equal(loaded.x.numpy(), x[rows]) and loaded.y.tolist() == y[rows].tolist()
        facts = kdata.describe(DataSpec.model_validate({"name": "parquet", "path": str(tmp_path / name)}))
        assert facts["in_channels"] == int(np.prod(x.shape[1:])) and facts["image_size"] == 1  # mlp_* input width

        # the streaming decode step: the same values, integer ids untouched, float features normalised
        plan = stream.plan(DataSpec.model_validate({"name": "parquet", "path": str(tmp_path / name), "stream": True}))
        table = pq.read_table(tmp_path / name / "train" / "part-00000.parquet")
        batch = {
            "id": table.column("id").to_numpy(),
            "array": np.array(table.column("array").to_pylist(), dtype=object),
            "path": np.array(["train/part-00000.parquet"] * len(table), dtype=object),
        }
        out = stream.decode_batch(batch, lookup=plan.lookup(plan.train), **stream.decode_options(plan.meta))
        raw = x[out["index"]]
        if np.issubdtype(x.dtype, np.integer):
            assert out["x"].dtype == x.dtype and np.array_equal(out["x"], raw)
        else:
            assert out["x"].dtype == np.float32
            assert np.allclose(out["x"], (raw - meta["mean"]) / meta["std"], atol=1e-5)
        assert stream.example_split(plan.facts()).x.dtype == torch.from_numpy(x).dtype

    # an .npz of pixels still becomes PNG shards without --as; --as images refuses token ids by name
    px = rng.integers(0, 256, size=(20, 8, 8)).astype(np.uint8)
    np.savez(tmp_path / "px.npz", x_train=px, y_train=np.arange(20) % 2, x_test=px[:4], y_test=np.arange(4) % 2)
    assert import_dataset(str(tmp_path / "px.npz"), str(tmp_path / "px"), log=quiet)["format"] == "kdray-parquet"
    with pytest.raises(DataError, match=r"ids.npz: x_train has shape \(40, 7\).*--as arrays"):
        import_dataset(str(tmp_path / "ids.npz"), str(tmp_path / "ids-as-images"), as_="images", log=quiet)


# --------------------------------------------------------------------------- training


def test_a_gru_learns_token_ids_from_array_shards(tokens, tmp_path):
    data = {"name": "parquet", "path": str(tokens)}
    train = kdata.load(DataSpec.model_validate(data), "train")
    assert train.x.dtype == torch.int64 and torch.equal(kdata.normalize(train.x, train), train.x)
    result = run_pipeline(parse_pipeline(pipeline(tmp_path, data, epochs=3)), log=quiet)[0]
    history = open_artifact(result.uri).manifest["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    acc = accuracy_on_test(result.uri, data)
    assert acc > 0.6, f"test accuracy {acc:.3f}; chance is {1 / CLASSES}"


@pytest.mark.slow
def test_token_ids_streamed_to_one_worker(ray_local, tokens, tmp_path):
    data = {"name": "parquet", "path": str(tokens)}
    doc = pipeline(tmp_path, {**data, "stream": True}, workers=1, epochs=3, name="streamed")
    result = run_pipeline(parse_pipeline(doc), log=quiet)[0]
    art = open_artifact(result.uri)
    assert art.manifest["spec"]["data"]["stream"] is True
    assert [h["epoch"] for h in art.manifest["history"]] == [1, 2, 3]
    acc = accuracy_on_test(result.uri, data)
    assert acc > 0.6, f"test accuracy {acc:.3f}; chance is {1 / CLASSES}"


# --------------------------------------------------------------------------- bad input


def test_bad_array_input_is_one_paragraph_with_exit_2(tokens, tmp_path):
    def fails(args: list[str], *expected: str) -> None:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output, result.output
        for text in expected:
            assert text in result.output, result.output

    ids = np.zeros((10, T), np.int64)
    np.savez(tmp_path / "uneven.npz", x_train=ids, y_train=np.arange(9) % 2, x_test=ids, y_test=np.arange(10) % 2)
    fails(["data", "import", str(tmp_path / "uneven.npz"), str(tmp_path / "o1")], "x_train has 10 rows but y_train")
    np.savez(tmp_path / "labels.npz", x_train=ids, y_train=np.arange(10) % 3, x_test=ids, y_test=np.arange(10) % 2)
    fails(
        ["data", "import", str(tmp_path / "labels.npz"), str(tmp_path / "o2"), "--class-names", "a,b"],
        "y_train row 2 has label 2, outside the 2 classes",
    )
    fails(["data", "import", str(tokens), str(tmp_path / "o3"), "--as", "arrays"], "--as arrays reads an .npz file")
    fails(["data", "import", str(tmp_path / "labels.npz"), str(tmp_path / "o4"), "--as", "pixels"], "--as 'pixels'")

    spec_file = tmp_path / "spec.json"

    def run_fails(*expected: str, **model) -> None:
        spec_file.write_text(
            json.dumps(pipeline(tmp_path, {"name": "parquet", "path": str(tokens)}, epochs=1, **model))
        )
        fails(["run", str(spec_file)], *expected)

    run_fails("is outside the model's vocabulary 0..9 (vocab_size)", "dataset.json's value_range", vocab_size=10)

    shard = tokens / "train" / "part-00000.parquet"
    table = pq.read_table(shard)
    rows, labels = table.column("array").to_pylist(), table.column("label").to_pylist()
    pq.write_table(table.slice(0, 3), shard)  # rewritten by hand: no longer the shard the import hashed
    run_fails("part-00000.parquet does not match the sha256 that", "changed or cut short after the import")
    meta = json.loads((tokens / "dataset.json").read_text())  # an import from before shard hashes: rows checked
    for split in meta["splits"].values():
        split.pop("sha256")
    (tokens / "dataset.json").write_text(json.dumps(meta))
    column = table.schema.get_field_index("array")
    pq.write_table(
        table.set_column(column, "array", pa.array(rows[:3] + [rows[3][:-8]] + rows[4:], pa.binary())), shard
    )
    run_fails(f"part-00000.parquet row 3: the array has {8 * T - 8} bytes, but dataset.json's shape [{T}] of int64")

    labels[5] = 7
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int64()))
    pq.write_table(table, shard)
    run_fails("part-00000.parquet row 5: label 7 is outside the 4 classes")
