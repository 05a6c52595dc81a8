"""Models from user code: any importable factory or ``nn.Module`` class, adopted into kdray's contract.

A spec names it as ``model: {import: "my_pkg.nets:resnet50", options: {...}}``. The module does
not have to follow kdray's model contract: :func:`adopt` finds its classifier (``classifier:``, or
else the last ``nn.Linear``), gives it an ``embed`` that reads the classifier's input with a hook,
and sets ``classifier_name``/``feature_layers``/``family`` as instance attributes, so its state-dict
keys stay exactly those of the user's class. A forward that returns a Hugging Face ``ModelOutput``, a
dict with ``logits`` or a tuple whose first item is the logits is made to return the logits tensor
(:mod:`kdray.models.outputs`), so every stage, the teacher cache, ``inspect``, latency and the
exporters see logits.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import types
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from kdray.core.errors import SpecError
from kdray.models.hooks import find_classifier
from kdray.models.outputs import block_layers, is_transformers_model, logits_only

# Keywords kdray supplies from the data (passed only when the factory's signature takes them).
SUPPLIED = ("num_classes", "in_channels", "image_size")


def load_file(path: str, field: str) -> types.ModuleType:
    """A Python file as a module (``"nets/teacher.py:Net"``); a relative path is taken from the working folder
    (a spec's relative paths were already made relative to it, from the spec's folder: kdray.engine.specpaths)."""
    file = Path(path).resolve()
    if not file.is_file():
        raise SpecError(
            f"{field}: no file {path} (looked for {file})",
            hint="A relative path in a spec is taken from the spec file's folder (on the command line, from the "
            "shell's); or install the module and name it 'package.module:factory'.",
        )
    name = f"kdray_user_{file.stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise SpecError(f"{field}: {path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def import_target(path: str, field: str = "model.import") -> Callable[..., Any]:
    """``"pkg.mod:attr"``, ``"pkg.mod.attr"`` or ``"path/to/file.py:attr"`` -> the object, or a SpecError naming ``field``."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise SpecError(
            f"{field}: {path!r} is not an import path",
            hint="Write it as 'package.module:factory' (a function returning an nn.Module, or an nn.Module class).",
        )
    try:
        obj: Any = (
            load_file(module_name, field) if module_name.endswith(".py") else importlib.import_module(module_name)
        )
    except ImportError as e:
        raise SpecError(
            f"{field}: cannot import module {module_name!r} of {path!r} ({type(e).__name__}: {e})",
            hint="Install the package that holds it, or put its folder on PYTHONPATH (on a cluster: in the image, "
            "or through Ray's runtime_env py_modules/working_dir, see docs/models.md).",
        ) from None
    except Exception as e:  # the user's module raised while importing
        raise SpecError(f"{field}: importing {module_name!r} raised {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_"))[:20]
            raise SpecError(
                f"{field}: {module_name!r} has no attribute {attr!r}",
                hint=f"Names it defines: {', '.join(public) or '(none)'}.",
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecError(f"{field}: {path!r} is a {type(obj).__name__}, not a factory or an nn.Module class")
    return obj


def accepted(target: Callable[..., Any], supplied: dict[str, Any]) -> dict[str, Any]:
    """The supplied keywords (``num_classes``, ...) that ``target``'s signature takes."""
    fn = target.__init__ if inspect.isclass(target) else target  # type: ignore[misc]
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(supplied)
    return {k: v for k, v in supplied.items() if k in params}


def adopt(model: nn.Module, classifier: str | None = None, where: str = "model") -> nn.Module:
    """Give an arbitrary module kdray's contract (classifier, embed, feature layers), in place."""
    if isinstance(getattr(model, "classifier_name", None), str) and callable(getattr(model, "embed", None)):
        if classifier is None or classifier == model.classifier_name:
            return model  # a kdray-style model already
    head = find_classifier(model, classifier, where)
    # The one place a zoo model's ModelOutput / dict / tuple becomes its logits tensor; the subclass also
    # brings ``embed`` (a hook on the classifier named by ``classifier_name``).
    logits_only(model)
    object.__setattr__(model, "classifier_name", head)
    if not getattr(model, "feature_layers", None):
        # A transformers model's children are one backbone returning a ModelOutput: its blocks are the layers.
        blocks = block_layers(model) if is_transformers_model(model) else ()
        children = tuple(n for n, _ in model.named_children() if n != head)
        object.__setattr__(model, "feature_layers", blocks or children)
    if getattr(model, "family", "unknown") == "unknown":
        object.__setattr__(model, "family", "transformers" if is_transformers_model(model) else "user")
    return model


def build_user_model(
    path: str, kwargs: dict[str, Any], classifier: str | None = None, field: str = "model"
) -> nn.Module:
    """Call the factory (or class) at ``path`` with ``kwargs`` (supplied keywords it does not take are dropped)."""
    target = import_target(path, f"{field}.import")
    supplied = {k: v for k, v in kwargs.items() if k in SUPPLIED}
    options = {k: v for k, v in kwargs.items() if k not in SUPPLIED}
    call = {**accepted(target, supplied), **options}
    try:
        model = target(**call)
    except Exception as e:  # the user's code: say which factory and what it raised
        raise SpecError(
            f"{field}.import: {path}({', '.join(f'{k}={v!r}' for k, v in call.items())}) "
            f"raised {type(e).__name__}: {e}",
            hint=f"Fix the factory or the options under {field}.options.",
        ) from None
    if not isinstance(model, nn.Module):
        raise SpecError(f"{field}.import: {path} returned a {type(model).__name__}, not a torch.nn.Module")
    return adopt(model, classifier, where=f"{field} {path}")
