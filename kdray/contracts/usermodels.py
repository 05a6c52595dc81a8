"""Building a stage's model from its spec: a registry name, a user import path or a Hugging Face
folder or config, plus pretrained weights and the network's own input view.

Every stage kind builds its networks through :func:`build_model`, so ``model.import``, ``model.hf``,
``model.classifier``, ``model.weights`` and ``model.inputs`` work the same in train, distill,
transfer, adapt and pretrained stages. Pretrained weights are safetensors (never a pickle), read from any storage URI or from a
kdray artifact, renamed by ``weights_prefix`` and loaded through the checked loader, which names
every missing, unexpected or mis-shaped tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from kdray.contracts.checkpoint import MANIFEST, bytes_to_state, load_state_checked, open_artifact, sha256
from kdray.contracts.hffolder import build_from_folder, open_folder
from kdray.contracts.specs import ModelSpec
from kdray.core.errors import StorageError
from kdray.core.storage import Storage
from kdray.models import adopt, build_user_model, create_model
from kdray.models.hf import build_from_config, check_positions
from kdray.models.inputs import with_inputs


def split_uri(uri: str) -> tuple[Storage, str]:
    """``s3://b/p/w.safetensors`` -> (Storage("s3://b/p"), "w.safetensors"); plain paths are local files."""
    head, _, name = uri.rstrip("/").rpartition("/")
    if not name:
        raise StorageError(f"model.weights: {uri!r} names no file")
    return Storage(head or "."), name


def read_weights(uri: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256 of the safetensors bytes) from a safetensors file URI or a kdray artifact URI."""
    store, name = split_uri(uri)
    if not name.endswith(".safetensors") and (store.child(name).exists(MANIFEST)):
        art = open_artifact(store.child(name).uri())
        return art.state_dict(), art.weights_sha256 or ""
    if not store.exists(name):
        raise StorageError(
            f"model.weights: no file at {uri}",
            hint="Point it at a .safetensors file (file://, s3:// or a path) or at a kdray artifact folder.",
        )
    data = store.read_bytes(name)
    return bytes_to_state(data, uri), sha256(data)


def rename_prefixes(state: dict[str, torch.Tensor], mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rename keys by their longest matching prefix in ``mapping`` (``{"backbone.": "features."}``)."""
    if not mapping:
        return state
    order = sorted(mapping, key=len, reverse=True)
    out = {}
    for key, value in state.items():
        prefix = next((p for p in order if key.startswith(p)), None)
        out[key if prefix is None else mapping[prefix] + key[len(prefix) :]] = value
    return out


def build_model(spec: ModelSpec, kwargs: dict[str, Any], weights: bool = True, field: str = "model") -> nn.Module:
    """The stage's network: ``create_model`` or the user's factory, adopted, with ``spec.weights`` loaded."""
    kwargs = {**spec.params, **spec.options, **kwargs}  # kwargs from stage.model_kwargs already hold them
    view = kwargs.pop("inputs", None)  # the network's own input view (stage.model_kwargs), not a builder keyword
    if spec.hf is not None:
        model = build_from_folder(
            open_folder(spec.hf, f"{field}.hf"),
            kwargs.get("num_classes"),
            task=spec.task,
            classifier=spec.classifier,
            trust_remote_code=spec.trust_remote_code,
            weights=weights,
            field=f"{field}.hf",
        )
    elif spec.hf_config is not None:
        model = build_from_config(
            spec.hf_config,
            kwargs.get("num_classes"),
            task=spec.task,
            classifier=spec.classifier,
            trust_remote_code=spec.trust_remote_code,
            field=f"{field}.hf_config",
        )
    elif spec.import_:
        model = build_user_model(spec.import_, kwargs, spec.classifier, field)
    else:
        model = adopt(create_model(spec.label, **kwargs), spec.classifier, field)
    if spec.hf is not None or spec.hf_config is not None:  # a causal LM reads a text dataset's whole rows
        check_positions(model, kwargs.get("in_channels"), f"{field}.hf_config" if spec.hf_config else f"{field}.hf")
    if view:
        model = with_inputs(model, view)
    if weights and spec.weights:
        state, _ = read_weights(spec.weights)
        load_state_checked(model, rename_prefixes(state, spec.weights_prefix), source=spec.weights, target=spec.label)
    return model


def weights_record(spec: ModelSpec) -> dict[str, Any] | None:
    """What lineage records of the pretrained weights: their URI, key mapping and sha256 (a Hugging Face
    folder: its URI and the sha256 of each weights file)."""
    if spec.hf is not None:
        folder = open_folder(spec.hf)
        return {"hf": folder.uri, "files": folder.lineage()}
    if not spec.weights:
        return None
    _, digest = read_weights(spec.weights)
    return {"uri": spec.weights, "prefix": dict(spec.weights_prefix), "sha256": digest}
