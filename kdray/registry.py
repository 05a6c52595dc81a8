"""One generic registry for every kind of pluggable thing (models, losses, methods, datasets...).

    MODELS = Registry("model")

    @MODELS.register("cnn_small")
    def cnn_small(num_classes: int = 10, **kw): ...

    MODELS.get("cnn_smal")  # KdrayError: unknown model 'cnn_smal'; did you mean 'cnn_small'? ...
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

from kdray.errors import KdrayError

T = TypeVar("T")


def close_matches(name: str, choices: list[str], n: int = 3) -> list[str]:
    """Names in ``choices`` that look like ``name`` (typos, a wrong size suffix)."""
    hits = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    hits += [c for c in choices if c not in hits and (name in c or c in name)]
    return hits[:n]


def did_you_mean(name: str, choices: list[str]) -> str:
    """'did you mean 'a' or 'b'? ' (or '') followed by the full list of valid names."""
    hits = close_matches(name, choices)
    maybe = f"did you mean {' or '.join(repr(h) for h in hits)}? " if hits else ""
    return f"{maybe}Known: {', '.join(sorted(choices)) or '(none)'}."


class Registry(Generic[T]):
    """A name -> builder table with metadata and helpful errors for unknown names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str | None = None, **meta: Any) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name`` (default: its ``__name__``)."""

        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            self._meta[key] = dict(meta)
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KdrayError(f"unknown {self.kind} {name!r}; {did_you_mean(name, self.names())}") from None

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def build(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call the registered builder: ``MODELS.build("mlp_512", num_classes=10)``."""
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
