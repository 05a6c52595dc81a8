"""``data.transforms``: resize, centre and random crops, horizontal flips and normalisation, seeded.

A dataset spec lists its transforms in order, one mapping per item, the transform's name as the key::

    data:
      transforms:
        - {resize: 32}                                # deterministic: every image 32x32 (bilinear, antialiased)
        - {random_crop: {size: 28, padding: 2}}       # random: a 28x28 window of the 2-pixel zero-padded image
        - {hflip: 0.5}                                # random: flip left-right with probability 0.5
        - {center_crop: 28}                           # deterministic
        - {normalize: {mean: [0.286], std: [0.353]}}  # deterministic: the mean/std inputs are normalised with

Every transform works on pixel scale (float ``[N, C, H, W]`` in [0, 1]), on CPU, in the data pipeline:
:func:`kdray.data.datasets.load` applies the deterministic ones once to the whole split, and the training
batch source applies the random ones to each CPU batch (:func:`apply` with ``train=True``) before the
loop moves it to its device. A random transform draws from a counter-based generator keyed by (run
seed, epoch, row id, the transform's position), so a rerun gives the same augmentation and every epoch
a different one. Validation and test data get only the deterministic view: a ``random_crop`` becomes
the centre crop of the same size (so every split has the models' image size) and ``hflip`` is skipped.

``normalize`` must come last: it replaces the dataset's own mean and std (one value, or one per
channel), which the batch source uses after the pixel transforms. The image size models are built for
is :func:`output_size` of the dataset's (``kdray.data.datasets.describe``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_serializer, model_validator

from kdray.core.errors import DataError
from kdray.core.registry import did_you_mean
from kdray.core.spec import Spec


class _Params(Spec):
    """A transform's parameters; a bare value (``{resize: 32}``) stands for the first parameter."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _bare(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return data
        if isinstance(data, bool):
            raise ValueError(f"expected a number, got {str(data).lower()}")
        return {next(iter(cls.model_fields)): data}


class Resize(_Params):
    size: int = Field(ge=1, le=4096)


class CenterCrop(_Params):
    size: int = Field(ge=1, le=4096)


class RandomCrop(_Params):
    size: int = Field(ge=1, le=4096)
    padding: int = Field(0, ge=0, le=1024)


class HFlip(_Params):
    p: float = Field(0.5, ge=0, le=1)


class Normalize(_Params):
    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _lengths(self) -> "Normalize":
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}; give one per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        return self


KINDS: dict[str, type[_Params]] = {
    "resize": Resize,
    "center_crop": CenterCrop,
    "random_crop": RandomCrop,
    "hflip": HFlip,
    "normalize": Normalize,
}


class TransformSpec(Spec):
    """One item of ``data.transforms``: exactly one of the transforms, by name, with its parameters."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    resize: Resize | None = None
    center_crop: CenterCrop | None = None
    random_crop: RandomCrop | None = None
    hflip: HFlip | None = None
    normalize: Normalize | None = None

    @model_validator(mode="before")
    @classmethod
    def _one(cls, data: Any) -> Any:
        if not isinstance(data, dict) or len(data) != 1:
            raise ValueError(
                "each transform is one mapping {name: parameters}, e.g. {resize: 32} or "
                "{random_crop: {size: 28, padding: 2}}; known: " + ", ".join(KINDS)
            )
        (name,) = data
        if name not in KINDS:
            raise ValueError(f"unknown transform {name!r}; {did_you_mean(str(name), list(KINDS))}")
        return {name: {}} if data[name] is None else data  # `- hflip:` (no value): the defaults

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}

    @property
    def name(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def params(self) -> Any:
        return getattr(self, self.name)

    @property
    def random(self) -> bool:
        """Whether it draws random numbers (a flip with p = 0 does not)."""
        return self.name == "random_crop" or (self.name == "hflip" and self.params.p > 0)


def check_order(steps: Sequence[TransformSpec]) -> list[TransformSpec]:
    """``normalize`` at most once, and last (it sets the mean/std applied after the pixel transforms)."""
    for i, step in enumerate(steps):
        if step.name == "normalize" and i != len(steps) - 1:
            raise ValueError(
                f"[{i}].normalize must be the last transform: it sets the mean and std the images are "
                "normalised with after the pixel transforms; move it to the end"
            )
    return list(steps)


# --------------------------------------------------------------------------- what the steps do to a spec


def has_random(steps: Sequence[TransformSpec]) -> bool:
    return any(s.random for s in steps)


def random_names(steps: Sequence[TransformSpec]) -> list[str]:
    return list(dict.fromkeys(s.name for s in steps if s.random))


def split_random(steps: Sequence[TransformSpec]) -> tuple[list[TransformSpec], list[TransformSpec]]:
    """(the deterministic steps before the first random one: applied once at load, the rest: per batch)."""
    first = next((i for i, s in enumerate(steps) if s.random), len(steps))
    return list(steps[:first]), list(steps[first:])


def output_size(steps: Sequence[TransformSpec], size: int) -> int:
    """The image size after ``steps`` (the same with and without the random ones)."""
    for s in steps:
        if s.name in ("resize", "center_crop", "random_crop"):
            size = s.params.size
    return size


def stats(
    steps: Sequence[TransformSpec], mean: float | tuple[float, ...], std: float | tuple[float, ...], channels: int
) -> tuple[float | tuple[float, ...], float | tuple[float, ...]]:
    """The mean and std to normalise with: ``normalize``'s if the steps have one, else the dataset's."""
    for i, s in enumerate(steps):
        if s.name == "normalize":
            p = s.params
            if len(p.mean) not in (1, channels):
                raise DataError(
                    f"data.transforms[{i}].normalize.mean: {len(p.mean)} values for {channels}-channel images",
                    hint=f"Give one mean and one std per channel ({channels}), or a single value for all.",
                )
            if len(p.mean) == 1:
                return float(p.mean[0]), float(p.std[0])
            return tuple(p.mean), tuple(p.std)
    return mean, std


def key(steps: Sequence[TransformSpec]) -> str:
    """A short hash of the steps (part of a transformed split's fingerprint)."""
    doc = [s.model_dump(mode="json") for s in steps]
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- what the steps do to images


def apply(
    x: torch.Tensor,
    steps: Sequence[TransformSpec],
    *,
    train: bool = False,
    rows: torch.Tensor | np.ndarray | None = None,
    seed: int = 0,
    epoch: int = 0,
) -> torch.Tensor:
    """``steps`` applied to pixel images ``x`` (float ``[N, C, H, W]`` in [0, 1]).

    ``train=False`` is the deterministic view (random crop -> centre crop of its size, no flips);
    ``train=True`` draws each row's crop offset and flip from (``seed``, ``epoch``, ``rows[i]``, the
    step's position). ``normalize`` changes no pixels (see :func:`stats`).
    """
    if train and rows is None:
        raise ValueError("apply(train=True) needs the rows' ids")
    ids = np.asarray(rows, dtype=np.int64) if rows is not None else np.zeros(0, np.int64)
    for pos, s in enumerate(steps):
        p = s.params
        if s.name == "resize":
            x = resize(x, p.size)
        elif s.name == "center_crop":
            x = center_crop(x, p.size)
        elif s.name == "random_crop":
            x = pad(x, p.padding)
            if train:
                x = random_crop(x, p.size, uniform(seed, epoch, pos, ids, 2))
            else:
                x = center_crop(x, p.size)
        elif s.name == "hflip" and train and p.p > 0:
            flip = torch.from_numpy(uniform(seed, epoch, pos, ids, 1)[:, 0] < p.p)
            if bool(flip.any()):
                x = x.clone()
                x[flip] = x[flip].flip(-1)
    return x


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased when shrinking (a convex blend: pixels stay in [0, 1])."""
    if x.shape[-2:] == (size, size) or len(x) == 0:
        return x
    shrink = size < min(x.shape[-2:])
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def pad(x: torch.Tensor, padding: int) -> torch.Tensor:
    return F.pad(x, (padding,) * 4) if padding else x


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centre ``size`` x ``size`` window (zero-padded first if the image is smaller)."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        dh, dw = max(0, size - h), max(0, size - w)
        x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
    return x[..., top : top + size, left : left + size]


def random_crop(x: torch.Tensor, size: int, u: np.ndarray) -> torch.Tensor:
    """Row ``i``'s ``size`` x ``size`` window at offsets drawn from ``u[i]`` (two uniforms in [0, 1))."""
    if x.shape[-2] < size or x.shape[-1] < size:
        x = center_crop(x, max(size, x.shape[-2], x.shape[-1]))  # zero-pad up to the crop
    h, w = x.shape[-2:]
    top = torch.from_numpy((u[:, 0] * (h - size + 1)).astype(np.int64))
    left = torch.from_numpy((u[:, 1] * (w - size + 1)).astype(np.int64))
    r = torch.arange(size)
    n = torch.arange(len(x))[:, None, None]
    out = x.permute(0, 2, 3, 1)[n, (top[:, None] + r)[:, :, None], (left[:, None] + r)[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def _mix(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniform(seed: int, epoch: int, position: int, rows: np.ndarray, k: int) -> np.ndarray:
    """``[len(rows), k]`` uniforms in [0, 1): a counter-based generator keyed by (seed, epoch, position,
    row id, j). The same key always gives the same numbers, whatever the batch a row lands in."""
    with np.errstate(over="ignore"):
        stream = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        stream = _mix(stream ^ np.uint64(epoch & 0xFFFFFFFF) * np.uint64(0xD1B54A32D192ED03))
        stream = _mix(stream ^ np.uint64(position) * np.uint64(0x8CB92BA72F3D8DD7))
        rows64 = rows.astype(np.uint64)[:, None] * np.uint64(k) + np.arange(k, dtype=np.uint64)[None, :]
        z = _mix(_mix(stream + rows64 * np.uint64(0x9E3779B97F4A7C15)))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
