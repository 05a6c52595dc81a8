"""Every shipped example validates, follows the naming rule and says how to run it."""

from __future__ import annotations

import re

import pytest
from helpers import REPO

from kdray.engine.spec import load_pipeline

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path):
    spec = load_pipeline(path)
    assert re.match(r"^[a-z0-9]+(_[a-z0-9]+)*\.yaml$", path.name)
    assert f"kdray run examples/{path.name}" in path.read_text(), "the file says how to run it"
    assert spec.storage.uri.startswith("file://"), "examples run locally out of the box"


def header_commands(path) -> list[list[str]]:
    """The ``kdray run examples/...`` commands an example's comment header shows (``\\`` continues a line)."""
    text = "\n".join(line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#"))
    text = text.replace("\\\n", " ")
    return [line.split()[2:] for line in text.splitlines() if line.startswith("kdray run examples/")]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_header_commands_validate_with_their_overrides(path):
    commands = header_commands(path)
    assert commands, "the header shows at least one command"
    for args in commands:
        assert args[0] == f"examples/{path.name}"
        base, changed = load_pipeline(path), load_pipeline(path, overrides=args[1:])
        if args[1:]:
            assert changed != base, f"the overrides {args[1:]} change nothing"


def test_finetune_example_shows_the_ten_percent_variant():
    path = REPO / "examples" / "fmnist_classes0to4_to_classes5to9_finetune.yaml"
    [args] = [c for c in header_commands(path) if len(c) > 1]
    spec = load_pipeline(path, overrides=args[1:])
    stages = {s.name: s for s in spec.stages}
    assert stages["scratch"].data.label_fraction == stages["target"].data.label_fraction == 0.1
    assert stages["source"].data.label_fraction == 1.0, "the source keeps all its labels"
