"""Artifacts: weights in safetensors, a JSON manifest written last, and checked loading.

An artifact is a folder ``<root>/<pipeline>/<stage>/<key>/`` holding ``manifest.json`` and, under
``v/<version>/``, one immutable folder per publish: ``model.safetensors``, any reports and a copy of
the manifest. ``<version>`` hashes the content of every file, so a folder is never rewritten with
other bytes. The top ``manifest.json`` is written last, atomically, and names its version and the
sha256 of each file: it is the commit point. A folder without one is unfinished and every reader
ignores it; a rerun that fails midway leaves the previous manifest and the files it names intact,
and two concurrent publishers each write their own version, the last manifest wins whole.
Nothing here unpickles: weights are safetensors, metadata is JSON. Folders written before versions
existed (files beside ``manifest.json``, no ``version``) are still read.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kdray.core.errors import CheckpointMismatch, KdrayError, StorageError
from kdray.core.storage import Storage
from kdray.models import model_from_record

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
MANIFEST_SCHEMA_VERSION = 1
VERSIONS = "v"  # <artifact>/v/<version>/: the immutable folders a manifest points at


def state_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """Serialise a state dict; tied tensors are stored once each (safetensors refuses shared storage)."""
    return st_save({k: v.detach().contiguous().clone().cpu() for k, v in state.items()})


def bytes_to_state(data: bytes, source: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointMismatch(
            f"{source} is not a readable safetensors file ({e})",
            hint="The file is truncated or corrupt: rerun the stage with --force.",
        ) from None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("kdray", "torch", "ray", "pydantic", "pyarrow", "safetensors", "prefect"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass
class Artifact:
    """A finished stage output: where it lives and what its manifest says.

    ``home`` is the artifact folder (its stable address, ``uri``); ``store`` is the folder holding
    the files this manifest names (``home/v/<version>`` or, for an old-layout artifact, ``home``).
    """

    store: Storage
    manifest: dict[str, Any]
    home: Storage | None = None

    @property
    def uri(self) -> str:
        return (self.home or self.store).uri()

    @property
    def pinned_uri(self) -> str:
        """The immutable folder of exactly this version (what a consumer should read)."""
        return self.store.uri()

    @property
    def weights_sha256(self) -> str | None:
        return (self.manifest.get("weights") or {}).get("sha256")

    def exists(self, name: str) -> bool:
        return self.store.exists(name)

    def read_bytes(self, name: str) -> bytes:
        """A file of this artifact, checked against the sha256 its manifest records (if any).

        A local file that is a link leading out of the artifact's folder is refused.
        """
        if self.store.scheme == "file":
            home = os.path.realpath((self.home or self.store).path())
            real = os.path.realpath(self.store.path(name))
            if os.path.commonpath([home, real]) != home:
                raise StorageError(
                    f"{self.store.uri(name)} leads out of the artifact folder (to {real})",
                    hint="Artifacts hold their own files: replace the link with the file or rerun the stage with --force.",
                )
        data = self.store.read_bytes(name)
        expected = (self.manifest.get("files") or {}).get(name, {}).get("sha256")
        if expected and sha256(data) != expected:
            raise CheckpointMismatch(
                f"{self.store.uri(name)} does not match its manifest (sha256 {sha256(data)[:12]} != {expected[:12]})",
                hint="The file was changed after publishing: rerun the stage with --force.",
            )
        return data

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.manifest.get("weights"):
            raise CheckpointMismatch(
                f"{self.uri} has no weights (a {self.manifest.get('kind')} stage)",
                hint="Refer to a train, distill, transfer or adapt stage instead.",
            )
        data = self.store.read_bytes(WEIGHTS)
        expected = self.weights_sha256
        if expected and sha256(data) != expected:
            raise CheckpointMismatch(
                f"{self.store.uri(WEIGHTS)} does not match its manifest (sha256 "
                f"{sha256(data)[:12]} != {expected[:12]})",
                hint="The weights were changed or truncated after publishing: rerun the stage with --force.",
            )
        return bytes_to_state(data, self.store.uri(WEIGHTS))

    def build_model(self) -> nn.Module:
        """Rebuild the manifest's architecture and load the weights into it (checked)."""
        spec = self.manifest["model"]
        model = model_from_record(spec)
        load_state_checked(model, self.state_dict(), source=self.uri, target=spec["name"])
        return model


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors holding a NaN or an infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def write_artifact(
    store: Storage,
    manifest: dict[str, Any],
    state: dict[str, torch.Tensor] | None = None,
    files: dict[str, bytes] | None = None,
) -> Artifact:
    """Publish an artifact: a fresh version folder with every file, then the manifest (the commit point).

    Non-finite weights are refused: nothing NaN is ever published.
    """
    manifest = dict(manifest)
    content: dict[str, bytes] = {}
    if state is not None:
        bad = non_finite(state)
        if bad:
            raise KdrayError(
                f"refusing to publish {store.uri()}: weights hold NaN or infinite values "
                f"({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''})",
                hint="Training diverged: lower optim.lr or optim.weight_decay, check the inputs for "
                "non-finite values, then rerun the stage with --force.",
            )
        content[WEIGHTS] = state_to_bytes(state)
    for name, data in (files or {}).items():
        if name == MANIFEST or name == WEIGHTS:
            raise KdrayError(f"an artifact file may not be called {name!r}")
        content[name] = data
    digests = {name: sha256(data) for name, data in content.items()}
    version = sha256(json.dumps(digests, sort_keys=True).encode())[:16]
    if state is not None:
        data = content[WEIGHTS]
        manifest["weights"] = {"file": WEIGHTS, "sha256": digests[WEIGHTS], "bytes": len(data), "tensors": len(state)}
    manifest["files"] = {n: {"sha256": digests[n], "bytes": len(d)} for n, d in content.items() if n != WEIGHTS}
    manifest.setdefault("schema_version", MANIFEST_SCHEMA_VERSION)
    manifest.setdefault("versions", package_versions())
    manifest.setdefault("git_commit", git_commit())
    manifest.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    folder = store.child(f"{VERSIONS}/{version}")
    for name, data in content.items():  # weights first: the biggest write fails before anything else
        folder.write_bytes(name, data)
    folder.write_bytes(MANIFEST, _dump(manifest))  # the version alone is a readable (old-layout) artifact
    manifest["version"] = f"{VERSIONS}/{version}"
    store.write_bytes(MANIFEST, _dump(manifest))  # the commit point
    prune_versions(store, keep=version)
    return Artifact(folder, manifest, store)


KEEP_VERSIONS_S = 3600.0  # an older version is deleted by the next publish; a reader has this long to finish


def prune_versions(store: Storage, keep: str, older_than_s: float = KEEP_VERSIONS_S) -> list[str]:
    """Delete the version folders a manifest no longer names, once they are ``older_than_s`` old.

    Age, not "not current", decides: a concurrent publisher's folder is not committed yet, and a
    reader may still be reading the previous version; neither is touched for an hour. A folder
    without a readable manifest copy (a publisher still writing, or one that failed) is left alone.
    Best effort: a failure to list or delete never fails the publish.
    """
    removed: list[str] = []
    now = time.time()
    try:
        names = [p.rsplit("/", 1)[-1] for p in store.list(VERSIONS)]
    except StorageError:
        return removed
    for name in names:
        if name == keep:
            continue
        try:
            created = json.loads(store.read_bytes(f"{VERSIONS}/{name}/{MANIFEST}"))["created_at"]
            age = now - calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ"))
        except (StorageError, ValueError, KeyError, TypeError):
            continue  # unfinished (maybe by a publisher still at work), or not ours to judge
        if age >= older_than_s:
            store.delete_dir(f"{VERSIONS}/{name}")
            removed.append(name)
    return removed


def _dump(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()


def read_artifact(uri_or_store: str | Storage) -> Artifact | None:
    """The finished artifact at a folder, or None when it has no manifest (absent or unfinished)."""
    store = uri_or_store if isinstance(uri_or_store, Storage) else Storage(uri_or_store)
    if not store.exists(MANIFEST):
        return None
    raw = store.read_bytes(MANIFEST)
    where = store.uri(MANIFEST)
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise StorageError(
            f"{where} is not valid JSON ({e})",
            hint="Delete the artifact folder or rerun the stage with --force.",
        ) from None
    if not isinstance(manifest, dict):
        raise StorageError(
            f"{where} is a JSON {type(manifest).__name__}, not an artifact manifest (an object)",
            hint="Delete the artifact folder or rerun the stage with --force.",
        )
    if manifest.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise StorageError(
            f"{where} has manifest schema version {manifest.get('schema_version')}, "
            f"this kdray reads version {MANIFEST_SCHEMA_VERSION}",
            hint="Rerun the stage with --force to rebuild it with this version.",
        )
    _check_shape(manifest, where)
    version = manifest.get("version")
    if version is None:
        return Artifact(store, manifest, store)  # old layout: the files lie beside the manifest
    return Artifact(store.child(version), manifest, store)


# The fields readers rely on, and the JSON type each must have when present.
_SHAPE: dict[str, type | tuple[type, ...]] = {
    "kind": str,
    "pipeline": str,
    "stage": str,
    "key": str,
    "weights": (dict, type(None)),
    "files": dict,
    "model": dict,
    "metrics": dict,
    "history": list,
    "parents": list,
}


def _check_shape(manifest: dict[str, Any], where: str) -> None:
    """A manifest that is JSON of the wrong shape is a clear error, not a KeyError later."""
    problems = [
        f"{name!r} is a {type(manifest[name]).__name__}"
        for name, kind in _SHAPE.items()
        if name in manifest and not isinstance(manifest[name], kind)
    ]
    version = manifest.get("version")
    if version is not None and not (
        isinstance(version, str) and re.fullmatch(rf"{VERSIONS}/[0-9a-f]{{16}}", version) is not None
    ):
        problems.append(f"'version' is {version!r}, not {VERSIONS}/<16 hex digits>")
    weights = manifest.get("weights")
    if isinstance(weights, dict) and not isinstance(weights.get("sha256"), (str, type(None))):
        problems.append("'weights.sha256' is not a string")
    model = manifest.get("model")
    if isinstance(model, dict) and not isinstance(model.get("kwargs"), dict):
        problems.append("'model' lacks an object 'kwargs'")
    if problems:
        raise StorageError(
            f"{where} is not a valid artifact manifest: {'; '.join(problems)}",
            hint="Delete the artifact folder or rerun the stage with --force.",
        )


def open_artifact(uri: str) -> Artifact:
    """Like ``read_artifact`` but a missing or unfinished artifact is an error."""
    art = read_artifact(uri)
    if art is None:
        raise StorageError(
            f"no finished artifact at {uri} (no {MANIFEST})",
            hint="Run the stage that produces it first, or check the URI with `kdray ls`.",
        )
    return art


def diff_state(model_state: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> list[str]:
    """Every difference between the names and shapes a model expects and those in a file."""
    problems = []
    missing = [k for k in model_state if k not in loaded]
    unexpected = [k for k in loaded if k not in model_state]
    if missing:
        problems.append(f"missing in file: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"not in model: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    for k in model_state:
        if k in loaded and tuple(model_state[k].shape) != tuple(loaded[k].shape):
            problems.append(f"{k}: model {tuple(model_state[k].shape)} vs file {tuple(loaded[k].shape)}")
    return problems


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], *, source: str, target: str) -> None:
    """Load ``state`` into ``model`` after checking every tensor name and shape; say exactly what differs."""
    problems = diff_state(model.state_dict(), state)
    if problems:
        raise CheckpointMismatch(
            f"weights from {source} do not fit model {target!r}: " + "; ".join(problems[:12]),
            hint="Use the same model name and options as the stage that wrote them, "
            "or a transfer stage to map weights between different architectures.",
        )
    model.load_state_dict(state)
