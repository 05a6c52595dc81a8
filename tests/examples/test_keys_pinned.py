"""Every example's stage keys are pinned: a key names a stage's artifacts and caches in a user's
storage, so a change of the code (a refactor, a new field with a default) must not change one.

``pinned_keys.json`` (beside this file) holds every example's ``kdray plan`` keys as first computed (before the
merges of the lineage, Hugging Face and CLI work, checked against that commit). A new example is
added to the file by hand, once; an existing entry changes only with a migration note in the
changelog, because every user's cached artifacts of that spec would be orphaned.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO

from kdray.engine.pipeline import plan
from kdray.engine.spec import load_pipeline

ROOT = REPO
PINNED = json.loads(Path(__file__).with_name("pinned_keys.json").read_text())
EXAMPLES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples").glob("*.yaml"))


def test_every_example_is_pinned():
    assert sorted(PINNED) == EXAMPLES, (
        "add the new example's `kdray plan --json` keys to tests/examples/pinned_keys.json"
    )


@pytest.mark.parametrize("example", EXAMPLES)
def test_an_examples_keys_do_not_change(example, monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples' comments run them from the repository root
    assert plan(load_pipeline(str(ROOT / example))) == PINNED[example]
