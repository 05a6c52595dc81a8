"""DATASETS: image classification data as in-memory tensors, selected deterministically by a spec.

A dataset builder returns a ``Split`` of pixel-scale images ``x: float32 [N, C, H, W] in [0, 1]``
and labels ``y: int64 [N]``. ``load(spec, split)`` then applies the spec's deterministic
selection (class subset, limit, scarce labels) and ``normalize`` maps pixels to zero mean and unit
variance with the dataset's constants. Nothing is downloaded: Fashion-MNIST is read from IDX files
in a folder (the Debian package ``dataset-fashion-mnist`` by default) or under a storage prefix.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdray.core.errors import DataError
from kdray.core.registry import Registry
from kdray.core.storage import Storage
from kdray.data.shifts import compose, shift_hash
from kdray.data.transforms import TransformSpec, apply, has_random, output_size, split_random, stats
from kdray.data.transforms import key as transforms_key

DATASETS: Registry = Registry("dataset", group="kdray.datasets")

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass(frozen=True)
class Split:
    """Images in [0, 1] plus labels; ``y == -1`` marks an example whose label is withheld."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    mean: float | tuple[float, ...]  # one value, or one per channel
    std: float | tuple[float, ...]
    fingerprint: str
    class_names: tuple[str, ...] = ()
    # data.transforms still to apply to each training batch (the random ones and those after them;
    # ``load(..., augment=True)``): the batch source applies them on CPU, per epoch, before normalising
    augment: tuple[TransformSpec, ...] = ()
    # rows the dataset itself holds out for validation (a text corpus's validation documents,
    # kdray.data.text): when set, they are the validation split, whatever val_fraction says
    held_out: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def in_channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x.shape[-1])


# --------------------------------------------------------------------------- IDX files


def parse_idx(data: bytes, source: str) -> np.ndarray:
    """Decode one IDX file (optionally gzipped): magic 0x0000, dtype 0x08 (uint8), ndim, big-endian dims."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"{source} is not a readable gzip file ({e})",
                hint="Re-copy the file (for the Debian package: apt-get install --reinstall dataset-fashion-mnist).",
            ) from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise DataError(
            f"{source} is not an uint8 IDX file (bad magic number)",
            hint="Point data.path at the original Fashion-MNIST files (train-images-idx3-ubyte[.gz] ...).",
        )
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(
            f"{source} is truncated: {len(data)} bytes, shorter than its {4 + 4 * ndim}-byte header",
            hint="Re-copy the file (for the Debian package: apt-get install --reinstall dataset-fashion-mnist).",
        )
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if len(data) != expected:
        raise DataError(
            f"{source} is truncated or corrupt: {len(data)} bytes, header says {expected}",
            hint="Re-copy the file (for the Debian package: apt-get install --reinstall dataset-fashion-mnist).",
        )
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _read_idx_pair(location: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the image and label IDX files of ``split`` from a folder or a storage URI prefix."""
    names = FASHION_MNIST_FILES[split]
    if "://" in location and not location.startswith("file://"):
        store = Storage(location)
        arrays = []
        for name in names:
            for candidate in (name + ".gz", name):
                if store.exists(candidate):
                    arrays.append(parse_idx(store.read_bytes(candidate), store.uri(candidate)))
                    break
            else:
                raise DataError(
                    f"no {name}[.gz] under {location}",
                    hint="Upload the four Fashion-MNIST IDX files there, or set data.path to a folder that has them.",
                )
        return arrays[0], arrays[1]
    folder = Path(location.removeprefix("file://"))
    arrays = []
    for name in names:
        for path in (folder / (name + ".gz"), folder / name):
            if path.is_file():
                arrays.append(parse_idx(path.read_bytes(), str(path)))
                break
        else:
            raise DataError(
                f"no {name}[.gz] in {folder}",
                hint="Install the Debian package (apt-get install -y dataset-fashion-mnist), or set "
                "data.path (or KDRAY_FASHION_MNIST) to a folder or s3:// prefix holding the IDX files.",
            )
    return arrays[0], arrays[1]


def fashion_mnist_location(path: str | None) -> str:
    """The folder or URI to read from: the spec's path, $KDRAY_FASHION_MNIST, or the Debian package."""
    if path:
        return path
    if os.environ.get("KDRAY_FASHION_MNIST"):
        return os.environ["KDRAY_FASHION_MNIST"]
    for folder in FASHION_MNIST_DIRS:
        if Path(folder).is_dir():
            return folder
    raise DataError(
        "Fashion-MNIST was not found: no data.path given, KDRAY_FASHION_MNIST unset and "
        f"{FASHION_MNIST_DIRS[0]} missing",
        hint="Install it with `apt-get install -y dataset-fashion-mnist`, or set data.path to a folder "
        "or s3:// prefix holding train-images-idx3-ubyte.gz and the three other IDX files.",
    )


def _fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- fingerprints (kdray.data.lineage)

_FILE_SHA: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: each file hashed once per process


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_SHA:
        _FILE_SHA[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _FILE_SHA[key]


def short_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fashion_mnist_fingerprint(path: str | None = None, **_options: Any) -> dict[str, Any]:
    """The sha256 of the four IDX files (their ETags under an S3 prefix)."""
    location = fashion_mnist_location(path)
    names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
    if "://" in location and not location.startswith("file://"):
        store = Storage(location)
        found = [next((c for c in (n + ".gz", n) if store.exists(c)), n) for n in names]
        stamps = store.stamps(found)
        missing = [n for n, v in stamps.items() if v == "missing"]
        if missing:
            raise DataError(
                f"no {missing[0]}[.gz] under {location}", hint="Upload the four Fashion-MNIST IDX files there."
            )
        return {"content": short_digest(stamps), "how": "ETags of the IDX files", "files": stamps}
    folder = Path(location.removeprefix("file://"))
    shas = {}
    for name in names:
        file = next((p for p in (folder / (name + ".gz"), folder / name) if p.is_file()), None)
        if file is None:
            raise DataError(f"no {name}[.gz] in {folder}", hint="Set data.path to a folder holding the IDX files.")
        shas[file.name] = file_sha256(file)
    return {"content": short_digest(shas), "how": "sha256 of the IDX files"}


def digits_fingerprint(path: str | None = None, **_options: Any) -> dict[str, Any]:
    """The sha256 of scikit-learn's bundled digits file (found without importing scikit-learn)."""
    spec = importlib.util.find_spec("sklearn")
    origin = Path(spec.origin).parent if spec and spec.origin else None
    file = origin / "datasets" / "data" / "digits.csv.gz" if origin else None
    if file is None or not file.is_file():
        raise DataError("scikit-learn's bundled digits data was not found", hint="Install scikit-learn.")
    return {"content": file_sha256(file)[:16], "how": "sha256 of scikit-learn's digits.csv.gz"}


def synthetic_fingerprint(path: str | None = None, **options: Any) -> dict[str, Any]:
    return {"content": short_digest(options), "how": "generated from its options (seeded)"}


@DATASETS.register("fashion_mnist", image_size=28, in_channels=1, num_classes=10, fingerprint=fashion_mnist_fingerprint)
def fashion_mnist(split: str, path: str | None = None) -> Split:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 train / 10,000 test grey 28x28 images, 10 classes."""
    images, labels = _read_idx_pair(fashion_mnist_location(path), split)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(
            f"Fashion-MNIST {split}: the images file has shape {images.shape} and the labels file {labels.shape}; "
            "expected (N, 28, 28) images and (N,) labels",
            hint="Check that data.path holds the Fashion-MNIST IDX files under their own names.",
        )
    if len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    if len(labels) and int(labels.max()) >= 10:
        raise DataError(
            f"Fashion-MNIST {split}: label {int(labels.max())} is outside the 10 classes (0..9)",
            hint="The labels file is corrupt or from another dataset: re-copy it.",
        )
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return Split(
        x,
        torch.from_numpy(labels.astype(np.int64)),
        10,
        0.2860,
        0.3530,
        _fingerprint(images, labels),
        FASHION_MNIST_CLASSES,
    )


@DATASETS.register("digits", image_size=8, in_channels=1, num_classes=10, fingerprint=digits_fingerprint)
def digits(split: str, path: str | None = None) -> Split:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images); a fixed 80/20 train/test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    cut = int(0.8 * len(labels))
    idx = order[:cut] if split == "train" else order[cut:]
    x, y = images[idx], labels[idx]
    return Split(
        torch.from_numpy(x).unsqueeze(1),
        torch.from_numpy(y),
        10,
        0.3059,
        0.3811,
        _fingerprint(x, y),
        tuple(str(i) for i in range(10)),
    )


@DATASETS.register("synthetic", image_size=8, in_channels=1, num_classes=4, fingerprint=synthetic_fingerprint)
def synthetic(
    split: str,
    path: str | None = None,
    num_samples: int = 512,
    num_classes: int = 4,
    image_size: int = 8,
    channels: int = 1,
    noise: float = 0.15,
    seed: int = 0,
    shuffle_test_labels: bool = False,
) -> Split:
    """Seeded class prototypes plus noise: learnable in a few steps, for tests and smoke runs.

    ``shuffle_test_labels`` poisons the test split's labels (a seeded permutation): a check that no
    choice reads the test split, since every choice must then come out the same.
    """
    gen = torch.Generator().manual_seed(seed)
    protos = torch.rand(num_classes, channels, image_size, image_size, generator=gen)
    n = num_samples if split == "train" else max(num_samples // 4, num_classes)
    gen_split = torch.Generator().manual_seed(seed + (1 if split == "train" else 2))
    y = torch.arange(n) % num_classes
    x = (protos[y] + noise * torch.randn(n, channels, image_size, image_size, generator=gen_split)).clamp(0, 1)
    if shuffle_test_labels and split == "test":
        y = y[torch.randperm(n, generator=torch.Generator().manual_seed(seed + 3))]
    return Split(
        x, y, num_classes, 0.5, 0.3, _fingerprint(x.numpy(), y.numpy()), tuple(f"class{i}" for i in range(num_classes))
    )


# --------------------------------------------------------------------------- selection


def select(split: Split, spec: Any, part: str) -> Split:
    """Apply the spec's class subset, validation carve, limit and (training only) scarce-label selection.

    ``part`` is ``train``, ``val`` or ``test``; ``split`` is the builder's train split for the first two.
    The validation rows (``validation_rows``) come out of the training pool first, before ``limit``
    and before any label withholding, so they are fully labelled, disjoint from train and test, and the
    same whatever ``limit`` or the label settings are.
    """
    train = part == "train"
    x, y, k, names = split.x, split.y, split.num_classes, split.class_names
    if spec.classes is not None:
        bad = [c for c in spec.classes if c >= k]
        if bad:
            raise DataError(f"data.classes: {bad} out of range for {spec.name} ({k} classes, ids 0..{k - 1})")
        keep = torch.isin(y, torch.tensor(spec.classes))
        remap = torch.full((k,), -1, dtype=torch.long)
        remap[torch.tensor(spec.classes)] = torch.arange(len(spec.classes))
        x, y, k = x[keep], remap[y[keep]], len(spec.classes)
        names = tuple(names[c] for c in spec.classes) if names else ()
    if part != "test":
        in_val = (
            split.held_out
            if split.held_out is not None and spec.classes is None
            else validation_rows(y, k, spec.val_fraction, spec.val_size, spec.seed)
        )
        x, y = (x[in_val], y[in_val]) if part == "val" else (x[~in_val], y[~in_val])
    gen = torch.Generator().manual_seed(spec.seed)
    limit = {"train": spec.limit, "val": None, "test": spec.test_limit}[part]
    if limit is not None and limit < len(y):
        idx = torch.randperm(len(y), generator=gen)[:limit].sort().values
        x, y = x[idx], y[idx]
    if train and (spec.labels_per_class is not None or spec.label_fraction < 1.0):
        y = withhold_labels(y, k, spec.labels_per_class, spec.label_fraction, spec.seed)
        if spec.drop_unlabelled:
            x, y = x[y >= 0], y[y >= 0]
    tag = hashlib.sha256(
        f"{split.fingerprint}|{spec.classes}|{limit}|{spec.labels_per_class}|"
        f"{spec.label_fraction}|{spec.drop_unlabelled}|{spec.seed}|{part}|{spec.val_fraction}|{spec.val_size}".encode()
    ).hexdigest()[:16]
    return replace(split, x=x, y=y, num_classes=k, fingerprint=tag, class_names=names, held_out=None)


def validation_rows(y: torch.Tensor, num_classes: int, fraction: float, size: int | None, seed: int) -> torch.Tensor:
    """A boolean mask of the validation rows: ``size`` rows (else ``fraction`` of the labelled rows),
    stratified by class (each class gives its share, largest remainders first) and seeded by ``seed``.

    Each class keeps at least one row for training; unlabelled rows (``y == -1``) never validate.
    """
    mask = torch.zeros(len(y), dtype=torch.bool)
    counts = torch.stack([(y == c).sum() for c in range(num_classes)]).double()
    n = float(counts.sum())
    total = size if size is not None else round(fraction * n)
    if total <= 0 or n == 0:
        return mask
    room = (counts - 1).clamp(min=0)
    if total > float(room.sum()):
        raise DataError(
            f"data.val_size/val_fraction asks for {total} validation rows but the training pool has {int(n)} "
            "labelled rows (each class keeps at least one for training)",
            hint="Lower data.val_size or data.val_fraction (0 turns the validation split off).",
        )
    share = counts * (total / n)
    quota = torch.minimum(share.floor(), room)
    order = torch.argsort(share - quota, descending=True, stable=True).tolist()
    while int(quota.sum()) < total:  # hand out the remainder, largest fractional shares first
        for c in order:
            if int(quota.sum()) < total and quota[c] < room[c]:
                quota[c] += 1
    gen = torch.Generator().manual_seed(seed + 104729)
    for c in range(num_classes):
        idx = (y == c).nonzero().flatten()
        mask[idx[torch.randperm(len(idx), generator=gen)[: int(quota[c])]]] = True
    return mask


def withhold_labels(
    y: torch.Tensor, num_classes: int, per_class: int | None, fraction: float, seed: int
) -> torch.Tensor:
    """Keep ``per_class`` labels of each class (or ``fraction`` of each class); set the rest to -1."""
    gen = torch.Generator().manual_seed(seed + 7919)
    out = torch.full_like(y, -1)
    for c in range(num_classes):
        idx = (y == c).nonzero().flatten()
        n = per_class if per_class is not None else max(1, round(fraction * len(idx)))
        keep = idx[torch.randperm(len(idx), generator=gen)[:n]]
        out[keep] = c
    return out


def normalize(x: torch.Tensor, split: Split) -> torch.Tensor:
    if not x.is_floating_point():  # integer arrays (token ids: kdray.data.arrays) are inputs as they are
        return x
    if isinstance(split.mean, (int, float)) and isinstance(split.std, (int, float)):
        return (x - split.mean) / split.std
    shape = (-1,) + (1,) * (x.dim() - 2)  # per channel: [C, 1, 1] against [N, C, H, W]
    mean = torch.as_tensor(split.mean, dtype=x.dtype).view(shape)
    return (x - mean) / torch.as_tensor(split.std, dtype=x.dtype).view(shape)


def load(spec: Any, split: str = "train", augment: bool = False) -> Split:
    """Load ``spec.name``'s ``split`` (``train``, ``val`` or ``test``), apply the spec's domain shifts,
    deterministic selection and ``transforms``. ``val`` is carved from the dataset's training split (``select``).

    Pixels stay in [0, 1]; ``normalize`` comes after. A shift is seeded by ``spec.seed`` and the
    split, so train and test images of a shifted domain get independent noise. The transforms give the
    deterministic view of every split, unless ``augment`` (the training loop's ``train`` split): then
    the steps from the first random one on are left in ``Split.augment`` for the batch source.
    """
    if split not in ("train", "val", "test"):
        raise DataError(f"unknown split {split!r}; use train, val or test")
    builder = DATASETS.get(spec.name)
    try:
        raw = builder("test" if split == "test" else "train", path=spec.path, **spec.options)
    except TypeError as e:
        raise DataError(f"data.options: {e}") from None
    if spec.shifts:
        x, y = compose(spec.shifts, num_classes=raw.num_classes)(raw.x, raw.y, spec.seed * 2 + (split == "test"))
        tag = hashlib.sha256(f"{raw.fingerprint}|{shift_hash(spec.shifts)}".encode()).hexdigest()[:16]
        raw = replace(raw, x=x, y=y, fingerprint=tag)
    return transform(select(raw, spec, split), getattr(spec, "transforms", []), augment and split == "train")


def transform(split: Split, steps: list[TransformSpec], augment: bool = False) -> Split:
    """``split`` with ``steps`` (data.transforms) applied: all of them in their deterministic view, or,
    with ``augment`` and random steps, the ones before the first random step (the rest in ``augment``)."""
    if not steps:
        return split
    if split.x.dim() != 4 or not split.x.is_floating_point():
        raise DataError(
            f"data.transforms apply to images (float pixels [N, C, H, W]), not to {split.x.dtype} arrays of shape "
            f"{tuple(split.x.shape[1:])}",
            hint="Drop data.transforms for this dataset.",
        )
    now, later = split_random(steps) if augment and has_random(steps) else (steps, [])
    mean, std = stats(steps, split.mean, split.std, split.in_channels)
    tag = hashlib.sha256(f"{split.fingerprint}|transforms|{transforms_key(steps)}".encode()).hexdigest()[:16]
    return replace(split, x=apply(split.x, now), mean=mean, std=std, fingerprint=tag, augment=tuple(later))


def describe(spec: Any) -> dict[str, Any]:
    """Static facts of a dataset for model building without loading it (channels, size, classes)."""
    meta = dict(DATASETS.meta(spec.name))
    facts = ("num_classes", "in_channels", "image_size")
    if callable(meta.get("describe")):  # a file-backed dataset reads them from its metadata (dataset.json)
        meta.update(meta.pop("describe")(spec.path, **spec.options))
    elif any(k not in meta for k in facts):  # e.g. a plug-in registered without them: read them off the data
        raw = DATASETS.get(spec.name)("train", path=spec.path, **spec.options)
        meta.update(num_classes=raw.num_classes, in_channels=raw.in_channels, image_size=raw.image_size)
    meta.update({k: v for k, v in spec.options.items() if k in ("image_size", "num_classes")})
    if spec.options.get("channels"):
        meta["in_channels"] = spec.options["channels"]
    if spec.classes is not None:
        meta["num_classes"] = len(spec.classes)
    if getattr(spec, "transforms", None) and "image_size" in meta:
        meta["image_size"] = output_size(spec.transforms, meta["image_size"])
    return meta
