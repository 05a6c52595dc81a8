"""One registry mechanism for every pluggable kind, and one way to check an entry's parameters.

    MODELS = Registry("model", group="kdray.models")

    @MODELS.register("cnn_small")
    def cnn_small(num_classes: int = 10, dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0): ...

    MODELS.get("cnn_smal")  # KdrayError: unknown model 'cnn_smal'; did you mean 'cnn_small'? ...

Parameters are declared once, as annotated keyword arguments of the registered function or class
(``Annotated[float, Field(gt=0)]``, ``Literal[...]``). :func:`params_model` turns that signature
into a pydantic model; an :class:`Entry` (``{name: <registered>, <param>: <value>, ...}`` in a
spec) is validated by it once, when the spec is loaded, and then handed on as the typed object.
A target may add rules that tie parameters together in a classmethod ``validate_params(params)``.

A registry may name built-in entries by the module that registers them (``builtins={"ray":
"kdray.engine.launchers.ray"}``): the name is known (listed, accepted by a spec) at once, and the
module is imported the first time the entry is used, as an entry point's is. A lower layer can so
declare a table whose entries live in a higher one without importing it.

Third-party packages add entries through Python entry points, in the registry's ``group``
(``kdray.models``, ``kdray.datasets``, ``kdray.losses``, ``kdray.shifts``, ``kdray.adapt_methods``,
``kdray.transfer_strategies``, ``kdray.stage_kinds``): each entry point names an object that is
registered under the entry point's name (or a module whose import registers its entries itself).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import typing
from importlib import metadata
from typing import Any, Callable, ClassVar, Generic, Iterator, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, create_model, field_validator, model_validator

from kdray.core.errors import KdrayError, SpecError
from kdray.core.spec import Spec

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
    """A name -> builder table with metadata, where each entry came from, and helpful errors."""

    def __init__(self, kind: str, group: str | None = None, builtins: Mapping[str, str] | None = None):
        self.kind = kind
        self.group = group  # the entry-point group third-party packages register in
        self._lazy = dict(builtins or {})  # name -> the module whose import registers it
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._origin: dict[str, str] = {}
        self._plugins_loaded = group is None

    def register(self, name: str | None = None, **meta: Any) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name`` (default: its ``__name__``)."""

        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__")  # noqa: B009  (T is any object with a name)
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            self._meta[key] = dict(meta)
            self._origin.setdefault(key, getattr(obj, "__module__", "?"))
            return obj

        return deco

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that define a toy entry clean up with this)."""
        for table in (self._items, self._meta, self._origin):
            table.pop(name, None)

    def load_plugins(self) -> None:
        """Register the entries that installed packages declare in this registry's entry-point group."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in metadata.entry_points(group=self.group or ""):
            try:
                obj = ep.load()
            except Exception as e:  # a broken plug-in names itself instead of breaking every command
                raise KdrayError(
                    f"the {self.kind} plug-in {ep.name!r} ({ep.value}, entry point group "
                    f"{self.group}) failed to import: {type(e).__name__}: {e}",
                    hint="Fix or uninstall the package that declares it.",
                ) from None
            if inspect.ismodule(obj):
                continue  # importing the module registered its entries
            if ep.name not in self._items:
                self.register(ep.name)(obj)
                self._origin[ep.name] = f"{ep.dist.name if ep.dist else '?'} (entry point {ep.value})"

    def get(self, name: str) -> T:
        self.load_plugins()
        if name not in self._items and name in self._lazy:
            importlib.import_module(self._lazy[name])  # registers it
        try:
            return self._items[name]
        except KeyError:
            raise KdrayError(f"unknown {self.kind} {name!r}; {did_you_mean(name, self.names())}") from None

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def origin(self, name: str) -> str:
        """Where an entry comes from: its module, or the distribution and entry point of a plug-in."""
        self.get(name)
        return self._origin[name]

    def build(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call the registered builder: ``MODELS.build("mlp_512", num_classes=10)``."""
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted({*self._items, *self._lazy})

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return name in self._items or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


# --------------------------------------------------------------------------- parameters


@functools.cache
def params_model(target: Callable, skip: tuple[str, ...] = ()) -> type[BaseModel]:
    """A pydantic model (``extra="forbid"``) built from ``target``'s keyword parameters.

    ``target`` is a class (its ``__init__`` is read) or a function; parameters named in ``skip``
    (e.g. ``model``, ``num_classes``) and ``*args/**kwargs`` are left out. Annotations may carry
    pydantic constraints (``Annotated[float, Field(ge=0)]``), so ranges live in the signature.
    """
    fn = target.__init__ if inspect.isclass(target) else target  # type: ignore[misc]
    hints = typing.get_type_hints(fn, include_extras=True)
    fields: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.name == "self" or p.name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (hints.get(p.name, Any), default)
    return create_model(f"{getattr(target, '__name__', 'target')}Params", __base__=Params, **fields)


class Params(Spec):
    """The parameters of a registered target (``params_model``): the rules of every spec, and any
    annotated type (a parameter may take an object, e.g. a tensor, when called from code)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)


def _loc(loc: tuple) -> str:
    """('classes', 0) -> 'classes[0]'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def check_params(
    kind: str, name: str, target: Callable, params: Mapping[str, Any], skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Validate ``params`` against ``target``'s signature; return them coerced, defaults filled in.

    Raises:
        SpecError: naming the unknown parameter (with close matches and the valid ones) or the
            parameter whose value is out of range, e.g. ``shift 'rotation': parameter 'degrees'
            = 200 is invalid: Input should be less than or equal to 180.``
    """
    model = params_model(target, tuple(skip))
    valid = list(model.model_fields)
    signature = ", ".join(f"{k}={f.default!r}" if not f.is_required() else k for k, f in model.model_fields.items())
    try:
        checked = model.model_validate(dict(params)).model_dump()
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = _loc(err["loc"])
            if err["type"] == "extra_forbidden":
                known = did_you_mean(where, valid) if valid else "it takes no parameters"
                problems.append(f"{kind} {name!r} has no parameter {where!r}; {known}")
            elif err["type"] == "missing":
                problems.append(f"{kind} {name!r} needs parameter {where!r}")
            else:
                value = err.get("input")
                reason = err["msg"].removeprefix("Value error, ")
                problems.append(f"{kind} {name!r}: parameter {where!r} = {value!r} is invalid: {reason}")
        raise SpecError(
            "; ".join(p.rstrip(".") for p in problems) + ".",
            hint=f"Parameters of {kind} {name!r}: {signature or '(none)'}.",
        ) from None
    rules = getattr(target, "validate_params", None)
    if callable(rules):
        try:
            rules(checked)
        except (ValueError, TypeError) as e:
            raise SpecError(f"{kind} {name!r}: {e}", hint=f"Parameters of {kind} {name!r}: {signature}.") from None
    return checked


class Entry(BaseModel):
    """A spec entry ``{name: <registered>, <param>: <value>, ...}`` with params checked by signature.

    ``extra="allow"`` only lets the parameters sit beside ``name`` in YAML; every one of them is
    still checked against the registered target's signature, so unknown keys are rejected as
    strictly as with ``extra="forbid"``, and with a better message.

    Subclasses set ``entry_kind``, ``entry_registry`` and ``entry_skip`` (parameters the caller
    supplies, not the spec). Validation errors are raised as ``ValueError`` so pydantic reports
    them at the entry's path in the whole spec (``stages[2].target_domain.shifts[0]``). After
    validation the extras hold the coerced parameters with defaults filled in, so two spellings
    of the same entry dump (and hash) alike.
    """

    model_config = ConfigDict(extra="allow")

    entry_kind: ClassVar[str] = "entry"
    entry_registry: ClassVar[Registry]
    entry_skip: ClassVar[tuple[str, ...]] = ()

    name: str

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        registry = cls.entry_registry
        if v not in registry:
            raise ValueError(f"unknown {registry.kind} {v!r}; {did_you_mean(v, registry.names())}")
        return v

    @model_validator(mode="after")
    def _check_params(self) -> "Entry":
        try:
            target = self.entry_registry.get(self.name)
            params = check_params(self.entry_kind, self.name, target, self.__pydantic_extra__ or {}, self.entry_skip)
        except KdrayError as e:
            raise ValueError(str(e)) from None
        self.__pydantic_extra__ = params
        return self

    @property
    def params(self) -> dict[str, Any]:
        """The parameters (everything but ``name`` and declared fields), coerced and with defaults."""
        return dict(self.__pydantic_extra__ or {})

    def build(self, *args: Any, **supplied: Any) -> Any:
        """The registered target called with the checked parameters (plus what the caller supplies)."""
        return self.entry_registry.get(self.name)(*args, **supplied, **self.params)
