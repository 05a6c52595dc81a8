"""data.transforms: each transform on real Fashion-MNIST tensors, seeded augmentation in the batch source
only (validation and test get the deterministic view), an augmented train stage end to end, the
distill teacher-cache decision, and spec errors naming the field."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers import needs_fmnist
from typer.testing import CliRunner

from kdray.cli import app
from kdray.contracts.checkpoint import open_artifact
from kdray.contracts.specs import DataSpec, RunSpec
from kdray.contracts.stage import Job, kind_of, model_kwargs
from kdray.core.errors import KdrayError, SpecError
from kdray.data import datasets as kdata
from kdray.data import stream
from kdray.data import transforms as T
from kdray.data.files import import_dataset
from kdray.distill.stage import cache_decision
from kdray.engine.datasets import MemoryBatches, stream_datasets
from kdray.engine.pipeline import plan, run_pipeline
from kdray.engine.spec import parse_pipeline

runner = CliRunner()

FMNIST = {"name": "fashion_mnist", "limit": 256, "val_size": 64, "test_limit": 128}
AUGMENT = [{"resize": 32}, {"random_crop": {"size": 24, "padding": 2}}, {"hflip": 0.5}]


def spec(**data) -> DataSpec:
    return DataSpec.model_validate({**FMNIST, **data})


def steps(*items) -> list[T.TransformSpec]:
    return [T.TransformSpec.model_validate(i) for i in items]


@pytest.fixture(scope="module")
def fmnist() -> kdata.Split:
    """256 real Fashion-MNIST training images, pixels in [0, 1], no transforms."""
    return kdata.load(spec(), "train")


# --------------------------------------------------------------------------- each transform's effect


@needs_fmnist
def test_deterministic_transforms_change_size_and_statistics(fmnist):
    x = fmnist.x
    assert x.shape[1:] == (1, 28, 28)
    big = T.apply(x, steps({"resize": 32}))
    assert big.shape == (len(x), 1, 32, 32) and 0 <= float(big.min()) and float(big.max()) <= 1
    assert torch.allclose(big.mean(), x.mean(), atol=0.01)  # a resize keeps the picture, not just the shape
    assert torch.equal(T.apply(x, steps({"center_crop": 20})), x[..., 4:24, 4:24])
    padded = T.apply(x, steps({"center_crop": 32}))  # larger than the image: zero-padded around it
    assert (
        padded.shape[-1] == 32
        and torch.equal(padded[..., 2:30, 2:30], x)
        and float(padded[..., :2, :].abs().sum()) == 0
    )

    normalized = [{"resize": 32}, {"center_crop": 30}, {"normalize": {"mean": [0.5], "std": [0.25]}}]
    loaded = kdata.load(spec(transforms=normalized), "train")
    assert loaded.x.shape[1:] == (1, 30, 30) and loaded.mean == 0.5 and loaded.std == 0.25
    assert torch.equal(loaded.y, fmnist.y) and loaded.fingerprint != fmnist.fingerprint
    z = kdata.normalize(loaded.x, loaded)
    assert torch.allclose(z, (loaded.x - 0.5) / 0.25)
    assert kdata.describe(spec(transforms=[{"resize": 32}, {"random_crop": 24}]))["image_size"] == 24


@needs_fmnist
def test_flips_really_flip_and_crops_are_seeded(fmnist):
    x, rows = fmnist.x, torch.arange(len(fmnist))
    assert torch.equal(T.apply(x, steps({"hflip": 1.0}), train=True, rows=rows), x.flip(-1))
    assert torch.equal(T.apply(x, steps({"hflip": 0.0}), train=True, rows=rows), x)
    half = T.apply(x, steps({"hflip": 0.5}), train=True, rows=rows, seed=3, epoch=1)
    flipped = torch.tensor([torch.equal(a, b.flip(-1)) and not torch.equal(a, b) for a, b in zip(half, x)])
    same = torch.tensor([torch.equal(a, b) for a, b in zip(half, x)])
    assert bool((flipped | same).all()) and 80 < int(flipped.sum()) < 176  # each row flipped or not, about half

    crop = steps({"random_crop": {"size": 28, "padding": 4}})
    a = T.apply(x, crop, train=True, rows=rows, seed=0, epoch=0)
    assert a.shape == x.shape
    assert torch.equal(a, T.apply(x, crop, train=True, rows=rows, seed=0, epoch=0)), "same key, same crops"
    # a row's crop depends on its id, not on the batch it lands in
    assert torch.equal(a[100:110], T.apply(x[100:110], crop, train=True, rows=rows[100:110], seed=0, epoch=0))
    b = T.apply(x, crop, train=True, rows=rows, seed=0, epoch=1)
    c = T.apply(x, crop, train=True, rows=rows, seed=1, epoch=0)
    differ = [sum(not torch.equal(u, v) for u, v in zip(a, other)) for other in (b, c)]
    assert min(differ) > 200, f"another epoch or seed moves most crops: {differ}"
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(0, len(x), 37):  # every output is a 28x28 window of the padded image
        windows = padded[i, 0].unfold(0, 28, 1).unfold(1, 28, 1).reshape(-1, 28, 28)
        assert any(torch.equal(a[i, 0], w) for w in windows)
    assert torch.equal(T.apply(x, crop), x), "the deterministic view: the centre crop of the padded image"


@needs_fmnist
def test_validation_and_test_get_only_the_deterministic_view(fmnist):
    flips = spec(transforms=[{"random_crop": {"size": 28, "padding": 3}}, {"hflip": 1.0}])
    for part in ("val", "test"):
        plain, seen = kdata.load(spec(), part), kdata.load(flips, part)
        assert torch.equal(seen.x, plain.x) and not seen.augment
    train = kdata.load(flips, "train", augment=True)
    assert torch.equal(train.x, fmnist.x) and [s.name for s in train.augment] == ["random_crop", "hflip"]
    resized = kdata.load(spec(transforms=AUGMENT), "train", augment=True)
    assert resized.x.shape[-1] == 32 and len(resized.augment) == 2  # resize once at load; the rest per batch
    assert kdata.load(spec(transforms=AUGMENT), "val").x.shape[-1] == 24


@needs_fmnist
def test_the_batch_source_augments_each_epoch_reproducibly():
    doc = {
        "name": "t",
        "run": {"workers": 0},
        "stages": [
            {
                "name": "teacher",
                "kind": "train",
                "model": {"name": "cnn_small"},
                "data": {**FMNIST, "transforms": AUGMENT},
                "optim": {"batch_size": 64},
            }
        ],
    }
    stage = parse_pipeline(doc).stages[0]
    job = Job("t", stage, RunSpec(seed=5), "k", extras={"model_kwargs": model_kwargs(stage.model, stage.data)})
    assert job.extras["model_kwargs"]["image_size"] == 24

    def epoch(source: MemoryBatches, e: int) -> list[dict[str, torch.Tensor]]:
        return list(source.epoch(e))

    one, two = MemoryBatches(job, kind_of(stage), 0, 1, 64), MemoryBatches(job, kind_of(stage), 0, 1, 64)
    first = epoch(one, 0)
    assert all(b["x"].shape[1:] == (1, 24, 24) for b in first) and one.shard.x.shape[1:] == (1, 24, 24)
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(first, epoch(two, 0))), "a rerun: the same batches"
    again = {int(i): x for b in epoch(one, 1) for i, x in zip(b["index"], b["x"])}
    moved = sum(not torch.equal(x, again[int(i)]) for b in first for i, x in zip(b["index"], b["x"]))
    assert moved > 200, f"the next epoch augments differently ({moved} of 256 rows changed)"
    val = torch.cat([x for x, _ in one.validation()])
    plain = kdata.load(DataSpec.model_validate({**FMNIST, "transforms": AUGMENT}), "val")
    assert torch.equal(val, kdata.normalize(plain.x, plain))
    job2 = dataclasses.replace(job, run=RunSpec(seed=6))
    other = epoch(MemoryBatches(job2, kind_of(stage), 0, 1, 64), 0)
    assert not all(torch.equal(a["x"], b["x"]) for a, b in zip(first, other)), "another run seed, other crops"


# --------------------------------------------------------------------------- stages


def pipeline(tmp_path, **student) -> dict:
    data = {**FMNIST, "transforms": AUGMENT}
    return {
        "name": "aug",
        "storage": {"uri": f"file://{tmp_path}/runs"},
        "run": {"workers": 0},
        "stages": [
            {
                "name": "teacher",
                "kind": "train",
                "model": {"name": "cnn_small"},
                "data": data,
                "optim": {"epochs": 2, "batch_size": 64, "lr": 3e-3},
            },
            {
                "name": "student",
                "kind": "distill",
                "teacher": "teacher",
                "model": {"name": "mlp_64"},
                "data": data,
                "optim": {"epochs": 1, "batch_size": 64},
                **student,
            },
        ],
    }


@needs_fmnist
def test_augmented_stages_train_publish_and_distill_online(tmp_path):
    doc = pipeline(tmp_path)
    lines: list[str] = []
    out = run_pipeline(parse_pipeline(doc), log=lines.append)
    assert [o.status for o in out] == ["ran", "ran"], out
    teacher, student = (open_artifact(o.uri).manifest for o in out)
    assert teacher["model"]["kwargs"]["image_size"] == 24 and student["model"]["kwargs"]["image_size"] == 24
    assert teacher["spec"]["data"]["transforms"][1] == {"random_crop": {"size": 24, "padding": 2}}
    assert len(teacher["history"]) == 2 and all(0 <= h["val_acc"] <= 1 for h in teacher["history"])
    assert student["teacher"]["cache"] is None and "random augmentation" in student["teacher"]["cache_reason"]
    said = [line for line in lines if "teacher cache off" in line]
    assert said and "random augmentation (random_crop, hflip)" in said[0], lines

    # teacher_cache: on is refused through the CLI: exit code 2, the field named, no traceback
    path = tmp_path / "aug.yaml"
    doc["stages"][1]["teacher_cache"] = "on"  # quoted in the YAML (a bare on is YAML's true)
    path.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert "stages.student.teacher_cache: on is impossible with random augmentation" in result.output
    assert "Traceback" not in result.output


def test_cache_decision_with_and_without_random_augmentation(tmp_path):
    doc = pipeline(tmp_path)
    auto = parse_pipeline(doc).stages[1]
    assert cache_decision(auto) == (
        False,
        "running the teacher online: data.transforms has random augmentation (random_crop, hflip), so the inputs "
        "differ every epoch and cached outputs would not match them",
    )
    with pytest.raises(KdrayError, match=r"stages\.student\.teacher_cache: on is impossible") as e:
        cache_decision(auto.model_copy(update={"teacher_cache": "on"}))
    assert "teacher_cache: auto or off" in str(e.value)
    fixed = auto.model_copy(update={"data": spec(transforms=[{"resize": 32}, {"hflip": 0.0}])})
    assert cache_decision(fixed)[0] is True, "deterministic transforms keep the cache"


# --------------------------------------------------------------------------- the spec


def test_stage_keys_ignore_an_empty_list_and_change_with_transforms(tmp_path):
    assert "transforms" not in DataSpec().model_dump(mode="json")
    doc = pipeline(tmp_path)
    keys = [
        plan(parse_pipeline(d))["teacher"]
        for d in (doc, _with(doc, []), _with(doc, None), _with(doc, [{"resize": 30}]))
    ]
    assert keys[1] == keys[2] and len({keys[0], keys[1], keys[3]}) == 3
    dumped = parse_pipeline(doc).stages[0].data.model_dump(mode="json")["transforms"]
    assert dumped == [{"resize": {"size": 32}}, {"random_crop": {"size": 24, "padding": 2}}, {"hflip": {"p": 0.5}}]
    assert (
        DataSpec.model_validate({"transforms": dumped}).transforms
        == DataSpec.model_validate({"transforms": AUGMENT}).transforms
    )


def _with(doc: dict, transforms) -> dict:
    out = yaml.safe_load(yaml.safe_dump(doc))
    if transforms is None:
        del out["stages"][0]["data"]["transforms"]
    else:
        out["stages"][0]["data"]["transforms"] = transforms
    return out


BAD = {
    "bad size": (
        [{"resize": 32}, {"random_crop": {"size": 0}}],
        "stages[0] (teacher).data.transforms[1].random_crop.size",
    ),
    "unknown name": ([{"rotate": 10}], "stages[0] (teacher).data.transforms[0]: unknown transform 'rotate'"),
    "typo": ([{"hfilp": 0.5}], "did you mean 'hflip'"),
    "two in one": ([{"resize": 32, "hflip": 0.5}], "each transform is one mapping"),
    "bad param": (
        [{"random_crop": {"size": 24, "pad": 2}}],
        "stages[0] (teacher).data.transforms[0].random_crop.pad: unknown",
    ),
    "probability": ([{"hflip": 1.5}], "stages[0] (teacher).data.transforms[0].hflip.p"),
    "bool": ([{"resize": True}], "expected a number, got true"),
    "normalize last": ([{"normalize": {"mean": [0.5], "std": [0.2]}}, {"resize": 32}], "must be the last transform"),
    "std": ([{"normalize": {"mean": [0.5], "std": [0.0]}}], "std must be positive"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_transform_is_a_spec_error_naming_the_field(tmp_path, case):
    transforms, expected = BAD[case]
    doc = _with(pipeline(tmp_path), transforms)
    with pytest.raises(SpecError) as e:
        parse_pipeline(doc)
    assert expected in str(e.value), str(e.value)
    if case == "bad size":  # and through the CLI: exit code 2, no traceback
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(doc))
        result = runner.invoke(app, ["validate", str(path)])
        assert result.exit_code == 2 and expected in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------- streamed data (Ray Data)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, fmnist) -> str:
    """The 256 Fashion-MNIST images as Parquet shards (``kdray data import`` of an .npz), 3 shards."""
    folder = tmp_path_factory.mktemp("fmnist-shards")
    pixels = (fmnist.x[:, 0] * 255).round().to(torch.uint8).numpy()
    np.savez(folder / "fmnist.npz", x=pixels, y=fmnist.y.numpy())
    import_dataset(
        str(folder / "fmnist.npz"), str(folder / "ds"), shard_rows=100, test_fraction=0.25, log=lambda m: None
    )
    return str(folder / "ds")


def read_batch(shards: str, part: str = "part-00000.parquet") -> dict[str, np.ndarray]:
    table = pq.read_table(f"{shards}/train/{part}")
    return {
        "id": table.column("id").to_numpy(),
        "image": np.array(table.column("image").to_pylist(), dtype=object),
        "path": np.array([part] * len(table), dtype=object),
    }


@needs_fmnist
def test_decode_batch_augments_the_streamed_training_part_only(shards):
    data = DataSpec.model_validate({"name": "parquet", "path": shards, "transforms": AUGMENT})
    plan = stream.plan(data)
    options = {**stream.decode_options(plan.meta), **stream.transform_options(plan.meta, data.transforms)}
    batch = read_batch(shards)

    def decoded(part, **kw) -> dict[int, np.ndarray]:
        out = stream.decode_batch(batch, lookup=plan.lookup(part), seed=2, **options, **kw)
        assert out["x"].shape[1:] == (1, 24, 24)
        return {int(i): x for i, x in zip(out["index"], out["x"])}

    first = decoded(plan.train, augment=True, epoch=0)
    assert all(
        np.array_equal(x, y) for x, y in zip(first.values(), decoded(plan.train, augment=True, epoch=0).values())
    )
    later = decoded(plan.train, augment=True, epoch=1)
    assert sum(not np.array_equal(first[i], later[i]) for i in first) > 0.8 * len(first), "another epoch, other crops"
    # the validation part gets the deterministic view, the same as the in-memory path's
    memory = kdata.load(data, "val")
    row = {int(r): j for j, r in enumerate(plan.val.x)}
    for i, x in decoded(plan.val).items():
        assert np.allclose(x, kdata.normalize(memory.x[row[i] : row[i] + 1], memory)[0].numpy(), atol=1e-5)


@pytest.mark.slow
@needs_fmnist
def test_a_streamed_stage_augments_in_ray_data_and_publishes(ray_local, shards, tmp_path):
    """The transforms run in Ray Data's map_batches: each execution of the training dataset (an epoch)
    augments differently, reproducibly; a workers: 1 streamed train stage then trains and publishes."""
    data = {"name": "parquet", "path": shards, "stream": True, "transforms": AUGMENT}
    doc = {
        "name": "streamed",
        "storage": {"uri": f"file://{tmp_path}/runs"},
        "run": {"workers": 1},
        "stages": [{"name": "net", "kind": "train", "model": {"name": "cnn_small"}, "data": data,
                    "optim": {"epochs": 2, "batch_size": 32}}],
    }  # fmt: skip
    spec = parse_pipeline(doc)
    stage = spec.stages[0]
    job = Job("streamed", stage, spec.run, "k", extras={"model_kwargs": model_kwargs(stage.model, stage.data)})

    def rows(ds) -> dict[int, np.ndarray]:
        return {int(i): x for b in ds.iter_batches(batch_format="numpy") for i, x in zip(b["index"], b["x"])}

    datasets, facts = stream_datasets(job, kind_of(stage))
    first, second = rows(datasets["train"]), rows(datasets["train"])
    again = rows(stream_datasets(job, kind_of(stage))[0]["train"])
    assert first.keys() == second.keys() and len(first) == facts["train_rows"]
    assert all(x.shape == (1, 24, 24) for x in first.values())
    assert all(np.array_equal(first[i], again[i]) for i in first), "a rerun: the same augmentation"
    assert sum(not np.array_equal(first[i], second[i]) for i in first) > 0.8 * len(first), "epoch 2 differs"

    out = run_pipeline(spec, log=lambda m: None)[0]
    manifest = open_artifact(out.uri).manifest
    assert manifest["model"]["kwargs"]["image_size"] == 24 and len(manifest["history"]) == 2
