"""What many test modules share, imported as ``from helpers import ...`` (``tests/`` is on ``sys.path``
through ``tests/conftest.py``): the repository's root, the Fashion-MNIST folder and its skip mark, a small
synthetic pipeline, and a log that prints nothing.

The modules beside this one hold the larger parts: ``s3server`` (a real SeaweedFS S3 server on loopback),
``datasets`` (small datasets written to disk), ``terminal`` (the CLI run under a pseudo-terminal),
``kubeapi`` (the loopback stand-in of the Kubernetes API) and ``raynodes`` (a Ray cluster of several real
nodes). Fixtures live in ``tests/conftest.py``; no test module imports another.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FMNIST = Path("/usr/share/datasets/fashion-mnist")

needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").exists(), reason="Debian package dataset-fashion-mnist is not installed"
)


def quiet(_msg: str) -> None:
    """A ``log`` for the library's calls that prints nothing."""


def synthetic_pipeline(tmp_path: Path, *, workers: int = 0, epochs: int = 2, extra_stages=(), **run) -> dict:
    """A small, fast pipeline document on the synthetic dataset (learnable in a few steps)."""
    data = {"name": "synthetic", "options": {"num_samples": 256, "image_size": 8, "num_classes": 4}}
    return {
        "name": "synth",
        "storage": {"uri": f"file://{tmp_path}/runs"},
        "run": {"workers": workers, **run},
        "stages": [
            {
                "name": "teacher",
                "kind": "train",
                "model": {"name": "cnn_small"},
                "data": data,
                "optim": {"epochs": epochs, "batch_size": 32, "lr": 3e-3},
            },
            *extra_stages,
        ],
    }
