"""YAML for specs, read strictly: what a hostile or careless file can do is bounded and named.

``load_yaml(text, source)`` is ``yaml.safe_load`` plus: the text must be UTF-8 (at most
``MAX_BYTES``); a mapping may not repeat a key; only plain YAML types are built (strings,
numbers, booleans, null, lists, mappings: no ``!!binary``, ``!!set``, ``!!timestamp`` or other
tags, and dates stay strings); nesting is at most ``MAX_DEPTH`` deep; at most ``MAX_ALIASES``
aliases, and the document expanded (aliases counted each time they are used) at most
``MAX_NODES`` values, which stops alias bombs before anything allocates them. Every refusal is a
``SpecError`` naming the file and, where it has one, the line.
"""

from __future__ import annotations

from typing import Any

import yaml

from kdray.core.errors import SpecError

MAX_BYTES = 4 * 1024**2
MAX_DEPTH = 50
MAX_ALIASES = 100
MAX_NODES = 200_000

PLAIN_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:map",
}


class _Refused(Exception):
    def __init__(self, message: str, node: Any = None):
        super().__init__(message)
        self.mark = getattr(node, "start_mark", None)


class StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys, non-plain tags, deep nesting and alias bombs."""

    def __init__(self, stream: Any):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _Refused(f"more than {MAX_ALIASES} aliases (*name)", self.peek_event())
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nesting deeper than {MAX_DEPTH} levels", self.peek_event())
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        if node.tag not in PLAIN_TAGS:
            raise _Refused(f"the tag {node.tag!r} is not allowed (only plain YAML values)", node)
        return super().construct_object(node, deep=deep)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if duplicate:
                    raise _Refused(f"the key {key!r} appears twice in one mapping", key_node)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


# Dates and times stay strings: a spec has no timestamp fields, and `2024-01-01` as a name is text.
StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _expanded_size(node: Any, budget: int) -> int:
    """How many nodes the document has with every alias expanded, counting no further than ``budget``."""
    count, stack = 0, [node]
    while stack and count <= budget:
        n = stack.pop()
        count += 1
        if isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                stack += [k, v]
    return count


def load_yaml(text: bytes | str, source: str) -> Any:
    """The YAML document in ``text``, read strictly (see the module docstring)."""
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise SpecError(f"{source} is {len(text):,} bytes; a spec is at most {MAX_BYTES:,}")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SpecError(
                f"{source} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})",
                hint="Save the spec as UTF-8 (a YAML file); a binary or Latin-1 file cannot be read.",
            ) from None
    loader = None
    try:
        loader = StrictLoader(text)  # its reader refuses control characters already
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_NODES) > MAX_NODES:
            raise _Refused(f"it expands to more than {MAX_NODES:,} values (aliases used too often)", node)
        return loader.construct_document(node)
    except _Refused as e:
        where = f" at line {e.mark.line + 1}, column {e.mark.column + 1}" if e.mark else ""
        raise SpecError(
            f"{source}: refused{where}: {e}",
            hint="Write the spec as plain YAML: each key once, values without tags, no deep nesting or alias chains.",
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(
            f"{source}: YAML syntax error{where}: {problem}",
            hint="Check indentation and that every 'key: value' has a space after the colon.",
        ) from None
    except RecursionError:
        raise SpecError(f"{source}: the YAML is nested too deeply to read") from None
    finally:
        if loader is not None:
            loader.dispose()
