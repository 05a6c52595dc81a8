"""Sweeps: many students and hyperparameters of one stage, run as Ray Tune trials.

    kdray sweep examples/fmnist_cnn_to_mlp_hinton.yaml --stage student \\
        --grid model.name=mlp_64,mlp_128 --grid optim.lr=0.001,0.003 --max-concurrent 2

Every trial is a copy of the stage with some fields changed, renamed ``<stage>-t<i>``; it is a
pipeline stage like any other (its own key, artifact and Ray run name), so a sweep is resumable:
finished trials are cached artifacts, and an interrupted one resumes from its last checkpoint.
The parents (a teacher) run first, once; a distill sweep builds the teacher-output cache once,
before any trial, and every student reads it.

Early stopping (``scheduler: {asha: ...}`` in a sweep spec): each trial reports every epoch's
validation figures to Ray Tune as its loop finishes the epoch, and ASHA stops a trial that falls
behind at a rung. A stopped trial publishes nothing (its weights are not a finished artifact); the
report lists it as ``stopped early at epoch N``, ranked after every finished trial. A rerun caches
the finished trials (they replay their epochs to ASHA) and runs the stopped ones again, from their
last epoch checkpoint, for ASHA to judge at their next rung.

The report (``sweep.md``/``sweep.json``) adds the Pareto table of the finished trials (validation
accuracy against parameters, size on disk and latency, ``kdray.sweeps.pareto``) and ``pareto.png``;
with ``choose`` the best trial within a budget is published at ``<sweep>/chosen`` for later stages
and exported to ONNX (checked against PyTorch).

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
import math
import time
from typing import Any, Callable, Literal

import numpy as np
from pydantic import Field, ValidationError, field_validator, model_validator

from kdray.contracts.checkpoint import open_artifact, write_artifact
from kdray.contracts.specs import Spec, spec_hash
from kdray.contracts.stage import StageContext, StageKind, kind_of
from kdray.core import layout
from kdray.core.errors import SpecError
from kdray.core.storage import Storage
from kdray.engine.driver import ensure_ray, on_epoch
from kdray.engine.pipeline import cached_outcome, parent_artifacts, plan, run_pipeline, run_stage
from kdray.engine.resolved import resolve
from kdray.engine.spec import (
    PipelineSpec,
    apply_override,
    explain_validation,
    parse_override,
    parse_pipeline,
    parse_yaml,
)
from kdray.evaluate.export import ExportError, export_artifact
from kdray.sweeps import pareto
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


def _numbers(metrics: dict[str, Any], metric: str) -> dict[str, Any]:
    """The finite numbers of an epoch's metrics, for Ray Tune; the ranking metric always present (NaN if
    missing, which ASHA ignores) so that Tune's check that every result names it holds."""
    out = {
        k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }
    out.setdefault(metric, float("nan"))
    return out


def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: run its stage (cached if finished), reporting every epoch, then the final metrics.

    Every epoch but the last is reported as the loop finishes it (``driver.on_epoch``: the trial's
    loop runs in this process), so a scheduler (ASHA) can stop the trial there; Tune then ends this
    process and the stage publishes nothing. The last epoch is reported once the artifact is
    published, with its URI and status. A cached trial replays its history, so ASHA's rungs see the
    same figures as when it ran.
    """
    from ray import tune

    spec = parse_pipeline(config["doc"])
    name, metric = config["trial"], config["metric"]
    stage = spec.stage(name)
    epochs = stage.optim.epochs if hasattr(stage, "optim") else 0

    def per_epoch(metrics: dict[str, Any]) -> None:
        if int(metrics.get("epoch", 0)) < epochs:
            tune.report(_numbers(metrics, metric))

    keys = plan(spec)
    outcome = cached_outcome(spec, name, keys, log=lambda m: print(m, flush=True))
    if outcome is not None:
        for h in (open_artifact(outcome.uri).manifest.get("history") or [])[:-1]:
            tune.report({**_numbers(h, metric), "replayed": 1})
    else:
        with on_epoch(per_epoch):
            outcome = run_stage(spec, name, keys=keys, log=lambda m: print(m, flush=True))
    tune.report({**_numbers(outcome.metrics or {}, metric), "uri": outcome.uri, "status": outcome.status})


def _progress(total: int, metric: str, mode: str, title: str, log: Callable[[str], None]) -> Any:
    """A Tune callback that logs one line per finished trial: trials done/total and the best figure so far."""
    from ray import tune

    class SweepProgress(tune.Callback):
        def __init__(self) -> None:
            self.done = 0
            self.best: tuple[float, str] | None = None

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            r = trial.last_result or {}
            name = (trial.config or {}).get("trial", str(trial))
            value = r.get(metric)
            finished = r.get("status") is not None or bool(r.get("replayed"))  # a cached trial Tune stopped replaying
            what = r.get("status") or ("cached" if finished else f"stopped early at epoch {r.get('epoch', '?')}")
            if finished and isinstance(value, (int, float)) and math.isfinite(value):
                if self.best is None or (value > self.best[0] if mode == "max" else value < self.best[0]):
                    self.best = (float(value), name)
            shown = f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "–"
            best = f"{self.best[0]:.4f} ({self.best[1]})" if self.best else "–"
            log(f"[{title}] {self.done}/{total} trials done: {name} {what}, {metric} {shown}; best so far {best}")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            log(f"[{title}] {self.done}/{total} trials done: {(trial.config or {}).get('trial')} failed")

    return SweepProgress()


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
    scheduler: AshaSpec | None = None,
    choose: ChooseSpec | None = None,
    latency_batch: int = 64,
    latency_runs: int = 20,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every trial through Ray Tune; return (and publish) the ranked report.

    With ``scheduler`` (ASHA) weak trials stop early: such a trial publishes no artifact and is
    listed as ``stopped`` at its last epoch, ranked after every finished trial. The report adds the
    Pareto table of the finished trials and, with ``choose``, the chosen student: published at
    ``<sweep>/chosen`` (a copy of its trial's artifact) and exported (``choose.export``).
    """
    from ray import tune

    check_metric(metric, mode)

    doc, trials = expand(spec, stage, grid)
    # Tune starts each trial in a folder of its own: a relative storage folder (file://./runs) must
    # name the same place there as here
    doc["storage"]["uri"] = Storage(spec.storage.uri).uri()
    full = parse_pipeline(copy.deepcopy(doc))
    first = full.stage(trials[0]["trial"])
    run = full.run_for(first)
    in_trial = run.workers <= 1
    asha = _asha(scheduler, full, [t["trial"] for t in trials], run.workers, stage, metric, mode)  # checked first
    parents = [s.name for s in spec.stages[: [s.name for s in spec.stages].index(stage)]]
    t0 = time.perf_counter()
    if parents:  # teachers and sources once, before any trial
        run_pipeline(full, only=parents, log=log)
    _prepare_trials(full, [t["trial"] for t in trials], log)  # e.g. distill's teacher cache, built once

    ensure_ray(run)
    if in_trial:  # the loop runs inside the trial: give the trial the worker's CPUs
        for s in doc["stages"]:
            if s["name"] in {t["trial"] for t in trials}:
                s["run"] = {**(s.get("run") or {}), "workers": 0}
    resources = {"cpu": run.cpus_per_worker} if in_trial else {"cpu": 0.01}
    root = Storage(spec.storage.uri)
    extra = {
        "scheduler": scheduler.model_dump(mode="json") if scheduler else None,
        "choose": choose.model_dump(mode="json") if choose else None,
    }
    sweep_key = spec_hash({"doc": doc, "metric": metric, **({k: v for k, v in extra.items() if v})})[:12]
    storage_path, filesystem = layout.ray_storage(root)
    title = f"sweep {spec.name}/{stage}"
    tuner = tune.Tuner(
        tune.with_resources(_trial, resources),
        param_space={"doc": doc, "metric": metric, "trial": tune.grid_search([t["trial"] for t in trials])},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, scheduler=asha),
        run_config=tune.RunConfig(
            name=f"sweep-{spec.name}-{stage}-{sweep_key}",
            storage_path=storage_path,
            storage_filesystem=filesystem,
            verbose=0,
            callbacks=[_progress(len(trials), metric, mode, title, log)],
        ),
    )
    results = tuner.fit()
    keys = plan(full)
    rows = []
    by_trial = {t["trial"]: t["settings"] for t in trials}
    for result in (results[i] for i in range(len(results))):
        if result.error is not None:
            raise result.error
        m = dict(result.metrics or {})
        trial = (result.config or {})["trial"]
        status, uri = m.get("status"), m.get("uri")
        if status is None:  # Tune stopped it before it published: ASHA, or a cached trial replaying its epochs
            cached = cached_outcome(full, trial, keys, log=lambda _: None)
            if cached is not None:
                status, uri, m = "cached", cached.uri, cached.metrics
            else:
                status = "stopped"
        value = m.get(metric)
        rows.append(
            {
                "trial": trial,
                "settings": by_trial[trial],
                metric: value if isinstance(value, (int, float)) and math.isfinite(value) else None,
                "val_acc": m.get("val_acc"),
                "epoch": m.get("epoch"),
                "uri": uri,
                "status": status,
            }
        )
    rows.sort(
        key=lambda r: (
            r["status"] == "stopped",  # a stopped trial trained fewer epochs and published nothing
            r[metric] is None,
            -(r[metric] or 0) if mode == "max" else (r[metric] or 0),
        )
    )
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    store = layout.sweep(root, spec.name, stage, sweep_key)
    figures = pareto.trial_rows(rows, metric, batch=latency_batch, runs=latency_runs)
    report = {
        "pipeline": spec.name,
        "stage": stage,
        "metric": metric,
        "mode": mode,
        "grid": grid if isinstance(grid, dict) else {k: sorted({str(t[k]) for t in grid}) for k in grid[0]},
        "trials": rows,
        "seconds": round(time.perf_counter() - t0, 2),
        "max_concurrent": max_concurrent,
        **extra,
        "stopped": sum(r["status"] == "stopped" for r in rows),
        "pareto": figures,
        "latency": {"batch": latency_batch, "runs": latency_runs, "threads": 1},
        "selection": "validation split only; the test split is not read by the sweep",
    }
    if choose is not None:
        report["chosen"] = choose_student(store, report, figures, choose, sweep_key, log)
    files = {"sweep.json": json.dumps(report, indent=2).encode(), "sweep.md": markdown(report).encode()}
    for name, png in (("sweep.png", plot(report)), ("pareto.png", pareto.plot(figures, f"{title}: Pareto front"))):
        if png:
            files[name] = png
    write_artifact(
        store,
        {
            "kind": "sweep",
            "pipeline": spec.name,
            "stage": stage,
            "key": sweep_key,
            "metrics": {"best": rows[0] if rows else None},
            "chosen": report.get("chosen"),
        },
        None,
        files,
    )
    report["uri"] = store.uri()
    log(markdown(report))
    return report


def _asha(
    scheduler: AshaSpec | None, full: PipelineSpec, names: list[str], workers: int, stage: str, metric: str, mode: str
) -> Any:
    """Ray Tune's ASHAScheduler on the trials' per-epoch ``metric`` (None without a scheduler)."""
    if scheduler is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    if workers > 1:
        raise SpecError(
            f"sweep scheduler asha: stage {stage!r} runs {workers} Ray Train workers per trial, whose "
            "epochs the trial cannot report to Ray Tune",
            hint="Sweep with run.workers: 0 or 1 (the loop runs inside each trial), or scheduler: none.",
        )
    epochs = max(full.stage(n).optim.epochs for n in names)
    max_t = scheduler.max_t or epochs
    if scheduler.grace_period > max_t:
        raise SpecError(
            f"sweep scheduler asha: grace_period {scheduler.grace_period} is more than max_t {max_t} "
            "(the trials' epochs)",
            hint="Lower grace_period below the number of epochs, or raise optim.epochs.",
        )
    return ASHAScheduler(
        time_attr="epoch",
        metric=metric,
        mode=mode,
        max_t=max_t,
        grace_period=scheduler.grace_period,
        reduction_factor=scheduler.reduction_factor,
    )


def choose_student(
    store: Storage,
    report: dict[str, Any],
    figures: list[dict[str, Any]],
    rule: ChooseSpec,
    sweep_key: str,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Pick the student within the budget, publish it at ``<sweep>/chosen`` and export it; the report's record."""
    metric, mode = report["metric"], report["mode"]
    row, note = pareto.choose(figures, rule, metric, mode)
    log(f"[sweep {report['pipeline']}/{report['stage']}] {note}")
    chosen: dict[str, Any] = {"rule": rule.describe(), "note": note, "trial": None, "uri": None}
    if row is None:
        return chosen
    extra = {"sweep": sweep_key, "rule": rule.describe(), "metric": metric, "value": row[metric]}
    art = pareto.publish_chosen(store.child("chosen"), row, extra)
    chosen.update(
        trial=row["trial"],
        uri=art.uri,
        trial_uri=row["uri"],
        model=row["model"],
        **{k: row[k] for k in (metric, "val_acc", "parameters", "size_bytes", "latency_ms")},
    )
    if rule.export != "none":
        try:
            rec = export_artifact(art.uri, rule.export)
        except ExportError as e:  # the student stays chosen and published; the report says why it has no export
            chosen["export"] = {"format": rule.export, "error": str(e)}
            log(f"[sweep {report['pipeline']}/{report['stage']}] export of the chosen student failed: {e}")
        else:
            chosen["export"] = {
                "format": rec["format"],
                "uri": rec["uri"],
                "sha256": rec["sha256"],
                "max_abs_diff": rec["check"]["max_abs_diff"],
                "tolerance": rec["check"]["tolerance"],
                "argmax_agreement": rec["check"]["argmax_agreement"],
                "latency": rec["latency"],
            }
    return chosen


def _prepare_trials(spec: PipelineSpec, trial_names: list[str], log: Callable[[str], None]) -> None:
    """Let the trials' stage kind build what they share before any trial starts (``StageKind.prepare_trials``)."""
    kind = kind_of(spec.stage(trial_names[0]))
    if type(kind).prepare_trials is StageKind.prepare_trials:
        return  # nothing shared: no need to resolve the trials' parents here
    keys = plan(spec)
    stages = resolve(spec, keys)
    contexts = []
    for name in trial_names:
        s = stages[name]
        parents = parent_artifacts(spec, s.stage, keys, s.root)
        contexts.append(StageContext(spec, s.stage, s.key, s.root, s.root, parents, log))
    kind.prepare_trials(contexts)


def _status(r: dict[str, Any]) -> str:
    return f"stopped early at epoch {r.get('epoch')}" if r.get("status") == "stopped" else str(r.get("status"))


def markdown(report: dict[str, Any]) -> str:
    keys = list(report["grid"])
    asha = report.get("scheduler") or {}
    lines = [
        f"# Sweep of {report['pipeline']}/{report['stage']} ({len(report['trials'])} trials, "
        f"{report['seconds']} s, {report['max_concurrent']} at a time)",
        "",
        f"Ranked by {report['metric']} ({report['mode']}) on the validation split; the test split is not read. "
        + (
            f"ASHA (grace period {asha['grace_period']}, reduction factor {asha['reduction_factor']:g}) stopped "
            f"{report.get('stopped', 0)} trial(s) early: they published nothing and rank after the finished ones."
            if asha
            else "No early stopping."
        ),
        "",
        "| rank | trial | " + " | ".join(keys) + f" | {report['metric']} | status |",
        "|---|---|" + "---|" * len(keys) + "---|---|",
    ]
    for r in report["trials"]:
        value = r[report["metric"]]
        shown = f"{value:.4f}" if value is not None else "–"
        lines.append(
            f"| {r['rank']} | {r['trial']} | "
            + " | ".join(str(r["settings"][k]) for k in keys)
            + f" | {shown} | {_status(r)} |"
        )
    text = "\n".join(lines) + "\n"
    if report.get("pareto") is not None:
        latency = report.get("latency") or {}
        text += "\n" + pareto.markdown(
            report["pareto"], report["metric"], latency.get("batch", 64), latency.get("runs", 20)
        )
    chosen = report.get("chosen")
    if chosen:
        text += f"\n## Chosen student\n\nRule: {chosen['rule']}. {chosen['note'].rstrip('.')}.\n"
        if chosen.get("uri"):
            text += (
                f"\nPublished at `{chosen['uri']}` (a later stage can reference it: `teacher:`, `model.weights:`).\n"
            )
        export = chosen.get("export") or {}
        if export.get("error"):
            text += f"\nExport to {export['format']} failed: {export['error']}\n"
        elif export:
            lat = export["latency"]
            text += (
                f"\nExported to {export['format']}: `{export['uri']}`; max abs difference vs PyTorch "
                f"{export['max_abs_diff']:.2e} (tolerance {export['tolerance']:g}), argmax agreement "
                f"{export['argmax_agreement']:.4f}; latency at batch {lat['batch']}: {lat['exported_ms']:.3f} ms "
                f"exported, {lat['torch_ms']:.3f} ms PyTorch ({lat['threads']} threads).\n"
            )
    return text


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
