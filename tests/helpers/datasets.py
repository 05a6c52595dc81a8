"""Small datasets written to disk for tests, and the accuracy of a published model on one.

Fashion-MNIST's IDX files (random pixels, any size, gzipped or not); a tiny image task as an ``.npz`` for
``kdray data import`` (``TRAIN`` training and ``TEST`` test rows of 8x8 grey images, ``CLASSES`` classes, learnable in a
few epochs); and token-id sequences for sequence models (an ``.npz`` of int64 rows of length ``T``).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from kdray.contracts.checkpoint import open_artifact
from kdray.contracts.specs import DataSpec
from kdray.core.metrics import metrics_for, predict
from kdray.data import datasets as kdata

TRAIN, TEST, CLASSES = 300, 80, 4  # val_fraction 0.1: 30 validation rows, 270 training rows (135 per rank)
T, VOCAB = 12, 16  # token ids: 0..11 are noise; 12 + c marks class c (of CLASSES)


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` in the IDX format of the Fashion-MNIST files (unsigned bytes)."""
    return b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape) + array.tobytes()


def write_fake_fmnist(folder, n=40, gz=True, seed=0):
    """The four Fashion-MNIST files in ``folder``, ``n`` random 28x28 images each; the arrays written, by split."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, (img, lab) in kdata.FASHION_MNIST_FILES.items():
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        arrays[split] = (images, labels)
        for name, arr in ((img, images), (lab, labels)):
            raw = idx_bytes(arr)
            (folder / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


def write_npz(path: Path, seed: int = 0) -> Path:
    """Seeded class prototypes plus noise, 8x8 grey: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 255, size=(CLASSES, 8, 8))
    arrays = {}
    for split, n in (("train", TRAIN), ("test", TEST)):
        y = np.arange(n) % CLASSES
        x = np.clip(protos[y] + rng.normal(0, 40, size=(n, 8, 8)), 0, 255).astype(np.uint8)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    np.savez(path, **arrays)
    return path


def accuracy_on_test(uri: str, data: dict) -> float:
    """Top-1 of the artifact at ``uri`` on the test split of ``data`` (loaded in memory)."""
    art = open_artifact(uri)
    test = kdata.load(DataSpec.model_validate({**data, "stream": False}), "test")
    logits = predict(art.build_model().eval(), kdata.normalize(test.x, test), 256)
    return metrics_for(logits, test.y)["top1"]


def token_task(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """int64 [n, T] sequences of noise tokens with the class's marker token at three random positions."""
    y = np.arange(n) % CLASSES
    x = rng.integers(0, 12, size=(n, T)).astype(np.int64)
    for i in range(n):
        x[i, rng.choice(T, size=3, replace=False)] = 12 + y[i]
    return x, y


def write_tokens(path: Path, train: int = 400, test: int = 120) -> Path:
    """An ``.npz`` of ``token_task`` rows (``kdray data import --as arrays``), seeded."""
    rng = np.random.default_rng(0)
    (xt, yt), (xs, ys) = token_task(train, rng), token_task(test, rng)
    np.savez(path, x_train=xt, y_train=yt, x_test=xs, y_test=ys, class_names=["a", "b", "c", "d"])
    return path
