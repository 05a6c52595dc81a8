"""The teacher cache of a streamed distill stage: built by Ray Data batch inference, read per batch.

With ``data.stream: true`` and deterministic inputs, ``teacher_cache: auto`` runs the teacher once
over every row of the training shards through a Ray Data actor pool (``kdray.engine.inference``),
writes the cache's chunks in row-id order, and the training pipeline attaches each streamed batch's
``teacher_logits`` from them (``kdray.distill.cache.attach_logits``): the teacher never runs in the
training worker. Checked against the teacher itself, row by row, and against online distillation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import quiet
from helpers.datasets import accuracy_on_test, write_npz

from kdray.contracts.checkpoint import open_artifact
from kdray.contracts.specs import DataSpec
from kdray.core.errors import KdrayError
from kdray.core.storage import Storage
from kdray.data import datasets as kdata
from kdray.data.files import import_dataset
from kdray.distill.cache import _CHUNKS, _METAS, ChunkWriter, attach_logits
from kdray.distill.stage import DistillStage, cache_decision
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline


class Count:
    def __init__(self) -> None:
        self.done = 0

    def update(self, done: int, note: str = "") -> None:
        self.done = done

    def close(self) -> None:
        pass


def test_the_chunk_writer_writes_complete_chunks_in_row_order_and_attach_reads_them_back(tmp_path, monkeypatch):
    monkeypatch.setattr("kdray.distill.cache.CHUNK_ROWS", 64)
    store = Storage(f"file://{tmp_path}/cache")
    rows, logits = 150, torch.randn(150, 5)
    writer = ChunkWriter(store, rows, Count())  # type: ignore[arg-type]
    for start in range(0, rows, 40):  # batches that straddle chunk boundaries
        writer(np.arange(start, min(start + 40, rows)), logits[start : start + 40].numpy())
    meta = writer.finish({"data_fingerprint": "fp", "num_classes": 5}, 1.0)
    assert sorted(meta["chunks"]) == ["logits-000000000.safetensors", "logits-000000064.safetensors",
                                      "logits-000000128.safetensors"]  # fmt: skip
    assert json.loads(store.read_bytes("meta.json"))["rows"] == rows
    ids = np.array([149, 3, 64, 63, 100, 0])
    _CHUNKS.clear()
    _METAS.clear()
    out = attach_logits({"index": ids, "x": np.zeros((6, 1))}, store=store)
    assert np.array_equal(out["teacher_logits"], logits[ids].numpy())

    with pytest.raises(KdrayError, match="rows arrived out of order at row 0"):
        ChunkWriter(store, rows, Count())(np.arange(5, 10), logits[5:10].numpy())  # type: ignore[arg-type]
    short = ChunkWriter(Storage(f"file://{tmp_path}/short"), rows, Count())  # type: ignore[arg-type]
    short(np.arange(0, 10), logits[:10].numpy())
    with pytest.raises(KdrayError, match="10 of 150 rows came back"):
        short.finish({}, 1.0)
    assert not Storage(f"file://{tmp_path}/short").exists("meta.json"), "no meta.json: the cache is not committed"


def test_streamed_distillation_caches_its_teacher_and_data_free_streaming_is_refused(tmp_path):
    data = {"name": "parquet", "path": str(tmp_path), "stream": True}
    distill = {"name": "kd", "kind": "distill", "teacher": "net", "model": {"name": "mlp_32"}, "data": data}
    use, why = cache_decision(DistillStage.model_validate(distill))
    assert use and "Ray Data batch inference" in why
    assert cache_decision(DistillStage.model_validate({**distill, "teacher_cache": "on"}))[0]
    with pytest.raises(KdrayError, match="data.stream: true cannot be combined with data_free"):
        cache_decision(DistillStage.model_validate({**distill, "data_free": {}}))


@pytest.mark.slow
def test_a_streamed_distill_stage_builds_its_cache_with_ray_data_and_trains_from_it(ray_local, tmp_path):
    import_dataset(str(write_npz(tmp_path / "tiny.npz")), str(tmp_path / "ds"), shard_rows=100, log=quiet)
    data = {"name": "parquet", "path": str(tmp_path / "ds"), "seed": 1}
    optim = {"epochs": 3, "batch_size": 32, "lr": 3e-3}
    doc = {
        "name": "kdcache",
        "storage": {"uri": f"file://{tmp_path}/runs"},
        "run": {"workers": 1},
        "stages": [
            {"name": "teacher", "kind": "train", "model": {"name": "cnn_small"}, "data": data, "optim": optim,
             "run": {"workers": 0}},  # fmt: skip
            {"name": "cached", "kind": "distill", "teacher": "teacher", "model": {"name": "mlp_32"},
             "data": {**data, "stream": True}, "losses": [{"name": "hinton_kl", "temperature": 4.0}], "optim": optim},
            {"name": "online", "kind": "distill", "teacher": "teacher", "model": {"name": "mlp_32"},
             "data": {**data, "stream": True}, "losses": [{"name": "hinton_kl", "temperature": 4.0}], "optim": optim,
             "teacher_cache": "off"},
        ],
    }  # fmt: skip
    lines: list[str] = []
    outcomes = {o.stage: o for o in run_pipeline(parse_pipeline(doc), log=lines.append, max_concurrent=1)}
    assert any("teacher cache on" in line and "Ray Data batch inference" in line for line in lines), lines
    cached = open_artifact(outcomes["cached"].uri)
    cache_uri = cached.manifest["teacher"]["cache"]
    assert cache_uri and open_artifact(outcomes["online"].uri).manifest["teacher"]["cache"] is None

    # the cache holds the teacher's logits for every row of the training shards, in row-id order
    store = Storage(cache_uri)
    meta = json.loads(store.read_bytes("meta.json"))
    assert meta["rows"] == 300
    _CHUNKS.clear()
    _METAS.clear()
    logits = attach_logits({"index": np.arange(300)}, store=store)["teacher_logits"]
    raw = kdata.DATASETS.get("parquet")("train", path=str(tmp_path / "ds"))
    teacher = open_artifact(outcomes["teacher"].uri).build_model().eval()
    with torch.no_grad():
        expected = teacher(kdata.normalize(raw.x, raw)).numpy()
    assert np.abs(logits - expected).max() < 1e-4

    # trained from the cache as well as with the teacher online: both well above chance (4 classes)
    acc_cached, acc_online = (
        accuracy_on_test(outcomes["cached"].uri, data),
        accuracy_on_test(outcomes["online"].uri, data),
    )
    assert acc_cached > 0.9 and acc_online > 0.9, (acc_cached, acc_online)
    assert DataSpec.model_validate(data).name == "parquet"
