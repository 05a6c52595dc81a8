"""Every spec model in kdray stands on one base, ``kdray.core.spec.Spec``: the same rules everywhere
(unknown fields, .inf/.nan, booleans for numbers). ``Entry`` (``{name: ..., <params>}``) is the one
exception: its parameters sit beside ``name`` and are checked against the registered signature."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from pydantic import BaseModel

import kdray
from kdray.core.registry import Entry
from kdray.core.spec import Spec
from kdray.transfer.mapping.specs import TransferSpec


def _kdray_models() -> list[type[BaseModel]]:
    for info in pkgutil.walk_packages(kdray.__path__, "kdray."):
        importlib.import_module(info.name)
    seen, todo = [], [BaseModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("kdray.") and sub not in seen:
                seen.append(sub)
    return seen


def test_every_spec_model_uses_the_spec_base():
    models = _kdray_models()
    assert len(models) > 30, "the walk found kdray's spec models"
    strays = [f"{m.__module__}.{m.__qualname__}" for m in models if not issubclass(m, (Spec, Entry))]
    assert strays == [], f"spec models not built on kdray.core.spec.Spec: {strays}"


@pytest.mark.parametrize(
    "doc, words",
    [
        ({"l2sp": {"alpha": float("inf")}}, "finite"),
        ({"l2sp": {"alpha": True}}, "expected a number"),
        ({"mapping": [{"match": "name", "oops": 1}]}, "Extra inputs"),
    ],
)
def test_the_transfer_block_follows_the_same_rules(doc, words):
    with pytest.raises(ValueError, match=words):
        TransferSpec.model_validate(doc)
