"""Datasets from files: an image folder, and Parquet shards written by ``kdray data import``.

Two dataset kinds join ``DATASETS``:

* ``image_folder``: ``<path>/<class>/<file>.png`` (or ``<path>/train/<class>/...`` and
  ``<path>/test/<class>/...``), any format Pillow reads, colour or grey, any size (resized to
  ``image_size``, by default the first image's). Without ``train``/``test`` folders a seeded
  ``test_fraction`` of the rows is held out as the test split.
* ``parquet``: shards under any storage URI (a folder, ``file://`` or ``s3://``) holding the
  encoded images (PNG bytes, column ``image``), labels (column ``label``) and row ids (column
  ``id``, 0..N-1 across a split's shards: what streaming needs, see ``kdray.data.stream``), plus a
  ``dataset.json`` with the class names, counts, per-channel mean/std and a fingerprint.

:func:`import_dataset` (``kdray data import SRC DEST``) converts an image folder, a folder of IDX
files or an ``.npz`` (``x_train``/``y_train``/``x_test``/``y_test``, images ``[N, H, W]`` or
``[N, H, W, C]``) into such shards. Rows are ordered by file name, then class, so a folder whose
files are numbered keeps its order. Both kinds load into memory (the in-memory fast path); every
bad file is a :class:`DataError` naming it. An ``.npz`` of arrays that are not images (token ids,
features) becomes shards of raw arrays instead (``kdray.data.arrays``), read by the same ``parquet`` kind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError

from kdray.core.errors import DataError, KdrayError
from kdray.core.meter import Meter, Task, log_meter
from kdray.core.storage import Storage
from kdray.data import arrays
from kdray.data.datasets import DATASETS, FASHION_MNIST_FILES, Split, parse_idx, short_digest

META = "dataset.json"
FORMAT = "kdray-parquet"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLITS = ("train", "test")

Log = Callable[[str], None]


# --------------------------------------------------------------------------- images


MAX_PIXELS = 8192 * 8192  # larger images are refused (a decompression bomb declares far more than it holds)


@contextlib.contextmanager
def _pixel_limit(where: str) -> Iterator[None]:
    """Pillow's decompression-bomb checks, at kdray's limit, as a DataError naming the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DataError(
                f"{where} is refused: {e}",
                hint=f"Shrink or delete the file: kdray reads images of at most {MAX_PIXELS:,} pixels.",
            ) from None


def _open_image(data: bytes, where: str) -> Image.Image:
    """Open (header only) an encoded image, refusing one that declares more than ``MAX_PIXELS`` pixels."""
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise DataError(
            f"{where} declares {w}x{h} pixels, more than kdray reads ({MAX_PIXELS:,}): it may be a decompression bomb",
            hint="Shrink the image (or delete the file) and rerun `kdray data import`.",
        )
    return img


def decode(data: bytes, where: str, channels: int, size: int | None = None) -> np.ndarray:
    """Encoded image bytes -> uint8 ``[H, W, C]`` (``C`` = ``channels``), resized to ``size`` if given."""
    try:
        with _pixel_limit(where):
            img = _open_image(data, where)
            img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(
            f"{where} is not a readable image ({type(e).__name__}: {e})",
            hint="Replace or delete the file (re-run `kdray data import` for a shard).",
        ) from None
    out: Image.Image = img.convert("L" if channels == 1 else "RGB")
    if size is not None and out.size != (size, size):
        out = out.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(out, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 ``[H, W, C]`` -> PNG bytes (lossless)."""
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, mode="L" if arr.shape[2] == 1 else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def image_channels(data: bytes, where: str) -> tuple[int, tuple[int, int]]:
    """(channels, (width, height)) of an encoded image: 1 for grey modes, else 3."""
    try:
        with _pixel_limit(where):
            img = _open_image(data, where)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{where} is not a readable image ({type(e).__name__}: {e})") from None
    return (1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3), img.size


# --------------------------------------------------------------------------- sources


@dataclass
class Source:
    """Rows to import: class names and, per split, an iterator of (uint8 [H, W, C], label)."""

    classes: list[str]
    rows: dict[str, Callable[[], Iterator[tuple[np.ndarray, int]]]] = field(default_factory=dict)
    description: str = ""
    sizes: dict[str, int] = field(default_factory=dict)  # rows per split (the import's progress total)


def _folder_files(store: Storage, rel: str = "") -> list[tuple[str, str]]:
    """(class name, relative file path) of the images under ``rel``: one sub-folder per class."""
    prefix = f"{rel}/" if rel else ""
    found = []
    for path in store.list(rel, recursive=True):
        path = path if path.startswith(prefix) else prefix + path
        parts = path[len(prefix) :].split("/")
        if len(parts) == 2 and parts[1].lower().endswith(IMAGE_SUFFIXES):
            found.append((parts[0], path))
    return found


def _empty_class_folders(store: Storage, rel: str, classes: list[str]) -> list[str]:
    """The class folders under ``rel`` (sub-folders not starting with '.') that hold no image: a local
    folder only (an S3 prefix has no empty folders); in the split layout, ``test`` and ``train`` are not classes."""
    if store.scheme != "file":
        return []
    top = Path(store.path(rel))
    skip = set(SPLITS) if not rel else set()
    found = sorted(p.name for p in top.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in skip)
    return [store.uri(f"{rel}/{name}" if rel else name) for name in found if name not in classes]


def _folder_layout(
    store: Storage, test_fraction: float, seed: int
) -> tuple[list[str], dict[str, list[tuple[int, str]]]]:
    """Class names and, per split, the ordered (label, file) rows of an image folder."""
    split_folders = {s: _folder_files(store, s) for s in SPLITS}
    if split_folders["train"]:
        files = {s: split_folders[s] for s in SPLITS}
    else:
        every = _folder_files(store)
        if not every:
            raise DataError(
                f"{store.uri()} holds no images in class folders",
                hint="Lay it out as <folder>/<class>/<file>.png (or <folder>/train/<class>/... and "
                "<folder>/test/<class>/...).",
            )
        order = np.random.default_rng(seed).permutation(len(every))
        cut = int(round(test_fraction * len(every)))
        test_idx = set(order[:cut].tolist())
        files = {
            "train": [f for i, f in enumerate(every) if i not in test_idx],
            "test": [f for i, f in enumerate(every) if i in test_idx],
        }
    classes = sorted({c for c, _ in files["train"]})
    empty = _empty_class_folders(store, "train" if split_folders["train"] else "", classes)
    if empty:
        raise DataError(
            f"{store.uri()}: class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} "
            f"hold{'' if len(empty) > 1 else 's'} no images ({', '.join(IMAGE_SUFFIXES)})",
            hint="Add images to it, or delete the folder (class ids are the sorted folder names, so a class "
            "dropped without a word would renumber the others).",
        )
    unknown = sorted({c for c, _ in files["test"]} - set(classes))
    if unknown:
        raise DataError(f"{store.uri()}: test classes {unknown} have no training images")
    if len(classes) < 2:
        raise DataError(f"{store.uri()}: found {len(classes)} class folder(s); a classification dataset needs two")
    index = {c: i for i, c in enumerate(classes)}
    rows = {s: sorted(((index[c], f) for c, f in files[s]), key=lambda r: (Path(r[1]).name, r[0])) for s in SPLITS}
    return classes, rows


def folder_source(src: str, image_size: int | None, channels: int | None, test_fraction: float, seed: int) -> Source:
    store = Storage(src)
    classes, rows = _folder_layout(store, test_fraction, seed)
    first = rows["train"][0][1]
    c0, (w, h) = image_channels(store.read_bytes(first), store.uri(first))
    channels = channels or c0
    if image_size is None and w != h:
        raise DataError(
            f"{store.uri(first)} is {w}x{h}; kdray's models take square images",
            hint="Give an image size to resize every image to (--image-size, or data.options.image_size).",
        )
    size = image_size or w

    def reader(split: str) -> Callable[[], Iterator[tuple[np.ndarray, int]]]:
        def rows_of() -> Iterator[tuple[np.ndarray, int]]:
            for label, rel in rows[split]:
                yield decode(store.read_bytes(rel), store.uri(rel), channels, size), label

        return rows_of

    return Source(classes, {s: reader(s) for s in SPLITS}, f"image folder {src}", {s: len(rows[s]) for s in SPLITS})


def idx_source(folder: Path, class_names: list[str] | None) -> Source:
    arrays = {}
    for split, (images, labels) in FASHION_MNIST_FILES.items():
        pair = []
        for name in (images, labels):
            path = next((p for p in (folder / (name + ".gz"), folder / name) if p.is_file()), None)
            if path is None:
                raise DataError(f"no {name}[.gz] in {folder}", hint="An IDX folder holds the four *-ubyte[.gz] files.")
            pair.append(parse_idx(path.read_bytes(), str(path)))
        arrays[split] = (pair[0][..., None], pair[1].astype(np.int64))
    k = int(arrays["train"][1].max()) + 1
    return _array_source(arrays, class_names or [str(i) for i in range(k)], f"IDX files in {folder}")


def npz_source(
    path: Path,
    class_names: list[str] | None,
    test_fraction: float,
    seed: int,
    loaded: tuple[arrays.Splits, list[str] | None] | None = None,
) -> Source:
    splits, names = loaded or arrays.read_npz(path, test_fraction, seed)  # checks that x and y lengths match
    out = {}
    for s, (x, y) in splits.items():
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise DataError(
                f"{path}: x_{s} has shape {x.shape}; expected [N, H, W] or [N, H, W, C] with C 1 or 3",
                hint="To import arrays that are not images (token ids, features), drop --as images or give "
                "--as arrays.",
            )
        if x.dtype != np.uint8:
            if np.issubdtype(x.dtype, np.floating) and x.size and (x.min() < 0 or x.max() > 1):
                raise DataError(f"{path}: x_{s} is {x.dtype} outside [0, 1]; store uint8 pixels or floats in [0, 1]")
            x = np.round(x.astype(np.float64) * 255).astype(np.uint8) if np.issubdtype(x.dtype, np.floating) else x
            x = x.astype(np.uint8)
        out[s] = (x, np.asarray(y).astype(np.int64).reshape(-1))
    k = int(max(out["train"][1].max(), out["test"][1].max())) + 1
    return _array_source(out, class_names or names or [str(i) for i in range(k)], f"arrays in {path}")


def _array_source(arrays: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str], description: str) -> Source:
    def reader(split: str) -> Callable[[], Iterator[tuple[np.ndarray, int]]]:
        x, y = arrays[split]
        return lambda: ((x[i], int(y[i])) for i in range(len(y)))

    return Source(classes, {s: reader(s) for s in SPLITS}, description, {s: len(arrays[s][1]) for s in SPLITS})


def open_source(
    src: str,
    image_size: int | None = None,
    channels: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    class_names: list[str] | None = None,
    loaded: tuple[arrays.Splits, list[str] | None] | None = None,
) -> Source:
    """What ``kdray data import`` reads: an ``.npz`` (``loaded``: its arrays, read already), a folder of
    IDX files, or an image folder."""
    local = Path(src.removeprefix("file://"))
    if src.endswith(".npz"):
        if not local.is_file():
            raise DataError(f"{src} does not exist")
        return npz_source(local, class_names, test_fraction, seed, loaded)
    if "://" not in src or src.startswith("file://"):
        if not local.is_dir():
            raise DataError(f"{src} is not a folder or an .npz file", hint="Give an image folder, IDX folder or .npz.")
        if any((local / (FASHION_MNIST_FILES["train"][0] + ext)).is_file() for ext in ("", ".gz")):
            return idx_source(local, class_names)
    source = folder_source(src, image_size, channels, test_fraction, seed)
    if class_names:
        raise DataError("class names come from an image folder's sub-folder names; drop --class-names")
    return source


# --------------------------------------------------------------------------- import


def write_shard(
    store: Storage,
    split: str,
    shards: list[str],
    images: list[bytes],
    labels: list[int],
    first: int = 0,
    hashes: list[str] | None = None,
) -> None:
    """Write the pending rows as the split's next shard; empty the row lists. ``first`` is the first
    row's id: the ``id`` column numbers a split's rows 0..N-1 across its shards (streaming needs it).
    ``hashes`` gets the shard's sha256 (recorded in dataset.json: the data's lineage, docs/data.md)."""
    rel = f"{split}/part-{len(shards):05d}.parquet"
    ids = pa.array(range(first, first + len(labels)), pa.int64())
    table = pa.table({"id": ids, "image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int64())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_bytes(rel, buf.getvalue())
    shards.append(rel)
    if hashes is not None:
        hashes.append(hashlib.sha256(buf.getvalue()).hexdigest())
    images.clear()
    labels.clear()


def import_dataset(
    src: str,
    dest: str,
    *,
    as_: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    shard_rows: int = 10_000,
    test_fraction: float = 0.2,
    seed: int = 0,
    class_names: list[str] | None = None,
    log: Log = print,
    meter: Meter | None = None,
    text: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``src`` as Parquet shards under ``dest`` (any storage URI); ``dataset.json`` last. Returns it.

    ``as_`` is ``images`` (PNG shards), ``arrays`` (raw array shards of an ``.npz``, ``kdray.data.arrays``)
    or None: arrays when the ``.npz`` does not hold pixels (``arrays.holds_pixels``), else images;
    ``text`` tokenizes a corpus (``kdray.data.text.import_text``, whose keywords ``text`` holds).
    ``meter`` shows the images converted of the total, the shards written, the rate and the ETA
    (``kdray.core.meter``; by default plain lines through ``log``)."""
    if as_ == "text":  # a text corpus -> token-id rows (kdray.data.text)
        from kdray.data.text import import_text

        return import_text(src, dest, seed=seed, shard_rows=shard_rows, log=log, meter=meter, **(text or {}))
    if as_ not in (None, "images", "arrays"):
        raise DataError(f"--as {as_!r}: give images, arrays or text (or leave it out to choose from the data)")
    loaded = None
    if src.endswith(".npz") and Path(src.removeprefix("file://")).is_file():
        loaded = arrays.read_npz(Path(src.removeprefix("file://")), test_fraction, seed)
    elif as_ == "arrays":
        raise DataError(f"--as arrays reads an .npz file; {src} is not one", hint="Save the arrays with np.savez.")
    if loaded is not None and (as_ == "arrays" or (as_ is None and not arrays.holds_pixels(loaded[0]))):
        splits, names = loaded
        source = Source(class_names or names or [], description=f"arrays in {src}")
        source.sizes = {s: len(y) for s, (_, y) in splits.items()}
    else:
        splits, source = {}, open_source(src, image_size, channels, test_fraction, seed, class_names, loaded)
    store = Storage(dest)
    if store.exists(META):
        raise DataError(f"{store.uri(META)} already exists", hint="Import into a new folder or prefix.")
    unit = "rows" if splits else "images"
    with contextlib.closing((meter or log_meter(log))("data import", sum(source.sizes.values()), unit)) as task:
        if splits:
            meta = arrays.write_shards(splits, source.classes or None, store, shard_rows, source.description, log, task)
        else:
            meta = _import_rows(source, store, shard_rows, log, task)
    store.write_bytes(META, json.dumps(meta, indent=2).encode())  # last: a folder without it is unfinished
    return meta


def _import_rows(source: Source, store: Storage, shard_rows: int, log: Log, task: Task) -> dict[str, Any]:
    """The shards of every split, written; returns the dataset.json to write (counts, mean/std, fingerprint)."""
    k = len(source.classes)
    digest = hashlib.sha256()  # the rows (labels and pixels), not the class names: same data, same fingerprint
    meta: dict[str, Any] = {"format": FORMAT, "version": 1, "classes": source.classes, "num_classes": k, "splits": {}}
    shape: tuple[int, ...] | None = None
    sums: np.ndarray | None = None
    squares: np.ndarray | None = None
    pixels = 0
    done = written = 0  # images converted, shards of the finished splits
    for split in SPLITS:
        counts = [0] * k
        shards: list[str] = []
        hashes: list[str] = []
        images: list[bytes] = []
        labels: list[int] = []

        for arr, label in source.rows[split]():
            if not 0 <= label < k:
                raise DataError(
                    f"{source.description}: {split} row {sum(counts)} has label {label}, outside 0..{k - 1}"
                )
            if shape is None:
                shape = arr.shape
                sums, squares = np.zeros(arr.shape[2]), np.zeros(arr.shape[2])
            elif arr.shape != shape:
                raise DataError(
                    f"{source.description}: {split} row {sum(counts)} is {arr.shape}, the first image {shape}",
                    hint="Give an image size to resize every image to (--image-size).",
                )
            if split == "train":
                px = arr.reshape(-1, arr.shape[2]).astype(np.float64) / 255.0
                sums += px.sum(0)  # type: ignore[operator]
                squares += (px * px).sum(0)  # type: ignore[operator]
                pixels += len(px)
            data = encode_png(arr)
            digest.update(label.to_bytes(8, "little") + hashlib.sha256(data).digest())
            images.append(data)
            labels.append(label)
            counts[label] += 1
            if len(images) >= shard_rows:
                write_shard(store, split, shards, images, labels, sum(counts) - len(images), hashes)
            done += 1
            task.update(done, f"{written + len(shards)} shard(s) written")
        if images or not shards:
            write_shard(store, split, shards, images, labels, sum(counts) - len(images), hashes)
        meta["splits"][split] = {"rows": sum(counts), "counts": counts, "shards": shards, "sha256": hashes}
        written += len(shards)
        task.update(done, f"{written} shard(s) written")
        log(f"{split}: {sum(counts):,} images in {len(shards)} shard(s)")
    if shape is None or not pixels or sums is None or squares is None:
        raise DataError(f"{source.description} has no training images")
    mean = sums / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean * mean, 1e-12))
    meta.update(
        channels=int(shape[2]),
        image_size=int(shape[0]),
        mean=[round(float(m), 6) for m in mean],
        std=[round(float(s), 6) for s in std],
        fingerprint=digest.hexdigest()[:16],
        source=source.description,
    )
    return meta


# --------------------------------------------------------------------------- the dataset kinds


def read_meta(path: str | None) -> tuple[Storage, dict[str, Any]]:
    if not path:
        raise DataError(
            "data.path is not set: the parquet dataset reads the folder or s3:// prefix that holds dataset.json",
            hint="Write one with `kdray data import SRC DEST` and set data.path to DEST.",
        )
    store = Storage(path)
    if not store.exists(META):
        unfinished = bool(store.list())
        raise DataError(
            f"data.path: {store.uri()} is "
            + (
                f"an unfinished import (it has no {META}, which the import writes last)"
                if unfinished
                else f"not an imported dataset (no {META}: the folder is empty or missing)"
            ),
            hint=f"Rerun the import into it (delete the folder first): `kdray data import SRC {path}`; "
            "or point data.path at a folder that `kdray data import` finished.",
        )
    try:
        meta = json.loads(store.read_bytes(META))
    except json.JSONDecodeError as e:
        raise DataError(f"{store.uri(META)} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, arrays.FORMAT):
        raise DataError(
            f"{store.uri(META)} is not a kdray Parquet dataset description (format {FORMAT!r} or {arrays.FORMAT!r})"
        )
    return store, meta


def describe_parquet(path: str | None, **_options: Any) -> dict[str, Any]:
    _, meta = read_meta(path)
    if arrays.is_arrays(meta):
        return arrays.describe(meta)
    return {"num_classes": meta["num_classes"], "in_channels": meta["channels"], "image_size": meta["image_size"]}


def parquet_fingerprint(path: str | None = None, **_options: Any) -> dict[str, Any]:
    """The import's content hash (dataset.json: the rows, each shard's sha256) and each shard's stamp
    (ETag on S3, size and modification time on a disk)."""
    store, meta = read_meta(path)
    shards = [rel for s in SPLITS for rel in meta["splits"].get(s, {}).get("shards", [])]
    hashes = {s: meta["splits"].get(s, {}).get("sha256") for s in SPLITS}
    return {
        "content": short_digest({"fingerprint": meta.get("fingerprint"), "shards": hashes}),
        "how": "dataset.json's content hash (kdray data import) and each shard's "
        + ("ETag" if store.scheme == "s3" else "size and modification time"),
        "files": store.stamps(shards),
    }


def image_folder_fingerprint(path: str | None = None, **_options: Any) -> dict[str, Any]:
    """Every image file's name and stamp (ETag on S3, size and modification time on a disk)."""
    if not path:
        raise DataError("data.path is not set: image_folder reads <path>/<class>/<file>.png")
    store = Storage(path)
    names = [p for p in store.list(recursive=True) if p.lower().endswith(IMAGE_SUFFIXES)]
    stamps = store.stamps(names)
    return {
        "content": short_digest(stamps),
        "how": "the image files' names and " + ("ETags" if store.scheme == "s3" else "sizes and modification times"),
    }


@DATASETS.register("parquet", describe=describe_parquet, fingerprint=parquet_fingerprint)
def parquet(split: str, path: str | None = None) -> Split:
    """Parquet shards of PNG images (or of arrays, ``kdray.data.arrays``) and labels with a dataset.json
    (``kdray data import``), from any storage URI."""
    store, meta = read_meta(path)
    # A stage loads the training split twice (train and val are carved from it): decode it once per
    # version of the shards (their sizes and modification times are part of the key).
    try:
        infos = store.fs.get_file_info([store.path(rel) for rel in meta["splits"][split]["shards"]])
    except OSError as e:
        raise DataError(f"cannot read the shards under {store.uri()} ({e})") from None
    stamp = tuple((i.path, i.size, i.mtime_ns) for i in infos)
    decoded = _decoded(store.uri(), split, json.dumps(meta, sort_keys=True), stamp)
    return replace(decoded, x=decoded.x.clone(), y=decoded.y.clone())


@functools.lru_cache(maxsize=2)
def _decoded(uri: str, split: str, meta_json: str, stamp: tuple) -> Split:
    store, meta = Storage(uri), json.loads(meta_json)
    if arrays.is_arrays(meta):  # raw arrays of the stored shape and dtype: nothing to decode
        return arrays.read_split(store, meta, split, store.uri(META))
    k, c, size = meta["num_classes"], meta["channels"], meta["image_size"]
    xs, ys = [], []
    for rel, data in arrays.read_shards(store, meta, split, store.uri(META)):
        where = store.uri(rel)
        try:
            table = pq.read_table(pa.BufferReader(data), columns=["image", "label"])
        except (pa.ArrowInvalid, OSError, KeyError) as e:
            if isinstance(e, KdrayError):
                raise
            raise DataError(f"{where} is not a readable Parquet shard with image and label columns ({e})") from None
        labels = table.column("label").to_numpy(zero_copy_only=False)
        for row, data in enumerate(table.column("image").to_pylist()):
            label = int(labels[row])
            if not 0 <= label < k:
                raise DataError(
                    f"{where} row {row}: label {label} is outside the {k} classes of {store.uri(META)} (0..{k - 1})"
                )
            arr = decode(data, f"{where} row {row}", c)
            if arr.shape != (size, size, c):
                raise DataError(f"{where} row {row}: image {arr.shape}, dataset.json says {(size, size, c)}")
            xs.append(arr)
            ys.append(label)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float().div_(255.0) if xs else torch.zeros(0, c, size, size)
    return Split(
        x.contiguous(),
        torch.tensor(ys, dtype=torch.int64),
        k,
        tuple(meta["mean"]),
        tuple(meta["std"]),
        f"{meta['fingerprint']}-{split}",
        tuple(meta["classes"]),
    )


def describe_folder(
    path: str | None, image_size: int | None = None, channels: int | None = None, **_options: Any
) -> dict[str, Any]:
    if not path:
        raise DataError("data.path is not set: image_folder reads <path>/<class>/<file>.png")
    store = Storage(path)
    classes, rows = _folder_layout(store, 0.2, 0)
    first = rows["train"][0][1]
    c0, (w, _h) = image_channels(store.read_bytes(first), store.uri(first))
    return {"num_classes": len(classes), "in_channels": channels or c0, "image_size": image_size or w}


@DATASETS.register("image_folder", describe=describe_folder, fingerprint=image_folder_fingerprint)
def image_folder(
    split: str,
    path: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Split:
    """Images in class folders (<path>/<class>/<file>.png), any size and colour, read with Pillow."""
    if not path:
        raise DataError("data.path is not set: image_folder reads <path>/<class>/<file>.png")
    source = folder_source(path, image_size, channels, test_fraction, seed)
    rows = list(source.rows[split]())
    train = rows if split == "train" else list(source.rows["train"]())
    x = torch.from_numpy(np.stack([a for a, _ in rows])).permute(0, 3, 1, 2).float().div_(255.0)
    tx = torch.from_numpy(np.stack([a for a, _ in train])).permute(0, 3, 1, 2).float().div_(255.0)
    y = torch.tensor([label for _, label in rows], dtype=torch.int64)
    mean = tuple(float(m) for m in tx.mean(dim=(0, 2, 3)))
    std = tuple(max(float(s), 1e-6) for s in tx.std(dim=(0, 2, 3)))
    h = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]
    return Split(x.contiguous(), y, len(source.classes), mean, std, h, tuple(source.classes))
