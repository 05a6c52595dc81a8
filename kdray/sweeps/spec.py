"""A sweep's spec: the searched fields (grid and sampled axes), how many samples, the ranking and the
early-stopping scheduler; ``--grid`` options of ``kdray sweep``; the trials' settings drawn from it."""

from __future__ import annotations

import itertools
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError, field_validator, model_validator

from kdray.contracts.specs import Spec
from kdray.core.errors import SpecError
from kdray.engine.spec import explain_validation, parse_override, parse_yaml
from kdray.sweeps.pareto import ChooseSpec


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["optim.lr=0.001,0.003", "model.name=mlp_64,mlp_128"]`` -> {path: [values]} (YAML-typed)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        path, value = parse_override(item)
        values = value if isinstance(value, list) else [parse_override(f"x={v}")[1] for v in str(value).split(",")]
        if not values:
            raise SpecError(f"--grid {item!r} lists no values; write e.g. optim.lr=0.001,0.003")
        grid[".".join(path)] = values
    if not grid:
        raise SpecError("a sweep needs at least one --grid key=value1,value2")
    return grid


# --------------------------------------------------------------------------- search spaces in a spec


class Axis(Spec):
    """One searched field: exactly one of ``grid`` (every value), ``choice`` (one sampled),
    ``uniform``/``loguniform`` ([low, high] floats), ``randint`` ([low, high) integers)."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one(self) -> "Axis":
        given = [k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform, randint (got {given or 'none'})")
        kind = given[0]
        if kind in ("grid", "choice") and not getattr(self, kind):
            raise ValueError(f"{kind} lists no values")
        if kind in ("uniform", "loguniform", "randint"):
            low, high = getattr(self, kind)
            if not low < high or (kind == "loguniform" and low <= 0):
                raise ValueError(
                    f"{kind}: [low, high] needs low < high{' and low > 0' if kind == 'loguniform' else ''}"
                )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    def sample(self, rng: np.random.Generator) -> Any:
        if self.choice is not None:
            return self.choice[int(rng.integers(len(self.choice)))]
        if self.uniform is not None:
            return float(rng.uniform(*self.uniform))
        if self.loguniform is not None:
            return float(np.exp(rng.uniform(np.log(self.loguniform[0]), np.log(self.loguniform[1]))))
        assert self.randint is not None
        return int(rng.integers(*self.randint))


class AshaSpec(Spec):
    """Ray Tune's ASHA on the per-epoch validation metric: at epochs ``grace_period * reduction_factor**k``
    a trial below the top ``1/reduction_factor`` of the trials that reached that epoch is stopped."""

    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1)  # default: the trials' largest optim.epochs


class SchedulerSpec(Spec):
    asha: AshaSpec


class SweepSpec(Spec):
    """A sweep of one pipeline stage: its search space, how many samples, and how trials are ranked.

    Every ``grid`` axis is crossed; each of ``num_samples`` repeats of that grid draws the other axes
    (seeded by ``seed``, so the same spec gives the same trials and a rerun resumes them). Trials
    are ranked on a validation metric only (``val_acc``, ``val_loss`` with ``mode: min``).
    ``scheduler`` (``none``, ``asha`` or ``{asha: {grace_period, reduction_factor, max_t}}``) stops weak
    trials early; ``choose`` picks the student within a budget (``kdray.sweeps.pareto.ChooseSpec``);
    ``latency_batch`` is the batch the Pareto report times each finished trial's model on.
    """

    stage: str
    space: dict[str, Axis] = Field(min_length=1)
    num_samples: int = Field(1, ge=1, le=10_000)
    metric: str = "val_acc"
    mode: str = "max"
    max_concurrent: int = Field(2, ge=1)
    seed: int = 0
    scheduler: Literal["none", "asha"] | SchedulerSpec | None = None
    choose: ChooseSpec | None = None
    latency_batch: int = Field(64, ge=1)

    @property
    def asha(self) -> AshaSpec | None:
        if self.scheduler == "asha":
            return AshaSpec()
        return self.scheduler.asha if isinstance(self.scheduler, SchedulerSpec) else None

    def options(self) -> dict[str, Any]:
        """The keyword arguments of ``run_sweep`` this spec sets."""
        return {
            "max_concurrent": self.max_concurrent,
            "metric": self.metric,
            "mode": self.mode,
            "scheduler": self.asha,
            "choose": self.choose,
            "latency_batch": self.latency_batch,
        }

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if not (v.startswith("val_") or v == "selection_score"):
            raise ValueError(f"{v!r}: trials are ranked on the validation split only; use val_acc or val_loss")
        return v

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v not in ("max", "min"):
            raise ValueError("use max or min")
        return v


def parse_sweep(doc: Any, source: str = "<sweep>") -> SweepSpec:
    """A ``sweep:`` document (or a document with a top-level ``sweep`` key), validated."""
    if isinstance(doc, dict) and set(doc) == {"sweep"}:
        doc = doc["sweep"]
    try:
        return SweepSpec.model_validate(doc)
    except ValidationError as e:
        raise SpecError(
            f"{source}: sweep: {explain_validation(e, SweepSpec)}",
            hint="A sweep names a stage and a space, e.g. {stage: student, space: {optim.lr: {loguniform: "
            "[0.0003, 0.01]}, model.name: {grid: [mlp_32, mlp_64]}}, num_samples: 4}.",
        ) from None


def load_sweep(path: str) -> SweepSpec:
    try:
        with open(path.removeprefix("file://"), "rb") as f:
            text = f.read()
    except OSError as e:
        raise SpecError(f"sweep file {path!r} cannot be read ({e.strerror})") from None
    return parse_sweep(parse_yaml(text, path), path)


def sample_settings(sweep: SweepSpec) -> list[dict[str, Any]]:
    """Every trial's settings: the grid axes crossed, the sampled axes drawn, ``num_samples`` times."""
    grid = {k: a.grid for k, a in sweep.space.items() if a.grid is not None}
    rng = np.random.default_rng(sweep.seed)
    out = []
    for _ in range(sweep.num_samples):
        for values in itertools.product(*grid.values()) if grid else [()]:
            fixed = dict(zip(grid, values))
            out.append({k: fixed[k] if k in fixed else a.sample(rng) for k, a in sweep.space.items()})
    return out
