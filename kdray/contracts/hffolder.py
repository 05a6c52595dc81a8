"""Hugging Face model folders: read one as a kdray network, write a student as one.

A folder as ``save_pretrained`` writes it, on a local path, ``file://`` or ``s3://``:

    config.json                     the architecture (model_type and its fields), the label count
    model.safetensors               the weights; or shards named by model.safetensors.index.json
    preprocessor_config.json        optional: the input size, image_mean and image_std it was trained with

``model: {hf: <folder URI>}`` builds the network from ``config.json`` with the ``transformers`` Auto
class of the task (:mod:`kdray.models.hf`) and loads its weights through kdray's checked
loader (every tensor's name and shape; safetensors only: ``pytorch_model.bin`` is a pickle and is
refused). ``model: {hf_config: {...}}`` builds the same kind of network from an inline config, with
fresh weights, to train one. :func:`write_folder` publishes a trained transformers network as a
folder that ``from_pretrained`` loads without kdray.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from kdray.contracts.checkpoint import sha256
from kdray.core.errors import CheckpointMismatch, SpecError
from kdray.core.storage import Storage
from kdray.models import adopt
from kdray.models.hf import (
    TASKS,
    build_from_config,
    check_remote_code,
    check_vocab,
    code_folder,
    make_config,
    pad_ids,
    task_of,
    transformers,
)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PREPROCESSOR = "preprocessor_config.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


@dataclass
class Folder:
    """What a Hugging Face folder holds (its weights are read when the network is built: :meth:`local`)."""

    uri: str
    store: Storage
    config: dict[str, Any]
    weight_files: list[str]
    preprocessor: dict[str, Any] | None = None
    digests: dict[str, str] = field(default_factory=dict)  # weights file -> sha256, filled as they are read

    @contextlib.contextmanager
    def local(self) -> Iterator[str]:
        """A local folder holding config.json and the weights files (each read here, its sha256 recorded):
        the folder itself when it is local, else a temporary copy, removed afterwards."""
        if self.store.scheme == "file":
            self.lineage()
            yield self.store.path()
            return
        with tempfile.TemporaryDirectory(prefix="kdray-hf-") as tmp:
            names = [CONFIG, *self.weight_files, *self.code()] + (
                [INDEX] if len(self.weight_files) > 1 or self.store.exists(INDEX) else []
            )
            for name in dict.fromkeys(names):
                data = self.store.read_bytes(name)
                if name in self.weight_files:
                    self.digests[name] = sha256(data)
                Path(tmp, name).write_bytes(data)
            yield tmp

    def code(self) -> dict[str, str]:
        """The folder's own Python files (name -> source) when its config names code (``auto_map``), else none."""
        if not self.config.get("auto_map"):
            return {}
        names = [n for n in self.store.list() if n.endswith(".py") and "/" not in n]
        return {n: self.store.read_bytes(n).decode() for n in names}

    def lineage(self) -> dict[str, str]:
        """sha256 of each weights file (read once if not yet)."""
        if len(self.digests) != len(self.weight_files):
            for name in self.weight_files:
                self.digests.setdefault(name, sha256(self.store.read_bytes(name)))
        return dict(self.digests)


def _json(store: Storage, name: str, field: str) -> Any:
    try:
        return json.loads(store.read_bytes(name))
    except (ValueError, RecursionError) as e:
        raise SpecError(f"{field}: {store.uri(name)} is not valid JSON ({e})") from None


def open_folder(uri: str, field: str = "model.hf") -> Folder:
    """The folder at ``uri``: its config, the names of its safetensors weights and its preprocessor config."""
    store = Storage(uri.rstrip("/"))
    if not store.exists(CONFIG):
        raise SpecError(
            f"{field}: no {CONFIG} in {store.uri()}",
            hint="Point it at a folder written by save_pretrained (config.json and model.safetensors), "
            "as a path, file:// or s3:// URI.",
        )
    config = _json(store, CONFIG, field)
    if not isinstance(config, dict):
        raise SpecError(f"{field}: {store.uri(CONFIG)} is not a JSON object")
    if store.exists(INDEX):
        index = _json(store, INDEX, field)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise SpecError(f"{field}: {store.uri(INDEX)} has no weight_map")
        files = sorted(set(map(str, weight_map.values())))
        bad = [f for f in files if "/" in f or "\\" in f or f.startswith(".") or not f.endswith(".safetensors")]
        if bad:
            raise SpecError(f"{field}: {store.uri(INDEX)} names shards outside the folder or not safetensors: {bad}")
        missing = [f for f in files if not store.exists(f)]
        if missing:
            raise SpecError(f"{field}: shards {missing} named by {store.uri(INDEX)} are missing")
    elif store.exists(WEIGHTS):
        files = [WEIGHTS]
    else:
        pickles = [p for p in PICKLES if store.exists(p)]
        if pickles:
            raise SpecError(
                f"{field}: {store.uri()} holds its weights as {pickles[0]}, not safetensors; kdray never loads "
                f"{'a pickle' if pickles[0].startswith('pytorch_model') else 'that format'} (a pickle can run "
                "any code when it is read)",
                hint="Convert the folder once where you trust it: model = AutoModelFor...from_pretrained(folder); "
                "model.save_pretrained(new_folder) writes model.safetensors.",
            )
        raise SpecError(
            f"{field}: no {WEIGHTS} or {INDEX} in {store.uri()}",
            hint="Save the model with `save_pretrained(folder)`: it writes model.safetensors "
            "(or shards with model.safetensors.index.json).",
        )
    preprocessor = _json(store, PREPROCESSOR, field) if store.exists(PREPROCESSOR) else None
    return Folder(store.uri(), store, config, files, preprocessor if isinstance(preprocessor, dict) else None)


# --------------------------------------------------------------------------- a network's inputs


def _size(value: Any) -> list[int] | None:
    """A preprocessor ``size``/``crop_size`` ({height, width}, {shortest_edge}, an int) as [h, w]."""
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return [int(value["height"]), int(value["width"])]
        if "shortest_edge" in value:  # square kdray images: the shortest edge is every edge
            return [int(value["shortest_edge"])] * 2
    return None


def preprocessor_view(pre: dict[str, Any] | None, config: dict[str, Any]) -> dict[str, Any]:
    """What a folder says of its inputs: ``preprocessor_config.json``'s size, crop and mean/std, the config's
    ``num_channels`` (and its ``image_size`` when there is no preprocessor config)."""
    view: dict[str, Any] = {}
    if isinstance(config.get("num_channels"), int):
        view["channels"] = config["num_channels"]
    if not pre:
        if _size(config.get("image_size")):
            view["size"] = _size(config.get("image_size"))
        return view
    if pre.get("do_resize", True) and _size(pre.get("size")):
        view["size"] = _size(pre.get("size"))
    if pre.get("do_center_crop") and _size(pre.get("crop_size")):
        view["crop"] = _size(pre.get("crop_size"))
    if not pre.get("do_normalize", True):
        view["mean"] = view["std"] = None  # the network reads pixels in [0, 1]
    elif pre.get("image_mean") is not None and pre.get("image_std") is not None:
        view["mean"], view["std"] = list(pre["image_mean"]), list(pre["image_std"])
    return view


def network_view(
    override: dict[str, Any] | None,
    folder_view: dict[str, Any],
    data: dict[str, Any],
    source: str = PREPROCESSOR,
) -> dict[str, Any] | None:
    """The view a network reads its inputs through: the folder's, overridden field by field by the spec's
    ``model.inputs``; None when that is the data as it is. ``data`` holds the data's ``mean``, ``std``,
    ``image_size`` and ``in_channels``. Without a mean/std of its own the network keeps the data's
    normalisation; a folder whose preprocessor does not normalise reads pixels in [0, 1] (``mean: None``)."""
    view = {**folder_view, **{k: v for k, v in (override or {}).items() if v is not None}}
    if isinstance(view.get("size"), int):
        view["size"] = [view["size"]] * 2
    if "mean" not in view:
        view["mean"], view["std"] = data["mean"], data["std"]
    if view.get("size") == [data["image_size"]] * 2:
        del view["size"]  # the data's size already: nothing to resize
    if view.get("channels") == data["in_channels"]:
        del view["channels"]
    same_norm = _floats(view["mean"]) == _floats(data["mean"]) and _floats(view["std"]) == _floats(data["std"])
    if not any(view.get(k) for k in ("size", "crop", "channels")) and same_norm:
        return None
    where = f"{source} and model.inputs" if override and folder_view else ("model.inputs" if override else source)
    return {**view, "data_mean": data["mean"], "data_std": data["std"], "source": where}


def _floats(value: Any) -> list[float] | None:
    if value is None:
        return None
    values = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return values[:1] if len(set(values)) == 1 else values  # [0.5, 0.5, 0.5] is the same as 0.5


# --------------------------------------------------------------------------- building


def build_from_folder(
    folder: Folder,
    num_classes: int | None,
    *,
    task: str | None = None,
    classifier: str | None = None,
    trust_remote_code: bool = False,
    weights: bool = True,
    field: str = "model.hf",
    log: Any = None,
) -> nn.Module:
    """The folder's network for ``num_classes`` classes, with its weights unless ``weights=False``.

    The weights are the folder's safetensors files, read through kdray's storage (each file's sha256
    recorded) and loaded by transformers, which maps the checkpoint's tensor names to the network's own
    (transformers 5 renames and fuses some tensors when it loads); every missing, unexpected or mis-shaped
    tensor is an error, as with kdray's checked loader. A head whose label count differs from
    ``num_classes`` is re-initialised, and said through ``log`` (or printed)."""
    spec_field = field.rsplit(".", 1)[0]
    check_remote_code(folder.config, trust_remote_code, folder.uri, spec_field)
    task = task_of(folder.config, task, spec_field)
    if not weights:
        return build_from_config(
            folder.config,
            num_classes,
            task=task,
            classifier=classifier,
            trust_remote_code=trust_remote_code,
            code=folder.code(),
            field=field,
        )
    if task == "causal_lm":
        check_vocab(folder.config, num_classes, field)
    with code_folder(folder.config, folder.code()) as where:
        config, note = make_config(folder.config, num_classes, field, code_path=where, task=task)
    tf = transformers()
    auto = getattr(tf, TASKS[task])
    with folder.local() as path, quiet(tf):
        try:
            model, info = auto.from_pretrained(
                path,
                config=config,
                use_safetensors=True,  # never a pickle
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below, each tensor named: only a new head may differ
                dtype=torch.float32,
            )
        except (OSError, RuntimeError, ValueError) as e:  # unreadable safetensors, a failed name conversion
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointMismatch(
                f"{field}: transformers cannot load the weights of {folder.uri} ({first[:300]})",
                hint="The folder's weights are truncated or do not belong to its config.json: write it again "
                "with save_pretrained.",
            ) from None
    mismatched = sorted(info.get("mismatched_keys") or [])
    head = [m for m in mismatched if note is not None and m[0].startswith(_head_prefix(model))]
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing in file: {', '.join(sorted(info['missing_keys'])[:8])}")
    if info.get("unexpected_keys"):
        problems.append(f"not in model: {', '.join(sorted(info['unexpected_keys'])[:8])}")
    problems += [f"{k}: model {tuple(b)} vs file {tuple(a)}" for k, a, b in mismatched if (k, a, b) not in head]
    problems += [str(e) for e in info.get("error_msgs") or []]
    if problems:
        raise CheckpointMismatch(
            f"weights from {folder.uri} do not fit {type(model).__name__} built from its config.json: "
            + "; ".join(problems[:12]),
            hint="The folder's config.json and weights disagree: write the folder again with save_pretrained.",
        )
    if note:
        message = f"{field} {folder.uri}: {note} ({', '.join(k for k, _, _ in head)})"
        log(message) if log else print(message, flush=True)
    if task == "causal_lm":
        model.register_forward_pre_hook(pad_ids)  # padded token rows (kdray.data.text)
    return adopt(model, classifier, spec_field)


def _head_prefix(model: nn.Module) -> str:
    """The classification head's module path (the last nn.Linear's parent for a Sequential head)."""
    from kdray.models.hooks import find_classifier

    name = find_classifier(model)
    parent = name.rsplit(".", 1)[0] if "." in name else name
    return parent if parent in ("classifier", "score", "head", "fc") else name


@contextlib.contextmanager
def quiet(tf: Any) -> Iterator[None]:
    """transformers' own loading report and progress bars stay off kdray's output (errors are ours)."""
    verbosity = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    try:
        yield
    finally:
        tf.logging.set_verbosity(verbosity)
        tf.logging.enable_progress_bar()


# --------------------------------------------------------------------------- publishing


def write_folder(model: nn.Module, store: Storage, preprocessor: dict[str, Any] | None = None) -> dict[str, str]:
    """Write ``model`` (a transformers network) as a folder ``from_pretrained`` loads: ``config.json``,
    ``model.safetensors`` and, given one, ``preprocessor_config.json``; weights first, config last.
    Returns each file's sha256."""
    from kdray.models.outputs import original_class

    transformers()
    plain: Any = object.__new__(original_class(model))  # the user's class again: save_pretrained as usual
    plain.__dict__.update({k: v for k, v in model.__dict__.items() if k != "kdray_input_view"})
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="kdray-hf-") as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)  # type: ignore[operator]  # transformers
        for path in sorted(Path(tmp).iterdir()):
            files[path.name] = path.read_bytes()
    if preprocessor:
        files[PREPROCESSOR] = json.dumps(preprocessor, indent=2).encode()
    order = sorted(files, key=lambda n: n == CONFIG)  # config.json last: a reader finds weights once it finds it
    for name in order:
        store.write_bytes(name, files[name])
    return {name: sha256(data) for name, data in files.items()}
