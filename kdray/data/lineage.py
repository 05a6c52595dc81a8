"""Data fingerprints: what a stage's manifest records of the data it read, and why a cached artifact is stale.

A stage's key hashes its spec, its parents' keys and the seed, not the bytes of its data. So that a
rerun never shows a result of other data as current, every dataset a stage reads gets a fingerprint,
recorded in the manifest (``manifest["data"]``, one entry per spec field such as ``data`` or
``target_domain``) and compared with the data as it is now before the artifact is believed
(``stale_reasons``). The key itself stays as it was, so existing artifacts keep their addresses.

What a fingerprint is depends on the dataset (docs/data.md, "Lineage"):

* ``parquet``: the content hash ``kdray data import`` wrote into ``dataset.json`` (the rows, and each
  shard's sha256), plus each shard's ETag on S3 (size and modification time on a disk): a re-import,
  or a shard replaced by hand, is a change. A folder without ``dataset.json`` is an unfinished import.
* ``fashion_mnist``: the sha256 of the IDX files (ETags under an S3 prefix).
* ``digits``: the sha256 of scikit-learn's bundled data file; ``synthetic``: its options (it is generated).
* ``image_folder``: every image file's name and ETag (size and modification time on a disk).
* a plug-in dataset registered with ``fingerprint=<function(path, **options) -> dict>`` gives its own;
  one without is loaded and its rows hashed (honest, but it reads the data).
"""

from __future__ import annotations

from typing import Any

from kdray.data.datasets import DATASETS, short_digest


def fingerprint(spec: Any) -> dict[str, Any]:
    """The fingerprint of a ``DataSpec``'s dataset as it is now: ``{"dataset", "path", "content", "how"}``
    (``files``: name -> stamp, for a dataset made of files whose stamps are checked too)."""
    fn = DATASETS.meta(spec.name).get("fingerprint")
    if callable(fn):
        found = dict(fn(spec.path, **spec.options))
    else:  # a plug-in without its own: the rows of both splits, as loaded
        builder = DATASETS.get(spec.name)
        parts = [builder(s, path=spec.path, **spec.options).fingerprint for s in ("train", "test")]
        found = {"content": short_digest(parts), "how": "the loaded rows of both splits"}
    return {"dataset": spec.name, "path": spec.path, **found}


def of_datasets(specs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Field name -> fingerprint, for the data specs a stage reads."""
    return {field: fingerprint(spec) for field, spec in specs.items()}


def changes(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between a manifest's data record and the data now, one phrase per difference."""
    out = []
    for field, was in recorded.items():
        if not isinstance(was, dict):
            continue
        cur = now.get(field)
        where = f"{field} ({was.get('dataset')}{' at ' + str(was.get('path')) if was.get('path') else ''})"
        if cur is None:
            continue  # the stage no longer reads this field: its key would have changed
        if was.get("content") != cur.get("content"):
            out.append(f"{where}: its content hash is {cur.get('content')}, was {was.get('content')}")
            continue
        files_was, files_now = was.get("files") or {}, cur.get("files") or {}
        moved = sorted(n for n in set(files_was) | set(files_now) if files_was.get(n) != files_now.get(n))
        if moved:
            shown = ", ".join(moved[:3]) + (f" and {len(moved) - 3} more" if len(moved) > 3 else "")
            out.append(f"{where}: {shown} changed on storage (ETag, or size and modification time)")
    return out
