"""Where everything lives under a storage root: the one owner of kdray's storage layout.

::

    <root>/<pipeline>/<stage>/<key>/         a stage's artifact (manifest.json, weights, stage.json, logs/)
    <root>/<pipeline>/_baselines/<key>/      an adapt stage's source-only baseline
    <root>/<pipeline>/_sweeps/<stage>-<key>/ a sweep's trials and report
    <root>/<pipeline>/_scores/<stage>-<key>/ transferability rankings (kdray score)
    <root>/_cache/teacher/<key>/             teacher outputs shared by every student of one teacher and data
    <root>/_cache/datafree/<key>/            images synthesised from a teacher (data-free KD)
    <root>/_ray/<run name>/                  Ray Train's checkpoints of a run (resumed by a rerun, deleted by --force)

Every path is relative to the root a spec names (``storage.uri``); the functions return ``Storage``
children so that callers never spell a path themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # names only: importing the layout costs nothing (``kdray --help`` reads it)
    import pyarrow.fs as pafs

    from kdray.core.storage import Storage

STAGE_FILE = "stage.json"  # what ``python -m kdray.worker`` reads to run a stage anywhere
LOGS = "logs"  # a stage's failure logs, beside its artifact


def artifact(root: Storage, pipeline: str, stage: str, key: str) -> Storage:
    """A stage's artifact folder: ``<root>/<pipeline>/<stage>/<key>``."""
    return root.child(f"{pipeline}/{stage}/{key}")


def baseline(root: Storage, pipeline: str, key: str) -> Storage:
    return root.child(f"{pipeline}/_baselines/{key}")


def sweep(root: Storage, pipeline: str, stage: str, key: str) -> Storage:
    return root.child(f"{pipeline}/_sweeps/{stage}-{key}")


def scores(root: Storage, pipeline: str, stage: str, key: str) -> Storage:
    return root.child(f"{pipeline}/_scores/{stage}-{key}")


def teacher_cache(root: Storage, key: str) -> Storage:
    return root.child(f"_cache/teacher/{key}")


def datafree_cache(root: Storage, key: str) -> Storage:
    return root.child(f"_cache/datafree/{key}")


def ray_run(run_name: str) -> str:
    """Ray Train's storage folder of a run, relative to the root (Ray takes it as a path, not a ``Storage``)."""
    return f"_ray/{run_name}"


def ray_storage(root: Storage) -> tuple[str, pafs.FileSystem]:
    """(storage_path, storage_filesystem) for ``ray.train.RunConfig``: Ray Train's runs under ``<root>/_ray``."""
    return root.path("_ray"), root.fs
