"""Hugging Face ``transformers`` networks built from a ``config.json`` (a dict), for the task of the data.

``transformers`` is optional (``pip install 'kdray[hf]'``) and imported only here, when a spec asks
for it. The architecture comes from the config and the ``transformers`` Auto class of the task:
``AutoModelForImageClassification`` for images, ``AutoModelForSequenceClassification`` for token
ids. Code shipped with a model folder (a config with ``auto_map``) never runs unless the spec says
``trust_remote_code: true``. Weights are not loaded here (see :mod:`kdray.contracts.hffolder`).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import types
from pathlib import Path
from typing import Any, Iterator

import torch.nn as nn

from kdray.core.errors import SpecError
from kdray.models.inputs import with_inputs
from kdray.models.user import adopt

TASKS = {
    "image_classification": "AutoModelForImageClassification",
    "sequence_classification": "AutoModelForSequenceClassification",
    "causal_lm": "AutoModelForCausalLM",  # next-token logits [N, T, vocab] over a text dataset's token rows
}


def transformers() -> types.ModuleType:
    """The ``transformers`` package, or a SpecError saying how to install it."""
    try:
        import transformers as module
    except ImportError:
        raise SpecError(
            "model.hf / model.hf_config need the transformers package, which is not installed",
            hint="Install kdray's Hugging Face extra: pip install 'kdray[hf]' (with -c constraints.txt for the "
            "tested versions).",
        ) from None
    return module


def task_of(config: dict[str, Any], task: str | None, field: str = "model") -> str:
    """The task to build for: ``task`` if given, else the config's ``architectures``, else the model type's."""
    if task:
        return task
    for arch in config.get("architectures") or []:
        if str(arch).endswith("ForCausalLM") or str(arch) == "GPT2LMHeadModel":
            return "causal_lm"
        if str(arch).endswith("ForSequenceClassification"):
            return "sequence_classification"
        if str(arch).endswith("ForImageClassification"):
            return "image_classification"
    from transformers.models.auto import modeling_auto as auto

    model_type = config.get("model_type")
    image = model_type in auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    text = model_type in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    if image != text:
        return "image_classification" if image else "sequence_classification"
    raise SpecError(
        f"{field}: cannot tell whether model_type {model_type!r} classifies images or token sequences",
        hint=f"Set {field}.task to image_classification, sequence_classification or causal_lm.",
    )


@contextlib.contextmanager
def code_folder(config: dict[str, Any], code: dict[str, str]) -> Iterator[str | None]:
    """A temporary folder with ``config.json`` and a model's own Python files, for transformers to import
    them (``trust_remote_code``); None when the model has no code of its own."""
    if not code:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="kdray-hf-code-") as tmp:
        Path(tmp, "config.json").write_text(json.dumps(config))
        for name, source in code.items():
            Path(tmp, name).write_text(source)
        yield tmp


def make_config(
    config: dict[str, Any],
    num_classes: int | None,
    field: str = "model",
    code_path: str | None = None,
    task: str | None = None,
) -> tuple[Any, str | None]:
    """A transformers config from its dict (or, with ``code_path``, the folder's own config class), with
    ``num_labels`` set to ``num_classes``; and a note when that changed the folder's label count (the
    classification head is then new). For ``causal_lm`` the classes are the vocabulary: ``vocab_size``."""
    tf = transformers()
    fit = (lambda cfg, n: _vocab(cfg, n, field)) if task == "causal_lm" else _labels
    if code_path is not None:  # trust_remote_code was checked: the folder's own config class
        return fit(tf.AutoConfig.from_pretrained(code_path, trust_remote_code=True), num_classes)
    doc = dict(config)
    model_type = doc.pop("model_type", None)
    if not model_type:
        raise SpecError(
            f"{field}: the config has no model_type",
            hint="A transformers config.json names its model_type (vit, resnet, bert, ...).",
        )
    if model_type not in tf.CONFIG_MAPPING:
        raise SpecError(
            f"{field}: transformers {tf.__version__} has no model_type {model_type!r}",
            hint="Use a model type this transformers version knows, or set trust_remote_code: true for a folder "
            "that ships its own code.",
        )
    for key in ("transformers_version", "architectures"):
        doc.pop(key, None)
    return fit(tf.CONFIG_MAPPING[model_type].from_dict(doc), num_classes)


def _vocab(cfg: Any, vocab: int | None, field: str) -> tuple[Any, str | None]:
    """A fresh causal LM's config for a text dataset of ``vocab`` ids: its ``vocab_size`` set."""
    if vocab and getattr(cfg, "vocab_size", vocab) != vocab:
        cfg.vocab_size = vocab
    return cfg, None


def check_vocab(config: dict[str, Any], vocab: int | None, field: str) -> None:
    """A causal LM folder's trained embeddings fix its vocabulary: it must be the text dataset's."""
    size = config.get("vocab_size")
    if vocab and isinstance(size, int) and size != vocab:
        raise SpecError(
            f"{field}: the model's vocabulary has {size} ids but the data's tokenizer {vocab}",
            hint="Import the corpus with the model's own tokenizer (kdray data import SRC DEST --as text "
            "--tokenizer FOLDER/tokenizer.json).",
        )


def pad_ids(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A causal LM's forward pre-hook: token ids as int64, padding (``-1``) read as id 0 (kdray.data.text)."""
    if args and hasattr(args[0], "clamp") and not args[0].is_floating_point():
        return (args[0].long().clamp(min=0), *args[1:])
    return args


def _labels(cfg: Any, num_classes: int | None) -> tuple[Any, str | None]:
    note = None
    if num_classes and cfg.num_labels != num_classes:
        note = (
            f"the folder's classification head has {cfg.num_labels} labels and the data {num_classes} classes: "
            f"the head is re-initialised for {num_classes} classes"
        )
        cfg.id2label = {i: f"LABEL_{i}" for i in range(num_classes)}
        cfg.label2id = {v: k for k, v in cfg.id2label.items()}
        cfg.num_labels = num_classes
    return cfg, note


def check_remote_code(config: dict[str, Any], trust_remote_code: bool, where: str, field: str = "model") -> None:
    if config.get("auto_map") and not trust_remote_code:
        raise SpecError(
            f"{field}: {where} ships its own model code (config.json auto_map: {sorted(config['auto_map'])}); "
            "kdray never runs code from a model folder unless told to",
            hint=f"Read the folder's Python files, then set {field}.trust_remote_code: true if you trust them.",
        )


def build_transformers(config: Any, task: str, *, trust_remote_code: bool = False, field: str = "model") -> nn.Module:
    """A freshly initialised transformers model for ``task`` from a config object."""
    tf = transformers()
    auto = getattr(tf, TASKS[task])
    try:
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
        if task == "causal_lm":
            model.register_forward_pre_hook(pad_ids)
        return model
    except ValueError as e:  # a model type without a class for this task
        raise SpecError(
            f"{field}: transformers has no {task.replace('_', ' ')} model for {type(config).__name__} ({e})",
            hint=f"Set {field}.task to the other task, or use a model type that has one.",
        ) from None


def build_from_config(
    config: dict[str, Any],
    num_classes: int | None,
    *,
    task: str | None = None,
    classifier: str | None = None,
    trust_remote_code: bool = False,
    code: dict[str, str] | None = None,
    field: str = "model.hf_config",
) -> nn.Module:
    """A freshly initialised transformers network from a config dict (``model.hf_config``, or a manifest's);
    ``code``: the model's own Python files (name -> source), for a config with ``auto_map``."""
    spec_field = field.rsplit(".", 1)[0]
    check_remote_code(config, trust_remote_code, "the config", spec_field)
    if config.get("auto_map") and not code:
        raise SpecError(
            f"{field}: the config names its own model code (auto_map) but the code is not at hand",
            hint="Use model.hf with the folder that holds the code (its .py files beside config.json).",
        )
    task = task_of(config, task, spec_field)
    with code_folder(config, code or {}) as where:
        cfg, _ = make_config(config, num_classes, field, code_path=where, task=task)
        model = build_transformers(cfg, task, trust_remote_code=trust_remote_code, field=field)
    return adopt(model, classifier, spec_field)


def transformers_task(model: nn.Module) -> str:
    """The task a built transformers network does (its class: ...ForSequenceClassification or not)."""
    from kdray.models.outputs import original_class

    name = original_class(model).__name__
    if name.endswith("ForCausalLM") or name == "GPT2LMHeadModel":
        return "causal_lm"
    return "sequence_classification" if name.endswith("ForSequenceClassification") else "image_classification"


def check_positions(model: nn.Module, length: int | None, field: str = "model") -> None:
    """A causal LM must read a whole row of the text dataset: its positions against the rows' ``length``."""
    if not length or transformers_task(model) != "causal_lm":
        return
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if isinstance(n, int) and n < length:
        raise SpecError(
            f"{field}: the model reads at most {n} positions but the data's rows hold {length} tokens",
            hint=f"Give it {length} positions or more (n_positions, or max_position_embeddings, in {field}.hf_config), "
            f"or import the corpus with --seq-len {n} or less.",
        )


def model_config(model: nn.Module) -> dict[str, Any]:
    """A transformers network's config as a JSON dict (what a manifest records to rebuild it)."""
    return json.loads(model.config.to_json_string(use_diff=False))  # type: ignore[union-attr,operator]  # torch: Module.__getattr__


def from_record(record: dict[str, Any]) -> nn.Module:
    """Rebuild a transformers network a manifest records (its config; weights come from the artifact)."""
    hf = record["hf"]
    model = build_from_config(
        hf["config"],
        record["kwargs"].get("num_classes"),
        task=hf.get("task"),
        classifier=record.get("classifier"),
        trust_remote_code=bool(hf.get("trust_remote_code")),
        code=hf.get("code"),
        field="model",
    )
    return with_inputs(model, record["kwargs"].get("inputs"))
