"""Reliability: atomic re-publish, no NaN published, user errors mapped, hostile inputs refused.

The fault-injection matrix makes a write fail at each step of a re-publish (weights, a report,
the version's manifest, the commit manifest), with an ordinary error and a full disk, and checks
after each that the artifact a reader sees is the previous one, whole, or the new one, whole:
never a manifest that disagrees with its files.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, synthetic_pipeline
from typer.testing import CliRunner

from kdray.cli import app
from kdray.contracts.checkpoint import MANIFEST, WEIGHTS, Artifact, open_artifact, read_artifact, sha256, write_artifact
from kdray.core.errors import KdrayError, StorageError
from kdray.core.storage import Storage
from kdray.models import create_model

KDRAY = str(Path(sys.executable).with_name("kdray"))
MODEL = {"name": "mlp_64", "kwargs": {"num_classes": 4, "in_channels": 1, "image_size": 8}}
FAULT_CASES: list[str] = []  # every injected fault, for the count in the report


def publish(store: Storage, seed: int, report: bytes = b"# report") -> Artifact:
    torch.manual_seed(seed)
    model = create_model("mlp_64", num_classes=4, in_channels=1, image_size=8)
    manifest = {"kind": "train", "pipeline": "p", "stage": "s", "key": "k", "model": MODEL, "seed": seed}
    return write_artifact(store, manifest, model.state_dict(), {"report.md": report, "history.json": b"[]"})


def assert_consistent(store: Storage) -> Artifact | None:
    """The artifact a reader sees agrees with every file its manifest names (or there is none)."""
    art = read_artifact(store)
    if art is None:
        return None
    for name, record in art.manifest["files"].items():
        assert sha256(art.read_bytes(name)) == record["sha256"]
    if art.manifest.get("weights"):
        assert sha256(art.store.read_bytes(WEIGHTS)) == art.weights_sha256
        art.build_model()  # weights load into the recorded architecture
    return art


# --------------------------------------------------------------------------- 1. atomic re-publish


def test_republish_writes_a_fresh_version_and_keeps_the_old_one(store):
    first = publish(store, 0)
    second = publish(store, 1, b"# other report")
    assert first.pinned_uri != second.pinned_uri and first.uri == second.uri == store.uri()
    assert assert_consistent(store).weights_sha256 == second.weights_sha256  # type: ignore[union-attr]
    old = open_artifact(first.pinned_uri)  # a consumer that pinned the first version still reads it
    assert old.weights_sha256 == first.weights_sha256 and old.read_bytes("report.md") == b"# report"
    same = publish(store, 1, b"# other report")  # identical content: the same immutable version
    assert same.pinned_uri == second.pinned_uri


WRITES = ["weights", "report", "version manifest", "manifest"]


def _matches(step: str, rel: str, owner: Storage, home: Storage) -> bool:
    in_version = owner.root != home.root
    return {
        "weights": rel == WEIGHTS,
        "report": rel == "report.md",
        "version manifest": rel == MANIFEST and in_version,
        "manifest": rel == MANIFEST and not in_version,
    }[step]


@pytest.mark.parametrize("fault", ["error", "disk full"])
@pytest.mark.parametrize("step", WRITES)
def test_a_failed_republish_leaves_the_previous_artifact(store, monkeypatch, step, fault):
    """A --force rerun that dies at any write: readers still see the previous artifact, whole."""
    FAULT_CASES.append(f"{step}/{fault}")
    before = publish(store, 0)
    real_write, real_fsync = Storage.write_bytes, os.fsync

    def failing(self, rel, data):
        if _matches(step, rel, self, store):
            if fault == "error":
                raise StorageError(f"injected failure writing {rel}")
            monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
            try:
                return real_write(self, rel, data)
            finally:
                monkeypatch.setattr(os, "fsync", real_fsync)
        return real_write(self, rel, data)

    monkeypatch.setattr(Storage, "write_bytes", failing)
    with pytest.raises(StorageError):
        publish(store, 1, b"# new report")
    monkeypatch.undo()
    seen = assert_consistent(store)
    assert seen is not None and seen.manifest == before.manifest, "the previous artifact is untouched"
    leftovers = [p for p in store.list(recursive=True) if p.endswith(".tmp")]
    assert not leftovers, f"partial files left behind: {leftovers}"


def test_a_first_publish_that_fails_leaves_no_artifact(store, monkeypatch):
    FAULT_CASES.append("first publish/manifest")
    real = Storage.write_bytes
    monkeypatch.setattr(
        Storage,
        "write_bytes",
        lambda self, rel, data: (
            (_ for _ in ()).throw(StorageError("boom"))
            if rel == MANIFEST and self.root == store.root
            else real(self, rel, data)
        ),
    )
    with pytest.raises(StorageError):
        publish(store, 0)
    monkeypatch.undo()
    assert read_artifact(store) is None


def test_a_reader_polling_during_republishes_never_sees_a_mismatch(store):
    """Two writers re-publish the same artifact in a loop while a reader checks every manifest it sees."""
    publish(store, 0)
    stop, errors, reads = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            try:
                assert_consistent(store)
                reads[0] += 1
            except Exception as e:
                errors.append(e)

    def writer(seed):
        for i in range(6):
            publish(store, seed * 100 + i, f"# report {seed} {i}".encode())

    threads = [threading.Thread(target=reader)] + [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    assert not errors, errors[:3]
    assert reads[0] > 0
    FAULT_CASES.append(f"concurrent republish ({reads[0]} reads)")


MANIFEST_BASE = {"kind": "train", "pipeline": "p", "stage": "s", "key": "k"}


def test_a_publish_deletes_versions_older_than_an_hour_and_keeps_recent_ones(store):
    old = {**MANIFEST_BASE, "created_at": "2020-01-01T00:00:00Z"}
    first = write_artifact(store, old, {"w": torch.zeros(3)})
    second = write_artifact(store, MANIFEST_BASE, {"w": torch.ones(3)})
    versions = lambda: sorted(p.rsplit("/", 1)[-1] for p in store.list("v"))  # noqa: E731
    assert versions() == sorted([second.manifest["version"][2:]]), "the 2020 version is gone, the current one kept"
    store.write_bytes("v/unfinished/model.safetensors", b"a publisher still at work")
    third = write_artifact(store, MANIFEST_BASE, {"w": torch.full((3,), 2.0)})
    assert versions() == sorted([second.manifest["version"][2:], third.manifest["version"][2:], "unfinished"]), (
        "a version younger than an hour (a reader may still read it) and an uncommitted folder are kept"
    )
    assert torch.equal(read_artifact(store).state_dict()["w"], torch.full((3,), 2.0))
    assert first.manifest["version"] != second.manifest["version"]


def test_old_layout_artifacts_are_still_read(store):
    """An artifact written before version folders (files beside the manifest) reads as before."""
    torch.manual_seed(0)
    model = create_model("mlp_64", num_classes=4, in_channels=1, image_size=8)
    data = write_artifact(store.child("tmp"), {"kind": "train", "model": MODEL}, model.state_dict()).store
    store.write_bytes(WEIGHTS, data.read_bytes(WEIGHTS))
    manifest = json.loads(data.read_bytes(MANIFEST))
    manifest.pop("files")
    store.write_bytes(MANIFEST, json.dumps(manifest).encode())
    art = open_artifact(store.uri())
    assert art.store.root == store.root and art.build_model() is not None


@pytest.mark.parametrize(
    "doc, culprit",
    [
        ([1, 2], "a JSON list"),
        ({"schema_version": 1, "weights": "x"}, "'weights' is a str"),
        ({"schema_version": 1, "model": {"name": "m"}}, "'model' lacks an object 'kwargs'"),
        ({"schema_version": 1, "version": "../../etc"}, "'version' is '../../etc'"),
    ],
)
def test_a_manifest_of_the_wrong_shape_is_a_clear_error(store, doc, culprit):
    store.write_bytes(MANIFEST, json.dumps(doc).encode())
    with pytest.raises(StorageError, match="manifest") as err:
        read_artifact(store)
    assert culprit in str(err.value) and "--force" in str(err.value)


def test_two_concurrent_runs_with_different_run_settings_end_consistent(tmp_path):
    """Same stage keys, different `run` (not in the key), --force, at the same time, with a consumer."""
    doc = synthetic_pipeline(
        tmp_path, epochs=2, extra_stages=[{"name": "eval", "kind": "evaluate", "models": ["teacher"]}]
    )
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    procs = [
        subprocess.Popen(
            [KDRAY, "run", str(path), f"run.cpus_per_worker={c}", f"stages.teacher.optim.lr={lr}", "--force", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for c, lr in ((1, 3e-3), (2, 3e-3))
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    root = Storage(doc["storage"]["uri"])
    for rel in root.find(MANIFEST):
        if "/v/" not in rel:
            assert_consistent(root.child(rel.rsplit("/", 1)[0]))
    for stdout, _ in outs:
        evaluate = json.loads(stdout)[1]
        parent = open_artifact(evaluate["uri"]).manifest["parents"][0]
        pinned = open_artifact(parent["version_uri"])  # the teacher version this run's evaluation read
        assert pinned.weights_sha256 == parent["weights_sha256"]
        assert sha256(pinned.store.read_bytes(WEIGHTS)) == parent["weights_sha256"]
    FAULT_CASES.append("two concurrent runs")


# --------------------------------------------------------------------------- 2. NaN/inf guard


def test_non_finite_weights_are_never_published(store):
    state = {"w": torch.tensor([1.0, math.nan])}
    with pytest.raises(KdrayError, match="NaN or infinite"):
        write_artifact(store, {"kind": "train"}, state)
    assert read_artifact(store) is None and not store.list(recursive=True)


def test_infinite_weight_decay_is_refused_at_validation(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(synthetic_pipeline(tmp_path)))
    out = CliRunner().invoke(app, ["validate", str(path), "stages.teacher.optim.weight_decay=.inf"])
    assert out.exit_code == 2 and "weight_decay" in out.output and "finite" in out.output
    out = CliRunner().invoke(app, ["validate", str(path), "run.cpus_per_worker=.inf"])
    assert out.exit_code == 2 and "cpus_per_worker" in out.output


def test_a_diverging_stage_stops_with_stage_epoch_and_cause(tmp_path):
    from kdray.engine.pipeline import run_pipeline
    from kdray.engine.spec import parse_pipeline

    doc = synthetic_pipeline(tmp_path, epochs=3)
    doc["stages"][0]["optim"]["weight_decay"] = 1e38  # finite, but the weights overflow at once
    doc["stages"][0]["optim"]["name"] = "sgd"
    with pytest.raises(KdrayError) as err:
        run_pipeline(parse_pipeline(doc), log=lambda m: None)
    msg = str(err.value)
    assert "stage 'teacher' diverged in epoch 1" in msg and "weight_decay" in msg and "--force" in msg
    assert not list(Path(tmp_path / "runs").rglob(MANIFEST)), "nothing published"


def test_a_corrupt_teacher_cache_chunk_is_caught(tmp_path):
    from kdray.distill.cache import build_cache, read_cache_meta, read_cache_rows

    store = Storage(f"file://{tmp_path}/cache")
    x = torch.randn(40, 1, 8, 8)
    teacher = create_model("mlp_64", num_classes=4, in_channels=1, image_size=8)
    build_cache(store, teacher, x, {"data_fingerprint": "f", "num_classes": 4}, log=lambda m: None)
    assert read_cache_rows(store, 0, 40, expect_rows=40, expect_fingerprint="f").shape == (40, 4)
    chunk = "logits-000000000.safetensors"
    from kdray.contracts.checkpoint import state_to_bytes

    store.write_bytes(chunk, state_to_bytes({"logits": torch.full((40, 4), math.nan)}))  # NaN, valid file
    with pytest.raises(KdrayError, match="corrupt") as err:
        read_cache_rows(store, 0, 40, expect_rows=40, expect_fingerprint="f")
    assert f"Delete {store.uri()} and rerun the stage" in str(err.value), "--force alone reuses a complete cache"
    store.write_bytes(chunk, state_to_bytes({"logits": torch.zeros(40, 3)}))  # wrong shape
    with pytest.raises(KdrayError, match="corrupt"):
        read_cache_rows(store, 0, 40, expect_rows=40, expect_fingerprint="f")
    store.write_bytes("meta.json", b"{not json")
    assert read_cache_meta(store) is None, "a corrupt meta.json means: rebuild"
    with pytest.raises(KdrayError, match="unreadable"):
        read_cache_rows(store, 0, 40, expect_rows=40, expect_fingerprint="f")


def test_a_teacher_with_nan_outputs_is_not_cached(tmp_path):
    from kdray.distill.cache import build_cache, read_cache_meta

    store = Storage(f"file://{tmp_path}/cache")
    teacher = create_model("mlp_64", num_classes=4, in_channels=1, image_size=8)
    with pytest.raises(KdrayError, match="NaN or infinite"):
        build_cache(store, teacher, torch.full((8, 1, 8, 8), math.nan), {"data_fingerprint": "f"}, log=lambda m: None)
    assert read_cache_meta(store) is None


# --------------------------------------------------------------------------- 3. errors inside Ray, signals


def test_a_user_error_is_found_inside_rays_wrappers():
    from kdray.engine.raypolicy import find_user_error

    inner = StorageError("the bucket is gone")

    class WorkerGroupError(Exception):
        def __init__(self):
            super().__init__("Training failed due to worker errors")
            self.worker_failures = {0: RuntimeError("wrapped"), 1: Exception("x")}
            self.worker_failures[1].__cause__ = inner

    class ControllerError(Exception):
        def __init__(self, failure):
            super().__init__("controller")
            self.controller_failure = failure

    assert find_user_error(WorkerGroupError()) is inner
    assert find_user_error(ControllerError(WorkerGroupError())) is inner
    assert find_user_error(ControllerError(OSError("plain"))) is None


def test_a_corrupt_run_checkpoint_is_a_user_error_with_force_as_the_fix(tmp_path):
    from kdray.engine.loop import load_train_state, save_train_state

    model = create_model("mlp_64", num_classes=4, in_channels=1, image_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_train_state(str(tmp_path), model, opt, sched, 0, [])
    (tmp_path / "train_state.pt").write_bytes(b"garbage, not a torch file")
    with pytest.raises(KdrayError, match="corrupt or unreadable") as err:
        load_train_state(str(tmp_path), model, opt, sched)
    assert "--force" in str(err.value) and "weights_only" not in str(err.value)


# --------------------------------------------------------------------------- 4. storage inputs


def test_endpoint_credentials_are_refused_and_never_echoed(monkeypatch):
    monkeypatch.setenv("KDRAY_S3_ENDPOINT", "http://admin:s3cr3t@127.0.0.1:1")
    with pytest.raises(StorageError) as err:
        Storage("s3://bucket/prefix")
    assert "s3cr3t" not in str(err.value) and "admin" not in str(err.value)
    assert "AWS_ACCESS_KEY_ID" in str(err.value)


def test_ls_skips_a_corrupt_manifest_and_does_not_follow_link_loops(tmp_path):
    root = Storage(f"file://{tmp_path}/runs")
    publish(root.child("p/a/k1"), 0)
    publish(root.child("p/b/k2"), 1)
    root.write_bytes("p/bad/k3/manifest.json", b"{broken")
    os.symlink(tmp_path / "runs", tmp_path / "runs/p/loop")  # a link back up: a loop if followed
    out = CliRunner().invoke(app, ["ls", root.uri()])
    assert out.exit_code == 0, out.output
    assert out.output.count("p/s  train") == 2, out.output  # both good artifacts, each listed once
    assert "warning: skipped" in out.output and "p/bad/k3/manifest.json" in out.output


def test_show_refuses_a_report_link_out_of_the_artifact(tmp_path):
    root = Storage(f"file://{tmp_path}/runs")
    art = publish(root.child("p/s/k"), 0)
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    report = Path(art.store.path("report.md"))
    report.unlink()
    os.symlink(secret, report)
    out = CliRunner().invoke(app, ["show", art.uri])
    assert out.exit_code == 2 and "top secret" not in out.output and "leads out of the artifact" in out.output


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_kdray_run_with_one_line_and_its_exit_code(tmp_path, sig, code):
    doc = synthetic_pipeline(tmp_path, epochs=100_000)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = subprocess.Popen([KDRAY, "run", str(path)], stderr=subprocess.PIPE, text=True, cwd=REPO)
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:  # wait until training runs
        lines.append(line)
        if "epoch 1/" in line:
            break
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)[1], None
    assert proc.returncode == code, "".join(lines) + (rest or "")
    tail = (rest or "").strip().splitlines()
    assert tail and tail[-1].startswith(f"interrupted by {sig.name} in stage teacher of {path}"), tail[-5:]
    assert "rerun the same command to resume" in tail[-1]
    assert "Traceback" not in (rest or "") and "Fatal Python" not in (rest or "")


@pytest.mark.slow
def test_no_ray_process_outlives_a_killed_kdray_run(tmp_path):
    """``kill -9`` of ``kdray run`` while a Ray worker trains: within seconds no process of its Ray cluster remains."""
    from kdray.engine.reaper import session_pids

    doc = synthetic_pipeline(tmp_path, workers=1, epochs=100_000, cpus_per_worker=1)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = subprocess.Popen([KDRAY, "run", str(path)], stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stderr is not None
    for line in proc.stderr:  # wait until a Ray Train worker trains
        if "epoch 1/" in line:
            break
    watchers = [p for p in session_pids("kdray.engine.reaper", set()) if _ppid(p) == proc.pid]
    assert len(watchers) == 1, "kdray run started one watcher for its embedded cluster"
    with open(f"/proc/{watchers[0]}/cmdline", "rb") as f:
        session, address = (a.decode() for a in f.read().split(b"\0")[-3:-1])
    assert session.startswith("session_") and len(session_pids(session, set(), address)) >= 5, "gcs, raylet, actors"
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 60
    while (left := session_pids(session, set(), address)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [open(f"/proc/{p}/cmdline", "rb").read()[:200] for p in left]


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


# --------------------------------------------------------------------------- 4. hostile spec files and inputs


def write_spec(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "p.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def synth_yaml(tmp_path: Path, **stage_extra) -> str:
    doc = synthetic_pipeline(tmp_path)
    doc["stages"][0].update(stage_extra)
    return yaml.safe_dump(doc, sort_keys=False)


BOMB = "".join(
    f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else 'x, x, x, x, x, x, x, x, x'}]\n" for i in range(9)
)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda t: t.replace("    options:\n", "    options:\n" + BOMB.replace("  ", "      "), 1),
            "expands to more than",
        ),
        (lambda t: t.replace("name: synth\n", "name: synth\nname: other\n"), "appears twice"),
        (lambda t: t.replace("name: synth\n", "name: !!binary c3ludGg=\n"), "binary"),
        (lambda t: t.replace("name: synth\n", "name: !!python/object/apply:os.system [echo]\n"), "python"),
        (lambda t: t + "deep: " + "[" * 3000 + "]" * 3000 + "\n", "nesting deeper"),
        (lambda t: t.encode("utf-8").replace(b"synth", b"synth\xe9", 1), "not UTF-8"),
        (lambda t: b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not UTF-8"),
    ],
    ids=["alias bomb in data.options", "duplicate key", "!!binary", "python tag", "deep nesting", "latin-1", "binary"],
)
def test_hostile_yaml_is_refused_by_validate_naming_the_file(tmp_path, mutate, expected):
    path = write_spec(tmp_path, mutate(synth_yaml(tmp_path)))
    out = CliRunner().invoke(app, ["validate", str(path)])
    assert out.exit_code == 2, out.output
    assert expected in out.output and str(path) in out.output and "Traceback" not in out.output


@pytest.mark.parametrize(
    "override, expected",
    [
        ("=3", "names no field"),
        ("stages.teacher.optim.epochs=true", "epochs: expected a number, got true"),
        ("stages..optim.epochs=2", "empty part"),
        ("stages.teacher.optim.lr=!!binary AAAA", "binary"),
        ("run.cpus_per_worker=.inf", "finite"),
        ("stages.teacher.data.options.nosuch=1", "no parameter 'nosuch'"),
        ("stages.teacher.data.classes=[0, 7]", "classes 0..3, not 7"),
        ('stages.teacher.name="x\\n"', "stage name"),  # a trailing newline in a name
    ],
)
def test_bad_overrides_are_field_errors(tmp_path, override, expected):
    path = write_spec(tmp_path, synth_yaml(tmp_path))
    out = CliRunner().invoke(app, ["validate", str(path), override])
    assert out.exit_code == 2 and expected in out.output, out.output


def test_validate_catches_a_teacher_student_class_mismatch(tmp_path):
    doc = synthetic_pipeline(
        tmp_path,
        extra_stages=[
            {
                "name": "student",
                "kind": "distill",
                "teacher": "teacher",
                "model": {"name": "mlp_64"},
                "data": {"name": "synthetic", "options": {"num_samples": 256, "image_size": 8, "num_classes": 3}},
            }
        ],
    )
    out = CliRunner().invoke(app, ["validate", str(write_spec(tmp_path, yaml.safe_dump(doc)))])
    assert out.exit_code == 2 and "teacher 'teacher' has num_classes=4" in out.output, out.output


def test_an_http_teacher_uri_is_refused(tmp_path):
    doc = synthetic_pipeline(
        tmp_path,
        extra_stages=[
            {"name": "student", "kind": "distill", "teacher": "http://example.org/t", "model": {"name": "mlp_64"}}
        ],
    )
    out = CliRunner().invoke(app, ["validate", str(write_spec(tmp_path, yaml.safe_dump(doc)))])
    assert out.exit_code == 2 and "file://... or s3://... only" in out.output, out.output
    with pytest.raises(StorageError, match="file:// and s3:// only"):
        Storage("http://example.org/t")


def test_only_an_unknown_stage_is_an_error_with_a_suggestion(tmp_path):
    path = write_spec(tmp_path, synth_yaml(tmp_path))
    out = CliRunner().invoke(app, ["run", str(path), "--only", "teachr"])
    assert out.exit_code == 2 and "no stage named 'teachr'" in out.output and "teacher" in out.output, out.output
    assert not (tmp_path / "runs").exists(), "nothing ran"


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("train-images-idx3-ubyte.gz", b"\x1f\x8b\x08\x00garbage", "not a readable gzip file"),
        ("train-images-idx3-ubyte.gz", None, "not a readable gzip file"),  # truncated gzip
        ("train-images-idx3-ubyte", b"\x00\x00\x08\x03\x00\x00", "truncated"),  # a 6-byte header
        ("train-labels-idx1-ubyte", "labels 12", "outside the 10 classes"),
    ],
)
def test_bad_idx_files_are_data_errors(tmp_path, name, content, expected):
    import gzip

    import numpy as np
    from helpers.datasets import idx_bytes, write_fake_fmnist

    from kdray.contracts.specs import DataSpec
    from kdray.core.errors import DataError
    from kdray.data import datasets as kdata

    folder = tmp_path / "fm"
    write_fake_fmnist(folder, gz=False)
    if content is None:
        content = gzip.compress(idx_bytes(np.zeros((40, 28, 28), np.uint8)))[:-40]
    elif content == "labels 12":
        content = idx_bytes(np.full(40, 12, np.uint8))
    (folder / name).write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=expected):
        kdata.load(DataSpec(name="fashion_mnist", path=str(folder)), "train")


def test_a_train_stage_iterates_only_labelled_rows(tmp_path, capsys):
    from kdray.contracts.specs import RunSpec
    from kdray.contracts.stage import Job, kind_of
    from kdray.engine.spec import parse_pipeline

    doc = synthetic_pipeline(tmp_path)
    doc["stages"][0]["data"]["label_fraction"] = 0.25
    stage = parse_pipeline(doc).stages[0]
    train, _ = kind_of(stage).data(Job("synth", stage, RunSpec(), "k"))
    assert bool((train.y >= 0).all()) and 0 < len(train) < 100
    assert "training on the" in capsys.readouterr().out
    from kdray.distill.stage import DistillKind
    from kdray.supervised import TrainKind
    from kdray.transfer.stage import TransferKind

    assert not TrainKind.uses_unlabelled and not TransferKind.uses_unlabelled and DistillKind.uses_unlabelled


# --------------------------------------------------------------------------- bounded Kubernetes waits


def kubeconfig(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "kubeconfig"
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_kubernetes_api_that_never_answers_times_out_with_the_limit(tmp_path, monkeypatch):
    import socket

    from kdray.k8s import client as k8s

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts connections (the kernel does), never answers
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}")))
    monkeypatch.setattr(k8s, "REQUEST_TIMEOUT_S", (1.0, 1.0))
    try:
        with pytest.raises(KdrayError, match="did not answer") as err:
            k8s.KubeRayClient().status("x")
        assert "1 s to answer" in str(err.value)
    finally:
        silent.close()


def test_a_closed_port_or_garbage_kubeconfig_is_a_user_error(tmp_path, monkeypatch):
    import socket

    from kdray.k8s import client as k8s

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once this block ends
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path, f"http://127.0.0.1:{port}")))
    monkeypatch.setattr(k8s, "REQUEST_TIMEOUT_S", (1.0, 1.0))
    with pytest.raises(KdrayError, match="did not answer"):
        k8s.KubeRayClient().status("x")
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00\xffnot: [a kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(garbage))
    with pytest.raises(KdrayError, match="no Kubernetes credentials found"):
        k8s.KubeRayClient()


# --------------------------------------------------------------------------- user errors inside Ray


def test_the_failure_policy_raises_a_user_error_at_once_and_retries_others():
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from kdray.engine.raypolicy import trainer_class, user_error_policy

    assert trainer_class().__name__ == "KdrayTorchTrainer"
    policy = user_error_policy()(FailureConfig(max_failures=3))
    user = WorkerGroupError("failed", {0: KdrayError("bad data")})
    other = WorkerGroupError("failed", {0: RuntimeError("worker died")})
    assert policy.make_decision(user) == FailureDecision.RAISE
    assert policy.make_decision(other) == FailureDecision.RETRY


@pytest.mark.slow
def test_a_user_error_in_a_ray_worker_comes_back_as_itself(tmp_path, ray_local):
    """A stage that diverges inside a Ray Train worker: the driver raises the worker's KdrayError."""
    from kdray.engine.pipeline import run_pipeline
    from kdray.engine.spec import parse_pipeline

    doc = synthetic_pipeline(tmp_path, workers=1, epochs=3, max_failures=3, cpus_per_worker=1)
    doc["stages"][0]["optim"].update(weight_decay=1e38, name="sgd")
    with pytest.raises(KdrayError, match="stage 'teacher' diverged in epoch 1"):
        run_pipeline(parse_pipeline(doc), log=lambda m: None)
