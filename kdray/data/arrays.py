"""Parquet shards of arrays of any fixed shape and dtype (token ids, feature vectors), not images.

``kdray data import X.npz DEST --as arrays`` (or without ``--as`` when the ``.npz`` does not hold
pixels, see :func:`holds_pixels`) writes each row's array as its raw little-endian bytes in a
``binary`` column ``array`` beside ``id`` and ``label``, and a ``dataset.json`` with
``"format": "kdray-array"``, the row ``shape`` and ``dtype``, the classes, counts, the values' range
(``value_range``: choose a token model's ``vocab_size`` above its maximum), for float arrays the
training split's ``mean``/``std`` (one value each), and a fingerprint. Raw bytes round-trip exactly
(dtype and values) and read like the PNG column: one ``bytes`` object a row, through pyarrow or Ray
Data's ``read_parquet``. The ``parquet`` dataset (``kdray.data.files``) loads such shards into memory
with :func:`read_split` (``x`` keeps the stored shape and dtype: integer token ids stay integers and
are never normalised), and streaming decodes them with :func:`decode_batch`
(``kdray.data.stream.decode_batch`` dispatches here). Every bad input is a :class:`DataError` naming
the file and row: an ``.npz`` whose arrays differ in length, a row whose byte size does not fit
``shape``/``dtype``, a label outside the classes.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdray.core.errors import DataError, KdrayError
from kdray.core.meter import Task
from kdray.core.storage import Storage
from kdray.data import datasets as kdata

FORMAT = "kdray-array"
COLUMN = "array"
DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64")  # what torch holds
SPLITS = ("train", "test")
REIMPORT = "Re-import the dataset with `kdray data import SRC DEST --as arrays`."

Splits = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (x [N, ...], y [N])


def is_arrays(meta: dict[str, Any]) -> bool:
    return meta.get("format") == FORMAT


def x_column(meta: dict[str, Any]) -> str:
    """The shards' column holding each row's input: ``array`` here, ``image`` for PNG shards."""
    return COLUMN if is_arrays(meta) else "image"


def mean_std(meta: dict[str, Any]) -> tuple[Any, Any]:
    """The normalisation constants of a dataset.json: one value each for arrays (0 and 1 without them)."""
    if is_arrays(meta):
        return float(meta.get("mean", 0.0)), float(meta.get("std", 1.0))
    return tuple(meta["mean"]), tuple(meta["std"])


def layout(meta: dict[str, Any]) -> dict[str, Any] | None:
    """What decoding a row needs (JSON): shape, dtype, mean/std (floats only); None for PNG shards."""
    if not is_arrays(meta):
        return None
    out: dict[str, Any] = {"shape": list(meta["shape"]), "dtype": meta["dtype"]}
    if "mean" in meta:
        out.update(mean=float(meta["mean"]), std=float(meta["std"]))
    return out


def describe(meta: dict[str, Any]) -> dict[str, Any]:
    """Model-building facts: ``in_channels`` is the values a row holds and ``image_size`` 1, so a flattening
    model (``mlp_*``) gets its input width; a token model (``gru_*`` with ``vocab_size``) ignores both."""
    return {
        "num_classes": meta["num_classes"],
        "in_channels": int(np.prod(meta["shape"], dtype=np.int64)),
        "image_size": 1,
        "input_shape": list(meta["shape"]),
        "input_dtype": meta["dtype"],
    }


# --------------------------------------------------------------------------- the .npz


def read_npz(path: Path, test_fraction: float, seed: int) -> tuple[Splits, list[str] | None]:
    """The (x, y) of each split of an ``.npz`` (``x_train``... or ``x``/``y`` split by ``test_fraction``),
    and its ``class_names`` if any; x and y of a split must have the same number of rows."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz file ({e})", hint="Write it with np.savez.") from None
    with z:
        keys = set(z.files)
        try:
            if {"x_train", "y_train", "x_test", "y_test"} <= keys:
                raw = {s: (z[f"x_{s}"], z[f"y_{s}"]) for s in SPLITS}
            elif {"x", "y"} <= keys:
                raw = {"all": (z["x"], z["y"])}
            else:
                raise DataError(
                    f"{path} has arrays {sorted(keys)}; expected x_train, y_train, x_test, y_test (or x and y)",
                )
            names = [str(n) for n in z["class_names"]] if "class_names" in keys else None
        except ValueError as e:  # an object array, which allow_pickle=False refuses
            raise DataError(f"{path}: {e}", hint="Store plain numeric arrays (and class_names as strings).") from None
    for s, (x, y) in raw.items():
        names_of = ("x", "y") if s == "all" else (f"x_{s}", f"y_{s}")
        if x.ndim == 0 or len(x) != len(np.asarray(y).reshape(-1)):
            raise DataError(
                f"{path}: {names_of[0]} has {len(x) if x.ndim else 0} rows but {names_of[1]} has "
                f"{np.asarray(y).size} labels",
                hint=f"Give {names_of[0]} and {names_of[1]} one entry per example (the first axis of "
                f"{names_of[0]} counts the rows).",
            )
    if "all" in raw:
        x, y = raw.pop("all")
        order = np.random.default_rng(seed).permutation(len(x))
        cut = int(round(test_fraction * len(x)))
        test, train = np.sort(order[:cut]), np.sort(order[cut:])
        raw = {"train": (x[train], y[train]), "test": (x[test], y[test])}
    return raw, names


def holds_pixels(splits: Splits) -> bool:
    """The rule of ``--as`` left out: images when every ``x`` is image-shaped (``[N, H, W]`` or
    ``[N, H, W, C]`` with C 1 or 3) with pixel values (uint8, other integers within 0..255, floats
    within [0, 1]); arrays otherwise (int64 token ids ``[N, T]``, float features ``[N, D]``, ...)."""
    for x, _ in splits.values():
        if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] in (1, 3))):
            return False
        if x.dtype == np.uint8 or x.size == 0:
            continue
        if np.issubdtype(x.dtype, np.integer):
            if x.min() < 0 or x.max() > 255:
                return False
        elif np.issubdtype(x.dtype, np.floating):
            if not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
                return False
        else:
            return False
    return True


def labels_of(path: str, split: str, y: np.ndarray) -> np.ndarray:
    """``y`` as int64 labels [N]: whole numbers, or a DataError naming the first that is not."""
    y = np.asarray(y).reshape(-1)
    if y.dtype == np.bool_ or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{path}: y_{split} is {y.dtype}; labels are class numbers 0..K-1 (integers)")
    if np.issubdtype(y.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if len(bad):
            raise DataError(f"{path}: y_{split} row {int(bad[0])} is {y[bad[0]]}, not a class number 0..K-1")
    return y.astype(np.int64)


# --------------------------------------------------------------------------- import


def write_shards(
    splits: Splits,
    class_names: list[str] | None,
    store: Storage,
    shard_rows: int,
    description: str,
    log: Callable[[str], None],
    task: Task,
) -> dict[str, Any]:
    """Write each split's rows as shards of raw array bytes; return the dataset.json to write last."""
    where = description.removeprefix("arrays in ")
    x0 = splits["train"][0]
    dtype = np.dtype(x0.dtype)
    if dtype.name not in DTYPES:
        raise DataError(
            f"{where}: x_train is {dtype}; array shards hold {', '.join(DTYPES)}",
            hint="Cast it first (token ids: x.astype(np.int64); features: x.astype(np.float32)).",
        )
    if x0.ndim < 2:
        raise DataError(
            f"{where}: x_train has shape {x0.shape}; an array dataset needs [N, ...] with one array a row",
            hint="Give single values a feature axis: x[:, None].",
        )
    shape = x0.shape[1:]
    labels = {s: labels_of(where, s, y) for s, (_, y) in splits.items()}
    for s, (x, _) in splits.items():
        if x.shape[1:] != shape or x.dtype != dtype:
            raise DataError(
                f"{where}: x_{s} is {x.dtype} {list(x.shape[1:])} a row but x_train {dtype} {list(shape)}",
                hint="Give both splits the same row shape and dtype.",
            )
    top = max((int(y.max()) for y in labels.values() if len(y)), default=-1)
    k = len(class_names) if class_names else top + 1
    for s, y in labels.items():
        bad = np.flatnonzero((y < 0) | (y >= k))
        if len(bad):
            row = int(bad[0])
            raise DataError(
                f"{where}: y_{s} row {row} has label {int(y[row])}, outside the {k} classes (0..{k - 1})",
                hint="Labels number the classes 0..K-1; give one class name for each (--class-names or class_names).",
            )
    if not len(labels["train"]):
        raise DataError(f"{where} has no training rows")
    if k < 2:
        raise DataError(f"{where}: the labels name {k} class; a classification dataset needs two")
    for s, (x, _) in splits.items():
        if np.issubdtype(dtype, np.floating) and not np.isfinite(x).all():
            row = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0])
            raise DataError(f"{where}: x_{s} row {row} holds NaN or infinite values", hint="Clean or drop it.")
    little = dtype.newbyteorder("<")
    digest = hashlib.sha256(f"{dtype.name}{list(shape)}".encode())
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
        "classes": class_names or [str(i) for i in range(k)],
        "num_classes": k,
        "splits": {},
        "shape": [int(d) for d in shape],
        "dtype": dtype.name,
    }
    done = written = 0
    for s in SPLITS:
        x, y = splits[s][0], labels[s]
        shards: list[str] = []
        hashes: list[str] = []
        for first in range(0, max(len(y), 1), shard_rows):
            chunk = np.ascontiguousarray(x[first : first + shard_rows], dtype=little)
            ys = y[first : first + shard_rows]
            rel = f"{s}/part-{len(shards):05d}.parquet"
            table = pa.table(
                {
                    "id": pa.array(np.arange(first, first + len(ys), dtype=np.int64)),
                    COLUMN: pa.array([row.tobytes() for row in chunk], pa.binary()),
                    "label": pa.array(ys, pa.int64()),
                }
            )
            buf = io.BytesIO()
            pq.write_table(table, buf)
            store.write_bytes(rel, buf.getvalue())
            shards.append(rel)
            hashes.append(hashlib.sha256(buf.getvalue()).hexdigest())
            digest.update(ys.astype("<i8").tobytes() + chunk.tobytes())
            done += len(ys)
            task.update(done, f"{written + len(shards)} shard(s) written")
        written += len(shards)
        counts = np.bincount(y, minlength=k).tolist()
        meta["splits"][s] = {"rows": len(y), "counts": counts, "shards": shards, "sha256": hashes}
        log(f"{s}: {len(y):,} arrays of {dtype.name} {list(shape)} in {len(shards)} shard(s)")
    values = [x for x, _ in splits.values() if x.size]
    if np.issubdtype(dtype, np.floating):
        train = splits["train"][0].astype(np.float64)
        meta.update(mean=round(float(train.mean()), 6), std=round(max(float(train.std()), 1e-6), 6))
    if values and dtype.name != "bool":
        lo, hi = min(v.min() for v in values), max(v.max() for v in values)
        meta["value_range"] = [lo.item(), hi.item()]
    meta.update(fingerprint=digest.hexdigest()[:16], source=description)
    return meta


# --------------------------------------------------------------------------- reading


def rows_to_array(values: list[bytes] | np.ndarray, spec: dict[str, Any], where: Callable[[int], str]) -> np.ndarray:
    """Raw row bytes -> ``[n, *shape]`` of the stored dtype (native byte order); a row of the wrong size is
    a DataError named by ``where(row)``."""
    dtype = np.dtype(spec["dtype"]).newbyteorder("<")
    shape = tuple(spec["shape"])
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    lengths = np.fromiter((len(v) if v is not None else -1 for v in values), dtype=np.int64, count=len(values))
    bad = np.flatnonzero(lengths != size)
    if len(bad):
        row = int(bad[0])
        raise DataError(
            f"{where(row)}: the array has {max(int(lengths[row]), 0)} bytes, but dataset.json's shape "
            f"{list(shape)} of {spec['dtype']} needs {size}",
            hint=REIMPORT,
        )
    flat = np.frombuffer(b"".join(values), dtype=dtype) if len(values) else np.zeros(0, dtype)
    return flat.reshape(len(values), *shape).astype(dtype.newbyteorder("="))  # a writable copy, native order


def read_shards(store: Storage, meta: dict[str, Any], split: str, meta_uri: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each shard of ``split``, checked against the sha256 dataset.json records (imports
    since kdray recorded them): a shard changed or cut short after its import is refused, naming it."""
    info = meta["splits"][split]
    hashes = info.get("sha256") or []
    for i, rel in enumerate(info["shards"]):
        data = store.read_bytes(rel)
        if i < len(hashes) and hashlib.sha256(data).hexdigest() != hashes[i]:
            raise DataError(
                f"{store.uri(rel)} does not match the sha256 that {meta_uri} records for it "
                f"({len(data):,} bytes): it was changed or cut short after the import",
                hint="Re-copy the dataset, or rerun `kdray data import` into a new folder and point data.path at it.",
            )
        yield rel, data


def read_split(store: Storage, meta: dict[str, Any], split: str, meta_uri: str) -> kdata.Split:
    """One split of array shards in memory: ``x`` of the stored shape and dtype, ``y`` int64."""
    k = meta["num_classes"]
    spec = layout(meta) or {}
    xs, ys = [], []
    for rel, data in read_shards(store, meta, split, meta_uri):
        where = store.uri(rel)
        try:
            table = pq.read_table(pa.BufferReader(data), columns=[COLUMN, "label"])
        except (pa.ArrowInvalid, OSError, KeyError) as e:
            if isinstance(e, KdrayError):
                raise
            raise DataError(
                f"{where} is not a readable Parquet shard with {COLUMN} and label columns ({str(e).splitlines()[0]})",
                hint=REIMPORT,
            ) from None
        labels = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
        bad = np.flatnonzero((labels < 0) | (labels >= k))
        if len(bad):
            row = int(bad[0])
            raise DataError(
                f"{where} row {row}: label {int(labels[row])} is outside the {k} classes of {meta_uri} (0..{k - 1})",
                hint=REIMPORT,
            )
        xs.append(rows_to_array(table.column(COLUMN).to_pylist(), spec, f"{where} row {{}}".format))
        ys.append(labels)
    x = np.concatenate(xs) if xs else np.zeros((0, *spec["shape"]), np.dtype(spec["dtype"]))
    mean, std = mean_std(meta)
    return kdata.Split(
        torch.from_numpy(np.ascontiguousarray(x)),
        torch.from_numpy(np.concatenate(ys) if ys else np.zeros(0, np.int64)),
        k,
        mean,
        std,
        f"{meta['fingerprint']}-{split}",
        tuple(meta["classes"]),
        held_out=held_out(meta, split, len(x)),
    )


def held_out(meta: dict[str, Any], split: str, rows: int) -> torch.Tensor | None:
    """The rows a dataset holds out for validation itself (``held_out_from``: a text corpus's validation
    documents come last in its training split, ``kdray.data.text``), or None."""
    start = meta["splits"][split].get("held_out_from")
    return None if start is None else torch.arange(rows) >= int(start)


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    lookup: np.ndarray,
    layout: dict[str, Any],
    not_in_split: int,
    prefix: str = "",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """One streamed batch of array shards (columns ``id``, ``array``, ``path``) -> the part's rows.

    As :func:`kdray.data.stream.decode_batch` for images: ``x`` (float arrays normalised with the
    dataset's mean/std as float32, integer arrays as stored), ``y`` and ``index``, in a seeded order."""
    ids = np.asarray(batch["id"], dtype=np.int64)
    labels = lookup[ids]
    keep = np.flatnonzero(labels != not_in_split)
    if len(keep):
        keep = keep[np.random.default_rng([seed, int(ids[keep[0]])]).permutation(len(keep))]
    column = batch[COLUMN]
    x = rows_to_array(
        [column[i] for i in keep], layout, lambda j: f"{prefix}{batch['path'][keep[j]]} row id {ids[keep[j]]}"
    )
    if "mean" in layout:
        x = (x.astype(np.float32) - np.float32(layout["mean"])) / np.float32(layout["std"])
    return {"x": x, "y": labels[keep].astype(np.int64), "index": ids[keep]}


def example_split(facts: dict[str, Any], examples: list[bytes]) -> kdata.Split:
    """The plan's example rows (raw bytes) as a Split: what a method sees before a streamed run trains."""
    spec = facts["layout"]
    x = rows_to_array(examples, spec, lambda row: f"example row {row}")
    y = torch.tensor(facts["example_labels"], dtype=torch.int64)
    mean, std = spec.get("mean", 0.0), spec.get("std", 1.0)
    return kdata.Split(torch.from_numpy(x), y, facts["num_classes"], mean, std, facts["fingerprint"], ())
