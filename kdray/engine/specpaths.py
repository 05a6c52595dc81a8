"""Relative paths in a spec are taken from the spec file's folder, as compose and kustomize users expect.

``kdray run other/dir/spec.yaml`` reads ``data: {path: ./shards}`` from ``other/dir/shards``, and
``model: {import: nets.py:Net}`` from ``other/dir/nets.py``. The fields are the file paths of a stage:
``path`` (a dataset's files), ``import`` when it names a ``.py`` file, and ``weights``. URIs
(``file://``, ``s3://``), absolute paths and artifact references are taken as they are, and so is
``storage.uri`` (``file://./runs`` stays in the shell's folder). A path that does not exist from the
spec's folder but does from the shell's is read from there (specs written before this rule).

The values are rewritten before validation (a ``model.import`` file is imported while the spec is
validated) to the form the rest of kdray opens from the shell's folder: relative to it when the file is
under it, else absolute. Stage keys hash the values as written: the rewritten fields and their
original text are carried beside the stages (``PipelineSpec.written``, never part of a key), so a
spec's keys do not depend on the folder it is run from, and are what they were before this rule.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PATH_FIELDS = ("path", "import", "weights")


def resolve_paths(doc: dict[str, Any], base: Path) -> dict[str, dict[str, tuple[str, str]]]:
    """Rewrite the relative file paths in ``doc['stages']`` (a raw YAML document) against ``base``,
    in place; returns ``{stage name: {dotted field: (value as written, value now)}}`` for the ones rewritten."""
    cwd = Path.cwd().resolve()
    base = base.resolve()
    written: dict[str, dict[str, tuple[str, str]]] = {}
    if base == cwd or not isinstance(doc.get("stages"), list):
        return written
    for stage in doc["stages"]:
        if isinstance(stage, dict) and isinstance(stage.get("name"), str):
            changed = _walk(stage, "", base, cwd)
            if changed:
                written[stage["name"]] = changed
    return written


def _walk(node: Any, prefix: str, base: Path, cwd: Path) -> dict[str, tuple[str, str]]:
    changed: dict[str, tuple[str, str]] = {}
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in list(items):
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (dict, list)):
            changed |= _walk(value, dotted, base, cwd)
        elif isinstance(value, str) and key in PATH_FIELDS:
            new = _resolve(value, key, base, cwd)
            if new != value:
                node[key] = new
                changed[dotted] = (value, new)
    return changed


def _resolve(value: str, field: str, base: Path, cwd: Path) -> str:
    if field == "import":
        module, sep, attr = value.partition(":")
        if not sep or not module.endswith(".py"):
            return value  # an installed module ("pkg.mod:factory"), not a file
        return f"{_resolve_file(module, base, cwd)}:{attr}"
    return _resolve_file(value, base, cwd)


def _resolve_file(path: str, base: Path, cwd: Path) -> str:
    if not path or "://" in path or os.path.isabs(path) or path.startswith("~"):
        return path
    here = base / path
    if not here.exists() and (cwd / path).exists():
        return path  # found from the shell's folder only: a spec written before paths were spec-relative
    full = Path(os.path.normpath(here))
    try:
        return full.relative_to(cwd).as_posix() or "."
    except ValueError:
        return str(full)


def still_resolved(doc: dict[str, Any], resolved: dict[str, dict[str, tuple[str, str]]]) -> dict[str, dict[str, str]]:
    """``{stage name: {dotted field: value as written}}`` of the rewritten fields that the command line's
    overrides left alone (an override's path is the override's, relative to the shell, as typed)."""
    stages = {s.get("name"): s for s in doc.get("stages") or [] if isinstance(s, dict)}
    out: dict[str, dict[str, str]] = {}
    for name, fields in resolved.items():
        for dotted, (original, new) in fields.items():
            if _get(stages.get(name), dotted) == new:
                out.setdefault(name, {})[dotted] = original
    return out


def _get(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.get(part)
        else:
            return None
    return node


def as_written(dump: dict[str, Any], written: dict[str, str]) -> dict[str, Any]:
    """A stage's dumped spec with its rewritten paths put back as written (what its key hashes)."""
    for dotted, original in written.items():
        node: Any = dump
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.get(part)
            if node is None:
                break
        else:
            if isinstance(node, list):
                node[int(last)] = original
            elif isinstance(node, dict) and last in node:
                node[last] = original
    return dump
