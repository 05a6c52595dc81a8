"""Every shipped example validates, follows the naming rule and says how to run it."""

from __future__ import annotations

import re

import pytest

from conftest import REPO
from kdray.specs import load_pipeline

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path):
    spec = load_pipeline(path)
    assert re.match(r"^[a-z0-9]+(_[a-z0-9]+)*\.yaml$", path.name)
    assert f"kdray run examples/{path.name}" in path.read_text(), "the file says how to run it"
    assert spec.storage.uri.startswith("file://"), "examples run locally out of the box"
