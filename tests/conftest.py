"""Shared fixtures: one real local Ray for the session, temporary storage, data availability.

The suite runs Ray as users do: nothing here changes Ray's settings (token authentication stays on,
as Ray's default; kdray itself sets what it sets for every user, ``kdray.engine.driver.RAY_ENV``). A
test that needs a special setting sets it for itself and says why.

Prefect's only: its home (database, settings) in a temporary folder, so tests never read or write a
user's ``~/.prefect``; no analytics; the ephemeral server's start-up bounded as ``kdray-flow`` bounds
it for users (``flows/pipeline.py``). And kdray's record of a ``kdray cluster up`` cluster
(``KDRAY_CLUSTER_FILE``) is in the temporary folder too, so the suite never joins a user's cluster.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_TMP = tempfile.mkdtemp(prefix="kdray-tests-")
for key, value in {
    "PREFECT_HOME": os.path.join(_TMP, "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "KDRAY_CLUSTER_FILE": os.path.join(_TMP, "cluster.json"),  # never join a `kdray cluster up` of the user
}.items():
    os.environ.setdefault(key, value)

REPO = Path(__file__).resolve().parent.parent
FMNIST = Path("/usr/share/datasets/fashion-mnist")

needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").exists(), reason="Debian package dataset-fashion-mnist is not installed"
)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs, shared by every test that starts Ray Train actors."""
    import ray

    from kdray.contracts.specs import RunSpec
    from kdray.engine.driver import ensure_ray

    if not ray.is_initialized():
        ensure_ray(RunSpec())
    yield ray
    ray.shutdown()


@pytest.fixture
def store(tmp_path):
    from kdray.core.storage import Storage

    return Storage(f"file://{tmp_path}/store")


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
