"""Domain shifts: deterministic, parametrised transforms that turn a source image set into a target.

A shift maps a whole labelled image set to another one::

    x_t, y_t = SHIFTS.build("rotation", degrees=30)(x, y, seed=0)   # x: [N, C, H, W] in [0, 1]

Every shift works on pixel scale, BEFORE normalisation (``x`` float in [0, 1]), and is a pure
function of ``(x, y, seed)``: the same spec and seed give the same target data on every run, so
the shifted set can be cached under :func:`shift_hash`. Shifts may drop rows (``class_subset``),
which is why they take and return the labels.

In a pipeline spec a shift is one mapping with its name and its parameters side by side::

    target_domain:
      shifts:
        - {name: rotation, degrees: 30}
        - {name: gaussian_noise, sigma: 0.1}
        - {name: class_subset, classes: [0, 1, 2]}

:class:`ShiftSpec` validates such an entry against the shift's constructor signature (unknown
parameters and out-of-range values are named in the error), and :func:`compose` chains a list of
them into one ``(x, y, seed) -> (x, y)`` function.

Parameters are declared once, as annotated keyword arguments of each shift's ``__init__``
(``Annotated[float, Field(ge=0)]``); :func:`check_params` turns that signature into a pydantic
model, so spec validation, :func:`build_shift` and the error messages all come from one place.
Build shifts through :func:`build_shift` or :class:`ShiftSpec`; calling a class directly skips
the checks, like any Python constructor.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Callable, ClassVar, Iterable, Mapping

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field, ValidationError, ValidationInfo, model_validator

from kdray.core.errors import DataError, KdrayError, SpecError
from kdray.core.registry import Entry, Registry, check_params, params_model

SHIFTS: Registry = Registry("shift", group="kdray.shifts")

# Bump when a shift's output for the same parameters changes, so cached shifted data is rebuilt.
SHIFTS_VERSION = 1

ShiftFn = Callable[[torch.Tensor, "torch.Tensor | None", int], "tuple[torch.Tensor, torch.Tensor | None]"]


# --------------------------------------------------------------------------------------------
# The shifts.
# --------------------------------------------------------------------------------------------

NonNegative = Annotated[float, Field(ge=0)]
Unit = Annotated[float, Field(ge=0, le=1)]
Degrees = Annotated[float, Field(ge=-180, le=180)]


def _sorted_unique(classes: list[int]) -> list[int]:
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must not repeat, got {classes}")
    return sorted(classes)


ClassList = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1), AfterValidator(_sorted_unique)]


def check_images(x: torch.Tensor, y: torch.Tensor | None, what: str = "shift input") -> None:
    """``x`` must be float ``[N, C, H, W]`` on pixel scale [0, 1]; ``y`` (if any) ``[N]``."""
    if x.ndim != 4 or not x.is_floating_point():
        raise DataError(
            f"{what}: expected float images [N, C, H, W], got dtype {x.dtype} shape {tuple(x.shape)}.",
            hint="Convert to float in [0, 1] (e.g. uint8 / 255) before applying shifts.",
        )
    if y is not None and tuple(y.shape) != (x.shape[0],):
        raise DataError(
            f"{what}: labels have shape {tuple(y.shape)} but images have {x.shape[0]} rows "
            f"(shape {tuple(x.shape)}); expected labels of shape ({x.shape[0]},)."
        )
    if x.numel() and (x.min() < -1e-6 or x.max() > 1 + 1e-6):
        raise DataError(
            f"{what}: pixel values span [{x.min().item():.3g}, {x.max().item():.3g}] but shifts work "
            f"on pixel scale [0, 1].",
            hint="Apply shifts before normalising (mean/std) the images.",
        )


class Shift:
    """Base class: a deterministic transform of a whole labelled image set.

    Subclasses store each constructor parameter under its own name (so :attr:`params` can read it
    back) and implement :meth:`apply`.
    """

    name: ClassVar[str] = ""

    def apply(self, x: torch.Tensor, y: torch.Tensor | None, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the shifted ``(x, y)``. ``x``: [N, C, H, W] float in [0, 1]; ``y``: [N] or None."""
        raise NotImplementedError

    def check(self, num_classes: int) -> None:
        """Raise SpecError if this shift cannot apply to a dataset with ``num_classes`` classes."""

    @property
    def params(self) -> dict[str, Any]:
        names = params_model(type(self)).model_fields  # type: ignore[arg-type]  # a class is hashable
        return {k: getattr(self, k) for k in names}

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None, seed: int = 0):
        check_images(x, y, f"shift {self.name!r}")
        return self.apply(x, y, seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params.items())})"


def _register(name: str):
    def deco(cls: type[Shift]) -> type[Shift]:
        cls.name = name
        return SHIFTS.register(name)(cls)

    return deco


def _generator(seed: int) -> torch.Generator:
    # Random numbers are drawn on the CPU and moved, so a seed gives the same data on any device.
    return torch.Generator().manual_seed(int(seed))


def rotate(x: torch.Tensor, degrees: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Rotate each image counter-clockwise (as displayed) by ``degrees[i]`` about its centre.

    Bilinear sampling (``F.affine_grid`` + ``F.grid_sample``, ``align_corners=False``); pixels
    that come from outside the image take the value ``fill``. Rotations by multiples of 90° on a
    square image land on pixel centres, so they match ``torch.rot90(x, k, dims=(-2, -1))``.

    Args:
        x: [N, C, H, W] float.
        degrees: [N] angles; positive turns the picture counter-clockwise.
        fill: background value for the uncovered corners.
    """
    n, _, h, w = x.shape
    a = torch.deg2rad(degrees.to(torch.float64))
    cos, sin = a.cos(), a.sin()
    # The grid maps each OUTPUT location to the INPUT location it samples, in [-1, 1] coordinates
    # (x to the right, y downwards); the inverse of a counter-clockwise turn in pixel units is
    # [[cos, -sin], [sin, cos]], and the h/w factors keep the turn rigid on non-square images.
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


@_register("rotation")
class Rotation(Shift):
    """Rotate every image by ``degrees`` (counter-clockwise), or by ``U(-degrees, degrees)`` if ``random``.

    Args:
        degrees: the angle, |degrees| <= 180.
        random: draw one angle per image uniformly in [-|degrees|, |degrees|] from the seed.
        fill: value (in [0, 1]) of the corners uncovered by the turn; 0 is black.
    """

    def __init__(self, degrees: Degrees = 30.0, random: bool = False, fill: Unit = 0.0):
        self.degrees, self.random, self.fill = degrees, random, fill

    def apply(self, x, y, seed):
        n = x.shape[0]
        if self.random:
            angles = (torch.rand(n, generator=_generator(seed), dtype=torch.float64) * 2 - 1) * abs(self.degrees)
        else:
            angles = torch.full((n,), float(self.degrees), dtype=torch.float64)
        return rotate(x, angles, self.fill).clamp(0, 1), y


@_register("gaussian_noise")
class GaussianNoise(Shift):
    """Add i.i.d. noise ``x + sigma * N(0, 1)`` per pixel, drawn from the seed.

    Args:
        sigma: noise standard deviation on pixel scale, >= 0.
        clip: clamp the result to [0, 1] (the noise std after clipping is then below ``sigma``).
    """

    def __init__(self, sigma: NonNegative = 0.2, clip: bool = True):
        self.sigma, self.clip = sigma, clip

    def apply(self, x, y, seed):
        noise = torch.randn(x.shape, generator=_generator(seed), dtype=x.dtype).to(x.device)
        out = x + self.sigma * noise
        return (out.clamp(0, 1) if self.clip else out), y


@_register("invert")
class Invert(Shift):
    """Photographic negative: ``1 - x`` (exact; e.g. white-on-black digits become black-on-white)."""

    def __init__(self):
        pass

    def apply(self, x, y, seed):
        return 1.0 - x, y


@_register("contrast")
class Contrast(Shift):
    """Blend toward a flat background: ``x * factor + background * (1 - factor)``, clamped to [0, 1].

    ``factor < 1`` lowers the contrast (0 gives a blank ``background`` image), ``factor > 1``
    raises it (the clamp then saturates); ``background`` is the grey level the pixels move toward
    (0 darkens, 0.5 greys, 1 washes out).

    Args:
        factor: contrast multiplier, >= 0.
        background: the grey level in [0, 1].
    """

    def __init__(self, factor: NonNegative = 0.5, background: Unit = 0.0):
        self.factor, self.background = factor, background

    def apply(self, x, y, seed):
        return (x * self.factor + self.background * (1 - self.factor)).clamp(0, 1), y


@_register("class_subset")
class ClassSubset(Shift):
    """Keep only the rows whose label is in ``classes`` (labels keep their original ids).

    For partial-label target domains: the classifier still has all ``num_classes`` outputs.

    Args:
        classes: non-empty list of distinct class ids in ``0..num_classes-1``.
    """

    def __init__(self, classes: ClassList):
        self.classes = sorted(int(c) for c in classes)

    def check(self, num_classes: int) -> None:
        bad = [c for c in self.classes if not 0 <= c < num_classes]
        if bad:
            raise SpecError(
                f"shift 'class_subset': parameter 'classes' has ids {bad} outside 0..{num_classes - 1} "
                f"(the dataset has {num_classes} classes).",
                hint="Use class ids the dataset has.",
            )

    def apply(self, x, y, seed):
        if y is None:
            raise DataError(
                "shift 'class_subset' needs labels, got y=None.",
                hint="Pass the labels with the images; other shifts accept y=None.",
            )
        keep = torch.isin(y, torch.tensor(self.classes, device=y.device))
        if not keep.any():
            raise DataError(
                f"shift 'class_subset' with classes {self.classes} kept no rows: the labels present are "
                f"{sorted(set(y.tolist()))}.",
                hint="Choose classes that occur in the data.",
            )
        return x[keep], y[keep]


# --------------------------------------------------------------------------------------------
# Specs, composition, hashing.
# --------------------------------------------------------------------------------------------


class ShiftSpec(Entry):
    """One shift in a spec: ``{name: rotation, degrees: 30}``.

    Validating with ``context={"num_classes": K}`` also checks class ids against ``K``.
    """

    entry_kind: ClassVar[str] = "shift"
    entry_registry: ClassVar[Registry] = SHIFTS

    @model_validator(mode="after")
    def _check_classes(self, info: ValidationInfo) -> "ShiftSpec":
        num_classes = (info.context or {}).get("num_classes")
        if num_classes is not None:
            try:
                self.build().check(num_classes)
            except KdrayError as e:
                raise ValueError(str(e)) from None
        return self

    def build(self) -> Shift:
        return SHIFTS.get(self.name)(**self.params)


def build_shift(entry: ShiftSpec | Mapping[str, Any] | Shift | str, /, **params: Any) -> Shift:
    """A checked :class:`Shift` from a spec, a ``{name: ..., <params>}`` mapping, or a name and params.

    Raises:
        KdrayError: unknown shift name, unknown parameter or a value out of range, naming it.
    """
    if isinstance(entry, Shift):
        return entry
    if isinstance(entry, ShiftSpec):
        return entry.build()
    if isinstance(entry, str):
        entry = {"name": entry, **params}
    entry = dict(entry)
    if "name" not in entry:
        raise SpecError(
            f"a shift entry needs a 'name', got {entry!r}.", hint=f"Known shifts: {', '.join(SHIFTS.names())}."
        )
    name = entry.pop("name")
    cls = SHIFTS.get(name)
    return cls(**check_params("shift", name, cls, entry))


def parse_shifts(
    items: Iterable[ShiftSpec | Mapping[str, Any]], where: str = "shifts", num_classes: int | None = None
) -> list[ShiftSpec]:
    """Validate a list of shift entries, raising SpecError that names ``where[i]`` on failure."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, ShiftSpec):
            item = item.model_dump()
        try:
            out.append(ShiftSpec.model_validate(item, context={"num_classes": num_classes}))
        except ValidationError as e:
            msg = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
            raise SpecError(msg, where=f"{where}[{i}]") from None
    return out


def _step_seed(seed: int, index: int, name: str) -> int:
    """An independent seed per step, so two noise shifts in one chain draw different noise."""
    digest = hashlib.sha256(f"{int(seed)}:{index}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def compose(shifts: Iterable[ShiftSpec | Mapping[str, Any] | Shift], num_classes: int | None = None) -> ShiftFn:
    """Chain shifts, in order, into one ``fn(x, y, seed) -> (x, y)``.

    Every step gets its own seed derived from ``seed`` and its position, so the result is a pure
    function of ``(x, y, seed)``. With ``num_classes`` set, class ids are checked up front.
    An empty list gives the identity (after the input checks).
    """
    steps = [build_shift(s) for s in shifts]
    if num_classes is not None:
        for s in steps:
            s.check(num_classes)

    def shifted(x: torch.Tensor, y: torch.Tensor | None = None, seed: int = 0):
        check_images(x, y, "compose(shifts)")
        for i, step in enumerate(steps):
            x, y = step.apply(x, y, _step_seed(seed, i, step.name))
        return x, y

    shifted.steps = steps  # type: ignore[attr-defined]
    shifted.__doc__ = f"Apply {steps} to (x, y) with a seed."
    return shifted


def canonical_shifts(shifts: Iterable[ShiftSpec | Mapping[str, Any] | Shift]) -> list[dict[str, Any]]:
    """``[{"name": ..., <all params, coerced, defaults filled in>}, ...]``: the form that is hashed."""
    return [{"name": s.name, **s.params} for s in (build_shift(x) for x in shifts)]


def shift_hash(shifts: Iterable[ShiftSpec | Mapping[str, Any] | Shift]) -> str:
    """sha256 (hex) of the canonical JSON of the shift list; a cache key for shifted data.

    Equal for equal shifts however they are spelt (``degrees: 30`` vs ``30.0``, defaults given or
    not, class ids in any order); changes with any parameter, the order, or :data:`SHIFTS_VERSION`.
    """
    payload = {"version": SHIFTS_VERSION, "shifts": canonical_shifts(shifts)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


__all__ = [
    "SHIFTS",
    "SHIFTS_VERSION",
    "Shift",
    "ShiftSpec",
    "build_shift",
    "parse_shifts",
    "compose",
    "shift_hash",
    "canonical_shifts",
    "check_images",
    "rotate",
]
