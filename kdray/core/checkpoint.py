"""Artifacts: weights in safetensors, a JSON manifest written last, and checked loading.

An artifact is a folder ``<root>/<pipeline>/<stage>/<key>/`` holding ``model.safetensors``, any
reports, and ``manifest.json``. The manifest is written last: a folder without one is unfinished
and every reader ignores it. Nothing here unpickles: weights are safetensors, metadata is JSON.
"""

from __future__ import annotations

import hashlib
import json
import platform
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

from kdray.core.errors import CheckpointMismatch, StorageError
from kdray.core.models import create_model
from kdray.core.storage import Storage

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
MANIFEST_SCHEMA_VERSION = 1


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
    """A finished stage output: where it lives and what its manifest says."""

    store: Storage
    manifest: dict[str, Any]

    @property
    def uri(self) -> str:
        return self.store.uri()

    @property
    def weights_sha256(self) -> str | None:
        return (self.manifest.get("weights") or {}).get("sha256")

    def read_json(self, name: str) -> Any:
        return json.loads(self.store.read_bytes(name))

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
        model = create_model(spec["name"], **spec["kwargs"])
        load_state_checked(model, self.state_dict(), source=self.uri, target=spec["name"])
        return model


def write_artifact(
    store: Storage,
    manifest: dict[str, Any],
    state: dict[str, torch.Tensor] | None = None,
    files: dict[str, bytes] | None = None,
) -> Artifact:
    """Publish an artifact: weights and files first, the manifest last (the commit point)."""
    manifest = dict(manifest)
    if state is not None:
        data = state_to_bytes(state)
        store.write_bytes(WEIGHTS, data)
        manifest["weights"] = {"file": WEIGHTS, "sha256": sha256(data), "bytes": len(data), "tensors": len(state)}
    for name, data in (files or {}).items():
        store.write_bytes(name, data)
    manifest.setdefault("schema_version", MANIFEST_SCHEMA_VERSION)
    manifest.setdefault("versions", package_versions())
    manifest.setdefault("git_commit", git_commit())
    manifest.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    store.write_bytes(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    return Artifact(store, manifest)


def read_artifact(uri_or_store: str | Storage) -> Artifact | None:
    """The finished artifact at a folder, or None when it has no manifest (absent or unfinished)."""
    store = uri_or_store if isinstance(uri_or_store, Storage) else Storage(uri_or_store)
    if not store.exists(MANIFEST):
        return None
    raw = store.read_bytes(MANIFEST)
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise StorageError(
            f"{store.uri(MANIFEST)} is not valid JSON ({e})",
            hint="Delete the artifact folder or rerun the stage with --force.",
        ) from None
    if manifest.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise StorageError(
            f"{store.uri(MANIFEST)} has manifest schema version {manifest.get('schema_version')}, "
            f"this kdray reads version {MANIFEST_SCHEMA_VERSION}",
            hint="Rerun the stage with --force to rebuild it with this version.",
        )
    return Artifact(store, manifest)


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
