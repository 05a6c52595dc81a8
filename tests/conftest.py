"""Shared fixtures (one real local Ray for the session, temporary storage) and the environment of every test.
Helpers to import are in ``tests/helpers/``.

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
