"""What streaming a Parquet dataset needs without Ray: the row plan, and decoding one batch.

``data.stream: true`` feeds a ``parquet`` dataset (``kdray data import``) to the Ray Train workers
through Ray Data instead of loading it into memory (``kdray.engine.datasets`` builds the Ray Data
pipeline). The rows and labels each split gets must be exactly those of the in-memory path, so the
plan is made by the same code: :func:`plan` reads only the ``id`` and ``label`` columns of the
training shards (8 + 8 bytes a row), builds a ``Split`` whose ``x`` holds the row ids instead of
pixels, and hands it to :func:`kdray.data.datasets.select` (class subset, seeded stratified validation
carve, limit, label withholding). The resulting ids and labels become a lookup table
(``row id -> label``; ``-1`` withheld, ``-2`` not in this split) that :func:`decode_batch` applies
to each streamed batch before decoding its PNG bytes with Pillow.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdray.core.errors import DataError, KdrayError
from kdray.core.storage import Storage
from kdray.data import arrays as array_shards
from kdray.data import datasets as kdata
from kdray.data.files import META, decode, read_meta
from kdray.data.transforms import TransformSpec, apply, stats

NOT_IN_SPLIT = -2  # lookup value of a row that the split does not hold (-1 is a withheld label)


@dataclass
class StreamPlan:
    """The shards to stream and, per part, which rows it holds with which labels."""

    store: Storage
    meta: dict[str, Any]
    shards: list[str]  # the training split's shards, relative to ``store``
    rows: int  # rows in those shards (ids are 0..rows-1, in shard order)
    train: kdata.Split  # x: the selected row ids (int64), y: their labels (-1: withheld)
    val: kdata.Split

    def lookup(self, part: kdata.Split) -> np.ndarray:
        """``row id -> label`` for ``part``: -2 for a row the part does not hold."""
        dtype = np.int16 if self.meta["num_classes"] < 2**15 else np.int32
        table = np.full(self.rows, NOT_IN_SPLIT, dtype=dtype)
        table[part.x.numpy()] = part.y.numpy()
        return table

    def facts(self, examples: int = 4) -> dict[str, Any]:
        """What a worker needs to know (JSON): the rows of each part, how to normalise, and the PNG
        bytes of the first few training rows (``example_split``)."""
        rel, column = self.shards[0], array_shards.x_column(self.meta)  # array shards: raw bytes, not PNG
        with self.store.fs.open_input_file(self.store.path(rel)) as f:
            first = pq.read_table(f, columns=[column]).slice(0, examples).column(column).to_pylist()
        if array_shards.is_arrays(self.meta):
            return {**self.facts_of(first), "layout": array_shards.layout(self.meta)}
        return {
            **self.facts_of(first),
            "channels": self.meta["channels"],
            "mean": list(self.meta["mean"]),
            "std": list(self.meta["std"]),
        }

    def facts_of(self, first: list[bytes]) -> dict[str, Any]:
        return {
            "train_rows": len(self.train),
            "val_rows": len(self.val),
            "fingerprint": self.train.fingerprint,
            "num_classes": self.train.num_classes,
            "example": [base64.b64encode(b).decode() for b in first],
            "example_labels": [max(0, int(y)) for y in self.train.y[: len(first)]],
        }


def check_streamable(spec: Any) -> None:
    """``data.stream`` applies to a ``parquet`` dataset without pixel-level ``shifts``."""
    if spec.name != "parquet":
        raise KdrayError(
            f"data.stream: true streams Parquet shards written by `kdray data import`, not the {spec.name!r} dataset",
            hint="Import the data (kdray data import SRC DEST) and use data: {name: parquet, path: DEST, "
            "stream: true}, or drop data.stream to load it into memory.",
        )
    if spec.shifts:
        raise KdrayError(
            "data.stream: true cannot apply data.shifts: a shift transforms the whole split in memory",
            hint="Drop data.shifts, or drop data.stream to load the data into memory.",
        )


def read_ids_and_labels(store: Storage, meta: dict[str, Any], split: str) -> np.ndarray:
    """The labels of ``split`` in row-id order, checking each shard's ``id`` column and label range."""
    k = meta["num_classes"]
    labels, first = [], 0
    for rel in meta["splits"][split]["shards"]:
        where = store.uri(rel)
        try:
            with store.fs.open_input_file(store.path(rel)) as f:
                table = pq.read_table(f, columns=["id", "label"])
        except (pa.ArrowInvalid, OSError, KeyError) as e:
            if isinstance(e, KdrayError):
                raise
            raise DataError(
                f"{where} is not a readable Parquet shard with id and label columns ({str(e).splitlines()[0]})",
                hint="Streaming needs the id column that `kdray data import` writes: re-import the dataset.",
            ) from None
        ids = table.column("id").to_numpy(zero_copy_only=False)
        y = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
        if not np.array_equal(ids, np.arange(first, first + len(ids))):
            raise DataError(
                f"{where}: its id column does not number the rows {first}..{first + len(ids) - 1} in order",
                hint="Re-import the dataset with `kdray data import`.",
            )
        bad = np.flatnonzero((y < 0) | (y >= k))
        if len(bad):
            row = int(bad[0])
            raise DataError(
                f"{where} row {row}: label {int(y[row])} is outside the {k} classes of {store.uri(META)} (0..{k - 1})"
            )
        labels.append(y)
        first += len(ids)
    return np.concatenate(labels) if labels else np.zeros(0, np.int64)


def plan(spec: Any) -> StreamPlan:
    """The rows and labels of the training and validation parts, as the in-memory path selects them."""
    check_streamable(spec)
    store, meta = read_meta(spec.path)
    labels = read_ids_and_labels(store, meta, "train")
    raw = kdata.Split(
        torch.arange(len(labels)),  # row ids stand in for the pixels: select() picks rows, never reads them
        torch.from_numpy(labels),
        meta["num_classes"],
        *array_shards.mean_std(meta),
        f"{meta['fingerprint']}-train",
        tuple(meta["classes"]),
        held_out=array_shards.held_out(meta, "train", len(labels)),
    )
    return StreamPlan(
        store,
        meta,
        list(meta["splits"]["train"]["shards"]),
        len(labels),
        kdata.select(raw, spec, "train"),
        kdata.select(raw, spec, "val"),
    )


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    lookup: np.ndarray,
    channels: int,
    size: int,
    mean: list[float],
    std: list[float],
    prefix: str = "",
    seed: int = 0,
    layout: dict[str, Any] | None = None,
    transforms: list[dict[str, Any]] | None = None,
    augment: bool = False,
    epoch: int = 0,
) -> dict[str, np.ndarray]:
    """One streamed batch (columns ``id``, ``image``, ``path``) -> the part's rows, decoded and normalised.

    Returns ``x`` float32 ``[n, C, H, W]`` (zero mean, unit variance per channel), ``y`` (the plan's
    labels, -1 withheld) and ``index`` (the row ids), in a seeded random order (the read shuffles the
    shards' order per epoch). A corrupt image is a DataError naming its shard. ``transforms``
    (data.transforms, :func:`transform_options`) run on the decoded pixels: with ``augment`` (the training
    part) the random ones draw from (``seed``, ``epoch``, row id), else the deterministic view.
    """
    if layout is not None:  # array shards (column ``array``): raw values, no image (kdray.data.arrays)
        return array_shards.decode_batch(
            batch, lookup=lookup, layout=layout, not_in_split=NOT_IN_SPLIT, prefix=prefix, seed=seed
        )
    ids = np.asarray(batch["id"], dtype=np.int64)
    labels = lookup[ids]
    keep = np.flatnonzero(labels != NOT_IN_SPLIT)
    if len(keep):
        keep = keep[np.random.default_rng([seed, int(ids[keep[0]])]).permutation(len(keep))]
    x = np.empty((len(keep), size, size, channels), dtype=np.uint8)
    for j, i in enumerate(keep):
        where = f"{prefix}{batch['path'][i]} row id {ids[i]}"
        arr = decode(batch["image"][i], where, channels)
        if arr.shape != x.shape[1:]:
            raise DataError(f"{where}: image {arr.shape}, dataset.json says {x.shape[1:]}")
        x[j] = arr
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    pixels = x.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    if transforms:  # data.transforms, on this CPU batch in the Ray Data task (kdray.data.transforms)
        steps = [TransformSpec.model_validate(t) for t in transforms]
        pixels = apply(torch.from_numpy(pixels), steps, train=augment, rows=ids[keep], seed=seed, epoch=epoch).numpy()
    return {"x": (pixels - m) / s, "y": labels[keep].astype(np.int64), "index": ids[keep]}


def example_split(facts: dict[str, Any]) -> kdata.Split:
    """The plan's example rows decoded (pixels in [0, 1]): what a method sees before training (e.g. a
    distillation term sizing its projection), with no storage access in the worker."""
    if facts.get("layout"):  # array shards: the example rows are raw bytes
        return array_shards.example_split(facts, [base64.b64decode(b) for b in facts["example"]])
    c = facts["channels"]
    arrays = [decode(base64.b64decode(b), f"example row {i}", c) for i, b in enumerate(facts["example"])]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
    x = apply(x, [TransformSpec.model_validate(t) for t in facts.get("transforms", [])])  # the deterministic view
    y = torch.tensor(facts["example_labels"], dtype=torch.int64)
    return kdata.Split(x, y, facts["num_classes"], tuple(facts["mean"]), tuple(facts["std"]), facts["fingerprint"], ())


def decode_options(meta: dict[str, Any]) -> dict[str, Any]:
    """The keywords of :func:`decode_batch` that come from dataset.json (``layout`` for array shards)."""
    if array_shards.is_arrays(meta):
        return {"channels": 0, "size": 0, "mean": [], "std": [], "layout": array_shards.layout(meta)}
    return {
        "channels": meta["channels"],
        "size": meta["image_size"],
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
    }


def transform_options(meta: dict[str, Any], steps: list[TransformSpec]) -> dict[str, Any]:
    """The ``transforms``, ``mean`` and ``std`` that :func:`decode_batch` and the workers' facts take for
    ``data.transforms`` (``normalize`` replaces dataset.json's mean/std); {} without transforms."""
    if not steps:
        return {}
    if array_shards.is_arrays(meta):
        raise DataError(
            "data.transforms apply to images, not to array shards (dataset.json has no images)",
            hint="Drop data.transforms for this dataset.",
        )
    mean, std = stats(steps, tuple(meta["mean"]), tuple(meta["std"]), meta["channels"])
    return {
        "transforms": [t.model_dump(mode="json") for t in steps],
        "mean": list(mean) if isinstance(mean, tuple) else [mean],
        "std": list(std) if isinstance(std, tuple) else [std],
    }
