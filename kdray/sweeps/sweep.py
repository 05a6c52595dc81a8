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
import itertools
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

from kdray.contracts.checkpoint import open_artifact, write_artifact
from kdray.contracts.specs import spec_hash
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
    parse_pipeline,
)
from kdray.evaluate.export import ExportError, export_artifact
from kdray.sweeps import pareto
from kdray.sweeps.pareto import ChooseSpec
from kdray.sweeps.report import markdown, plot
from kdray.sweeps.spec import AshaSpec


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
    check_metric(metric, mode)
    sweep = _plan(spec, stage, grid, scheduler, choose, metric, mode)  # every check before any work
    t0 = time.perf_counter()
    _run_shared(sweep, log)
    results = _tune(sweep, max_concurrent, log)
    rows = _ranked(_rows(results, sweep), metric, mode)
    store = layout.sweep(sweep.root, spec.name, stage, sweep.key)
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
        **sweep.extra,
        "stopped": sum(r["status"] == "stopped" for r in rows),
        "pareto": figures,
        "latency": {"batch": latency_batch, "runs": latency_runs, "threads": 1},
        "selection": "validation split only; the test split is not read by the sweep",
    }
    if choose is not None:
        report["chosen"] = choose_student(store, report, figures, choose, sweep.key, log)
    _publish(store, report, figures, sweep)
    log(markdown(report))
    return report


@dataclass
class _Sweep:
    """One sweep, planned: the trials' pipeline document and spec, where they run, and its key."""

    spec: PipelineSpec  # the user's pipeline
    stage: str  # the swept stage
    doc: dict[str, Any]  # the pipeline document with one stage per trial (what each Tune trial parses)
    full: PipelineSpec  # the same, parsed
    trials: list[dict[str, Any]]  # {"trial": name, "settings": {...}}
    run: Any  # the trials' run settings (RunSpec)
    in_trial: bool  # the loop runs inside the Tune trial (workers <= 1)
    asha: Any  # Ray Tune's ASHAScheduler, or None
    metric: str
    mode: str
    extra: dict[str, Any]  # scheduler and choose, as the report records them
    key: str  # the sweep's key: its trials' document, metric, scheduler and choice
    root: Storage  # the pipeline's storage root

    @property
    def names(self) -> list[str]:
        return [t["trial"] for t in self.trials]

    @property
    def title(self) -> str:
        return f"sweep {self.spec.name}/{self.stage}"


def _plan(
    spec: PipelineSpec,
    stage: str,
    grid: dict[str, list[Any]] | list[dict[str, Any]],
    scheduler: AshaSpec | None,
    choose: ChooseSpec | None,
    metric: str,
    mode: str,
) -> _Sweep:
    """The trials as pipeline stages, where they run and the sweep's key; raises before any work."""
    doc, trials = expand(spec, stage, grid)
    # Tune starts each trial in a folder of its own: a relative storage folder (file://./runs) must
    # name the same place there as here
    doc["storage"]["uri"] = Storage(spec.storage.uri).uri()
    full = parse_pipeline(copy.deepcopy(doc))
    run = full.run_for(full.stage(trials[0]["trial"]))
    names = [t["trial"] for t in trials]
    asha = _asha(scheduler, full, names, run.workers, stage, metric, mode)
    in_trial = run.workers <= 1
    if in_trial:  # the loop runs inside the trial: give the trial the worker's CPUs
        for s in doc["stages"]:
            if s["name"] in set(names):
                s["run"] = {**(s.get("run") or {}), "workers": 0}
    extra = {
        "scheduler": scheduler.model_dump(mode="json") if scheduler else None,
        "choose": choose.model_dump(mode="json") if choose else None,
    }
    key = spec_hash({"doc": doc, "metric": metric, **({k: v for k, v in extra.items() if v})})[:12]
    return _Sweep(
        spec, stage, doc, full, trials, run, in_trial, asha, metric, mode, extra, key, Storage(spec.storage.uri)
    )


def _run_shared(sweep: _Sweep, log: Callable[[str], None]) -> None:
    """What every trial reads, once, before any trial: the parents (a teacher), then what the stage's
    kind prepares for its trials (distill's teacher-output cache); then the Ray cluster the trials use."""
    names = [s.name for s in sweep.spec.stages]
    parents = names[: names.index(sweep.stage)]
    if parents:
        run_pipeline(sweep.full, only=parents, log=log)
    _prepare_trials(sweep.full, sweep.names, log)
    ensure_ray(sweep.run)


def _tune(sweep: _Sweep, max_concurrent: int, log: Callable[[str], None]) -> Any:
    """Every trial through Ray Tune, at most ``max_concurrent`` at once, with a progress line."""
    from ray import tune

    resources = {"cpu": sweep.run.cpus_per_worker} if sweep.in_trial else {"cpu": 0.01}
    storage_path, filesystem = layout.ray_storage(sweep.root)
    tuner = tune.Tuner(
        tune.with_resources(_trial, resources),
        param_space={"doc": sweep.doc, "metric": sweep.metric, "trial": tune.grid_search(sweep.names)},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, scheduler=sweep.asha),
        run_config=tune.RunConfig(
            name=f"sweep-{sweep.spec.name}-{sweep.stage}-{sweep.key}",
            storage_path=storage_path,
            storage_filesystem=filesystem,
            verbose=0,
            callbacks=[_progress(len(sweep.trials), sweep.metric, sweep.mode, sweep.title, log)],
        ),
    )
    return tuner.fit()


def _rows(results: Any, sweep: _Sweep) -> list[dict[str, Any]]:
    """One row per trial: its settings, figures, artifact and status (ran, cached or stopped)."""
    keys = plan(sweep.full)
    by_trial = {t["trial"]: t["settings"] for t in sweep.trials}
    metric = sweep.metric
    rows = []
    for result in (results[i] for i in range(len(results))):
        if result.error is not None:
            raise result.error
        m = dict(result.metrics or {})
        trial = (result.config or {})["trial"]
        status, uri = m.get("status"), m.get("uri")
        if status is None:  # Tune stopped it before it published: ASHA, or a cached trial replaying its epochs
            cached = cached_outcome(sweep.full, trial, keys, log=lambda _: None)
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
    return rows


def _ranked(rows: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Best first on ``metric``; a stopped trial (fewer epochs, nothing published) after every finished one."""
    rows = sorted(
        rows,
        key=lambda r: (
            r["status"] == "stopped",
            r[metric] is None,
            -(r[metric] or 0) if mode == "max" else (r[metric] or 0),
        ),
    )
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    return rows


def _publish(store: Storage, report: dict[str, Any], figures: list[dict[str, Any]], sweep: _Sweep) -> None:
    """The report as one artifact (JSON, markdown and the figures), published whole."""
    files = {"sweep.json": json.dumps(report, indent=2).encode(), "sweep.md": markdown(report).encode()}
    for name, png in (
        ("sweep.png", plot(report)),
        ("pareto.png", pareto.plot(figures, f"{sweep.title}: Pareto front")),
    ):
        if png:
            files[name] = png
    rows = report["trials"]
    manifest = {
        "kind": "sweep",
        "pipeline": sweep.spec.name,
        "stage": sweep.stage,
        "key": sweep.key,
        "metrics": {"best": rows[0] if rows else None},
        "chosen": report.get("chosen"),
    }
    write_artifact(store, manifest, None, files)
    report["uri"] = store.uri()


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
