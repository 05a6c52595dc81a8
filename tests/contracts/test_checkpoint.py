"""Artifacts: manifest written last, nothing unpickled, every mismatch explained."""

from __future__ import annotations

import json

import pytest
import torch

from kdray.contracts.checkpoint import (
    MANIFEST,
    WEIGHTS,
    load_state_checked,
    open_artifact,
    read_artifact,
    write_artifact,
)
from kdray.core.errors import CheckpointMismatch, StorageError
from kdray.models import create_model


def publish(store, model):
    manifest = {
        "kind": "train",
        "key": "abc",
        "model": {"name": "mlp_64", "kwargs": {"num_classes": 4, "in_channels": 1, "image_size": 8}},
    }
    return write_artifact(store, manifest, model.state_dict(), {"history.json": b"[]"})


def test_round_trip(store):
    torch.manual_seed(0)
    model = create_model("mlp_64", num_classes=4, in_channels=1, image_size=8)
    art = publish(store, model)
    again = open_artifact(store.uri())
    assert again.manifest["weights"]["sha256"] == art.weights_sha256
    assert again.manifest["schema_version"] == 1 and "torch" in again.manifest["versions"]
    rebuilt = again.build_model()
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(rebuilt(x), model(x))


def test_unfinished_artifact_is_invisible(store):
    """A stage that died after writing its weights but before its manifest is not finished."""
    store.write_bytes(WEIGHTS, b"partial")
    assert read_artifact(store) is None
    with pytest.raises(StorageError, match="no finished artifact"):
        open_artifact(store.uri())
    assert not any(p.endswith(".tmp") for p in store.list(recursive=True))


def test_manifest_is_written_last(store, monkeypatch):
    order = []
    real = type(store).write_bytes
    monkeypatch.setattr(type(store), "write_bytes", lambda self, rel, data: (order.append(rel), real(self, rel, data)))
    publish(store, create_model("mlp_64", num_classes=4, in_channels=1, image_size=8))
    assert order[-1] == MANIFEST and WEIGHTS in order[:-1]


def test_corrupt_weights_are_detected(store):
    files = publish(store, create_model("mlp_64", num_classes=4, in_channels=1, image_size=8)).store
    data = bytearray(files.read_bytes(WEIGHTS))
    data[-10] ^= 0xFF
    files.write_bytes(WEIGHTS, bytes(data))
    with pytest.raises(CheckpointMismatch, match="does not match its manifest"):
        open_artifact(store.uri()).state_dict()


def test_truncated_weights_without_hash(store):
    art = publish(store, create_model("mlp_64", num_classes=4, in_channels=1, image_size=8))
    manifest = dict(art.manifest)
    manifest["weights"] = {**manifest["weights"], "sha256": None}
    store.write_bytes(MANIFEST, json.dumps(manifest).encode())
    art.store.write_bytes(WEIGHTS, art.store.read_bytes(WEIGHTS)[:100])  # the version folder holds the files
    with pytest.raises(CheckpointMismatch, match="not a readable safetensors file"):
        open_artifact(store.uri()).state_dict()


def test_shape_mismatch_names_every_difference():
    small = create_model("mlp_64", num_classes=4, in_channels=1, image_size=8)
    big = create_model("mlp_128", num_classes=4, in_channels=1, image_size=8)
    with pytest.raises(CheckpointMismatch) as err:
        load_state_checked(small, big.state_dict(), source="file:///x", target="mlp_64")
    msg = str(err.value)
    assert "layers.0.0.weight: model (64, 64) vs file (128, 64)" in msg and "transfer stage" in msg


def test_missing_and_unexpected_keys():
    model = create_model("cnn_small", num_classes=4, in_channels=1, image_size=8)
    state = model.state_dict()
    state["extra.weight"] = state.pop("classifier.weight")
    with pytest.raises(CheckpointMismatch, match=r"missing in file: classifier.weight; not in model: extra.weight"):
        load_state_checked(model, state, source="s", target="cnn_small")


def test_storage_write_is_atomic_and_listable(store):
    store.write_bytes("a/b/c.txt", b"1")
    store.write_bytes("a/b/c.txt", b"22")
    assert store.read_bytes("a/b/c.txt") == b"22"
    assert store.list("a/b") == ["a/b/c.txt"]
    with pytest.raises(StorageError, match="does not exist"):
        store.read_bytes("a/nope")


def test_unwritable_root_is_a_clear_error(tmp_path):
    from kdray.core.storage import Storage

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="could not write"):
        Storage(f"file://{blocker}/sub").check_writable()
