"""Sweeps: many students and hyperparameters of one stage, run as Ray Tune trials.

    kdray sweep examples/fmnist_cnn_to_mlp_hinton.yaml --stage student \\
        --grid model.name=mlp_64,mlp_128 --grid optim.lr=0.001,0.003 --max-concurrent 2

Every trial is a copy of the stage with some fields changed, renamed ``<stage>-t<i>``; it is a
pipeline stage like any other (its own key, artifact and Ray run name), so a sweep is resumable:
finished trials are cached artifacts, and an interrupted one resumes from its last checkpoint.
The parents (a teacher) run first, once; a distill sweep builds the teacher-output cache once,
before any trial, and every student reads it.

Placement: a trial whose stage has ``workers: 1`` runs its loop inside the Tune trial (as
``workers: 0`` does; the trial holds ``cpus_per_worker`` CPUs), which avoids a worker group per trial. With
``workers > 1`` each trial launches a ``TorchTrainer`` and holds almost nothing itself (the Ray
Train V2 pattern: ``{"cpu": 0.01}`` per trial, the trainer holds the real resources).
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import time
from typing import Any, Callable

import numpy as np
from pydantic import Field, ValidationError, field_validator, model_validator

from kdray.core.checkpoint import write_artifact
from kdray.core.errors import SpecError
from kdray.core.specs import Spec, spec_hash
from kdray.core.stage import StageContext
from kdray.core.storage import Storage
from kdray.distill.cache import ensure_cache
from kdray.distill.stage import cache_decision
from kdray.engine.driver import ensure_ray
from kdray.engine.pipeline import parent_artifacts, plan, run_pipeline, run_stage
from kdray.engine.spec import (
    PipelineSpec,
    apply_override,
    explain_validation,
    parse_override,
    parse_pipeline,
    parse_yaml,
)


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


class SweepSpec(Spec):
    """A sweep of one pipeline stage: its search space, how many samples, and how trials are ranked.

    Every ``grid`` axis is crossed; each of ``num_samples`` repeats of that grid draws the other axes
    (seeded by ``seed``, so the same spec gives the same trials and a rerun resumes them). Trials
    are ranked on a validation metric only (``val_acc``, ``val_loss`` with ``mode: min``).
    """

    stage: str
    space: dict[str, Axis] = Field(min_length=1)
    num_samples: int = Field(1, ge=1, le=10_000)
    metric: str = "val_acc"
    mode: str = "max"
    max_concurrent: int = Field(2, ge=1)
    seed: int = 0

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


def expand(
    spec: PipelineSpec, stage: str, grid: dict[str, list[Any]] | list[dict[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The pipeline document with one stage per trial (replacing ``stage``), and the trials' settings.

    ``grid`` is ``{path: [values]}`` (every combination is a trial) or the list of trials' settings.
    """
    doc = spec.model_dump(mode="json", exclude_unset=False)
    names = [s["name"] for s in doc["stages"]]
    if stage not in names:
        raise SpecError(f"--stage {stage!r}: no such stage; stages are {', '.join(names)}")
    index = names.index(stage)
    base = doc["stages"][index]
    if base["kind"] == "evaluate":
        raise SpecError(f"--stage {stage!r} is an evaluate stage; sweep a train, distill or transfer stage")
    combos = [dict(zip(grid, v)) for v in itertools.product(*grid.values())] if isinstance(grid, dict) else grid
    trials, stages = [], []
    for i, settings in enumerate(combos):
        trial = copy.deepcopy(base)
        for path, value in settings.items():
            apply_override(trial, path.split("."), value, f"{path}={value}")
        trial["name"] = f"{stage}-t{i}"
        stages.append(trial)
        trials.append({"trial": trial["name"], "settings": settings})
    doc["stages"] = doc["stages"][:index] + stages  # later stages (an evaluate) are not part of a sweep
    return doc, trials


def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: run its stage (cached if finished) and report the final metrics."""
    from ray import tune

    spec = parse_pipeline(config["doc"])
    outcome = run_stage(spec, config["trial"], log=lambda m: print(m, flush=True))
    metrics = outcome.metrics or {}
    tune.report(
        {
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            "uri": outcome.uri,
            "status": outcome.status,
        }
    )


def check_metric(metric: str, mode: str = "max") -> None:
    """Trials are ranked on validation data only: a ``val_*`` metric (or ``selection_score``)."""
    if not (metric.startswith("val_") or metric == "selection_score"):
        raise SpecError(
            f"sweep metric {metric!r}: trials are ranked on the validation split only, never on test or "
            "training figures (choosing by the test split makes the reported test accuracy optimistic)",
            hint="Use val_acc (the default) or val_loss with mode min.",
        )
    if mode not in ("max", "min"):
        raise SpecError(f"sweep mode {mode!r}: use max or min")


def run_sweep(
    spec: PipelineSpec,
    stage: str,
    grid: dict[str, list[Any]] | list[dict[str, Any]],
    *,
    max_concurrent: int = 2,
    metric: str = "val_acc",
    mode: str = "max",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every trial through Ray Tune; return (and publish) the ranked report."""
    from ray import tune

    check_metric(metric, mode)

    doc, trials = expand(spec, stage, grid)
    full = parse_pipeline(copy.deepcopy(doc))
    parents = [s.name for s in spec.stages[: [s.name for s in spec.stages].index(stage)]]
    t0 = time.perf_counter()
    if parents:  # teachers and sources once, before any trial
        run_pipeline(full, only=parents, log=log)
    first = full.stage(trials[0]["trial"])
    if first.kind == "distill" and first.teacher_cache != "off":
        _warm_teacher_cache(full, [t["trial"] for t in trials], log)

    run = full.run_for(first)
    ensure_ray(run)
    in_trial = run.workers <= 1
    if in_trial:  # the loop runs inside the trial: give the trial the worker's CPUs
        for s in doc["stages"]:
            if s["name"] in {t["trial"] for t in trials}:
                s["run"] = {**(s.get("run") or {}), "workers": 0}
    resources = {"cpu": run.cpus_per_worker} if in_trial else {"cpu": 0.01}
    root = Storage(spec.storage.uri)
    sweep_key = spec_hash({"doc": doc, "metric": metric})[:12]
    storage_path, filesystem = root.ray_storage()
    tuner = tune.Tuner(
        tune.with_resources(_trial, resources),
        param_space={"doc": doc, "trial": tune.grid_search([t["trial"] for t in trials])},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent),
        run_config=tune.RunConfig(
            name=f"sweep-{spec.name}-{stage}-{sweep_key}",
            storage_path=storage_path,
            storage_filesystem=filesystem,
            verbose=0,
        ),
    )
    results = tuner.fit()
    rows = []
    by_trial = {t["trial"]: t["settings"] for t in trials}
    for result in (results[i] for i in range(len(results))):
        if result.error is not None:
            raise result.error
        m = result.metrics or {}
        trial = (result.config or {})["trial"]
        rows.append(
            {
                "trial": trial,
                "settings": by_trial[trial],
                metric: m.get(metric),
                "val_acc": m.get("val_acc"),
                "uri": m.get("uri"),
                "status": m.get("status"),
            }
        )
    rows.sort(key=lambda r: (r[metric] is None, -(r[metric] or 0) if mode == "max" else (r[metric] or 0)))
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    report = {
        "pipeline": spec.name,
        "stage": stage,
        "metric": metric,
        "mode": mode,
        "grid": grid if isinstance(grid, dict) else {k: sorted({str(t[k]) for t in grid}) for k in grid[0]},
        "trials": rows,
        "seconds": round(time.perf_counter() - t0, 2),
        "max_concurrent": max_concurrent,
    }
    store = root.child(f"{spec.name}/_sweeps/{stage}-{sweep_key}")
    files = {"sweep.json": json.dumps(report, indent=2).encode(), "sweep.md": markdown(report).encode()}
    png = plot(report)
    if png:
        files["sweep.png"] = png
    write_artifact(
        store,
        {
            "kind": "sweep",
            "pipeline": spec.name,
            "stage": stage,
            "key": sweep_key,
            "metrics": {"best": rows[0] if rows else None},
        },
        None,
        files,
    )
    report["uri"] = store.uri()
    log(markdown(report))
    return report


def _warm_teacher_cache(spec: PipelineSpec, trial_names: list[str], log: Callable[[str], None]) -> None:
    """Build the teacher-output cache once, so concurrent trials never race to build it."""
    root = Storage(spec.storage.uri)
    keys = plan(spec)
    done = set()
    for name in trial_names:
        stage = spec.stage(name)
        use, _ = cache_decision(stage)
        if not use or (stage.teacher, json.dumps(stage.data.model_dump(mode="json"))) in done:
            continue
        parents = parent_artifacts(spec, stage, keys, root)
        ensure_cache(StageContext(spec, stage, keys[name], root, root, parents, log), parents[stage.teacher])
        done.add((stage.teacher, json.dumps(stage.data.model_dump(mode="json"))))


def markdown(report: dict[str, Any]) -> str:
    keys = list(report["grid"])
    lines = [
        f"# Sweep of {report['pipeline']}/{report['stage']} ({len(report['trials'])} trials, "
        f"{report['seconds']} s, {report['max_concurrent']} at a time)",
        "",
        "| rank | trial | " + " | ".join(keys) + f" | {report['metric']} |",
        "|---|---|" + "---|" * len(keys) + "---|",
    ]
    for r in report["trials"]:
        value = r[report["metric"]]
        shown = f"{value:.4f}" if value is not None else "–"
        lines.append(
            f"| {r['rank']} | {r['trial']} | " + " | ".join(str(r["settings"][k]) for k in keys) + f" | {shown} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any]) -> bytes | None:
    rows = [r for r in report["trials"] if r[report["metric"]] is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["settings"].items()) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.5))
    ax.barh(range(len(rows))[::-1], [r[report["metric"]] for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows))[::-1], labels)
    values = [r[report["metric"]] for r in rows]
    ax.set_xlim(min(values) - 0.02, max(values) + 0.01)
    ax.set_xlabel(report["metric"])
    ax.set_title(f"{report['pipeline']}/{report['stage']}: trials ranked")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
