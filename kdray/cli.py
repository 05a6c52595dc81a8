"""The ``kdray`` command line.

    kdray validate examples/fmnist_cnn_to_mlp_hinton.yaml
    kdray run examples/fmnist_cnn_to_mlp_hinton.yaml stages.teacher.optim.epochs=1 --force
    kdray schema > kdray.schema.json
    kdray ls models
    kdray show file://./runs/fmnist-cnn-to-mlp/teacher/<key>
    kdray sweep SPEC --stage student --grid model.name=mlp_64,mlp_128 --grid optim.lr=0.001,0.003
    kdray score SPEC --stage target --layers           # LogME/LEEP of the candidate sources
    kdray submit SPEC --launcher ray|kuberay           # stages on a Ray cluster or as RayJobs
    kdray render SPEC                                  # the RayJob manifests, validated
    kdray export ARTIFACT --format onnx                # the model as ONNX, checked with onnxruntime
    kdray inspect SPEC --stage teacher                 # module tree, parameters, output shapes
    kdray data import ./images s3://bucket/ds          # image folder / IDX / .npz -> Parquet shards

Prefect runs live on the flows side: ``kdray-flow SPEC`` (or ``python flows/pipeline.py SPEC``).

Bad input (a spec, a path, a bucket, a checkpoint) is reported as one paragraph on stderr with
exit code 2 and no traceback.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import re
import sys
import threading
from typing import Any, Iterator, Optional

import typer
import typer.rich_utils
from rich.console import Console
from rich.table import Table

from kdray.adapt.methods import ADAPT_METHODS
from kdray.core.checkpoint import open_artifact, read_artifact, write_artifact
from kdray.core.data import DATASETS
from kdray.core.errors import KdrayError
from kdray.core.files import import_dataset
from kdray.core.models import MODELS
from kdray.core.registry import Registry, did_you_mean
from kdray.core.shifts import SHIFTS
from kdray.core.stage import STAGE_KINDS
from kdray.core.storage import Storage
from kdray.core.usercode import from_user_code
from kdray.distill.losses import LOSSES
from kdray.engine import progress
from kdray.engine.concurrency import needs_ray
from kdray.engine.driver import Interrupted, catch_signals, ensure_ray, shutdown_ray
from kdray.engine.export import export_artifact, summary
from kdray.engine.inspect import inspect_model, stage_model_and_batch
from kdray.engine.inspect import render as render_modules
from kdray.engine.pipeline import parent_artifacts, plan, run_pipeline
from kdray.engine.preflight import preflight
from kdray.engine.spec import json_schema, load_pipeline
from kdray.engine.submit import render_command, submit_command
from kdray.engine.sweep import load_sweep, parse_grid, run_sweep, sample_settings
from kdray.transfer.mapping import MATCH_STRATEGIES
from kdray.transfer.scoring import score_layers, score_sources

# typer draws help and usage errors with rich, forced to a terminal's codes under GITHUB_ACTIONS or
# PY_COLORS even into a file or pipe; kdray follows rich's own rule instead: codes only on a terminal, or
# with FORCE_COLOR; never colours with NO_COLOR (rich reads it).
typer.rich_utils.FORCE_TERMINAL = True if os.environ.get("FORCE_COLOR") else None

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="kdray: knowledge distillation, transfer and domain adaptation on Ray.",
)


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"kdray {importlib.metadata.version('kdray')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True, help="print the version"),
) -> None:
    """kdray: knowledge distillation, transfer and domain adaptation on Ray."""


DEBUG = False  # --debug (anywhere on the command line): a user error's full traceback too


def fail(err: KdrayError) -> None:
    if DEBUG and err.details:
        typer.echo(err.details.rstrip(), err=True)
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(err.exit_code)


def guarded(fn):
    """Turn a KdrayError, or an exception raised in the user's own code, into one paragraph and exit
    code 2; let real bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KdrayError as e:
            fail(e)
        except Exception as e:
            err = from_user_code(e)
            if err is None:
                raise
            fail(err)

    return wrapper


@app.command()
@guarded
def validate(
    spec: str = typer.Argument(..., help="pipeline YAML file"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides"),
) -> None:
    """Check a pipeline spec (fields, registry names, stage references) without running it."""

    p = load_pipeline(spec, overrides or [])
    preflight(p, spec)
    typer.echo(
        f"{spec}: OK — pipeline {p.name!r}, {len(p.stages)} stages: "
        + ", ".join(f"{s.name} ({s.kind})" for s in p.stages)
    )


@app.command()
@guarded
def run(
    spec: str = typer.Argument(..., help="pipeline YAML file"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides"),
    force: bool = typer.Option(False, "--force", help="rerun stages even if their artifact exists"),
    only: Optional[list[str]] = typer.Option(None, "--only", help="run only this stage (repeatable)"),
    json_out: bool = typer.Option(False, "--json", help="print the stage outcomes as JSON"),
    max_concurrent: Optional[int] = typer.Option(
        None, "--max-concurrent", min=1, help="run at most this many stages at once (default: as CPUs allow)"
    ),
) -> None:
    """Run a pipeline here: embedded Ray (or run.address), artifacts to the spec's storage. Stages that do
    not depend on each other run at the same time, as far as the CPUs allow."""

    p = load_pipeline(spec, overrides or [])
    running: list[str] = []

    def log(message: str) -> None:
        started = re.match(r"\[[^\]]*\] stage (\S+) \(", message)
        if started:
            running.append(started.group(1))
        typer.echo(message, err=True)

    try:
        with catch_signals(), live_progress(p):  # SIGINT/SIGTERM: one line, exit 130/143, Ray shut down
            outcomes = run_pipeline(p, force=force, only=only or None, log=log, max_concurrent=max_concurrent)
    except Interrupted as e:
        stop_after_signal(e, f"in stage {', '.join(running)}" if running else "before the first stage", spec)
    if json_out:
        typer.echo(json.dumps([o.to_json() for o in outcomes], indent=2))
        return
    for o in outcomes:
        typer.echo(f"{o.stage:<16} {o.kind:<9} {o.status:<7} {o.seconds:7.1f}s  {o.uri}")
    for o in outcomes:
        if o.kind == "evaluate":
            print_results(open_artifact(o.uri))


def stop_after_signal(e: Interrupted, where: str, spec: str) -> None:
    """One line saying where the run stopped and how to resume; Ray shut down; exit 130 or 143."""
    shutdown_ray()
    typer.echo(
        f"interrupted by {e} {where} of {spec}: rerun the same command to resume "
        "(finished stages are cached; a stage on Ray resumes from its last checkpoint).",
        err=True,
    )
    if threading.active_count() > 1:  # stage threads still running: end the process now, without them
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.exit_code)
    raise typer.Exit(e.exit_code)


@contextlib.contextmanager
def live_progress(p: Any) -> Iterator[None]:
    """On a terminal, one progress hub for the whole run, so stages run in child processes show their
    live bars here too (without it each fit shows its own, and a child's goes to a pipe as plain lines)."""
    ray_stages = [s for s in p.stages if needs_ray(p, s)]
    if not ray_stages or not sys.stderr.isatty():
        yield
        return
    ensure_ray(p.run_for(ray_stages[0]))
    with progress.hub():
        yield


def print_results(art: Any) -> None:
    """An evaluate stage's results as a table sized for the terminal, then where its reports are
    (the full table, every column, stays in report.md)."""
    report = art.read_json("report.json")
    table = Table(title=f"{report['pipeline']}: test split of {report['data']['name']} ({report['test_examples']:,})")
    for header in ("stage", "model", "top-1", "parameters", "latency ms", "agreement", "gain"):
        table.add_column(header, justify="left" if header in ("stage", "model") else "right", overflow="fold")
    for r in report["models"]:
        agreement = f"{r['agreement']:.4f} with {r['teacher']}" if "agreement" in r else ""
        gain = f"{r['gain_over_scratch']:+.4f} over {r['scratch']}" if "gain_over_scratch" in r else ""
        table.add_row(
            r["stage"],
            r["model"],
            f"{r['top1']:.4f}",
            f"{r['parameters']:,}",
            f"{r['latency_ms']:.2f}",
            agreement,
            gain,
        )
    console = Console()  # no colour codes when stdout is not a terminal
    console.print()
    console.print(table)
    for name in ("report.md", "report.html", "curves.png", "comparison.png"):
        if art.exists(name):
            console.print(f"  {name:<15} {art.store.uri(name)}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def schema() -> None:
    """Print the JSON Schema of pipeline specs (for editor validation of YAML)."""

    typer.echo(json.dumps(json_schema(), indent=2))


REGISTRIES: dict[str, Registry] = {
    "models": MODELS,
    "datasets": DATASETS,
    "losses": LOSSES,
    "stages": STAGE_KINDS,
    "shifts": SHIFTS,
    "adapt-methods": ADAPT_METHODS,
    "transfer-strategies": MATCH_STRATEGIES,
}


@app.command("ls")
@guarded
def ls(what: str = typer.Argument("models", help=f"one of: {', '.join(REGISTRIES)}, or a storage URI")) -> None:
    """List registered names (models, datasets, losses, ...) or the finished artifacts under a storage URI."""
    if "://" in what or what.startswith(("/", ".")):
        store = Storage(what)
        rows = []
        for rel in store.find("manifest.json"):  # bounded, never follows links
            if "/" not in rel or re.search(r"(^|/)v/[0-9a-f]{16}/manifest\.json$", rel):
                continue  # a version folder's copy: its artifact is listed once, by its own manifest
            try:
                art = read_artifact(store.child(rel.rsplit("/", 1)[0]))
                if art:
                    m = art.manifest
                    rows.append([f"{m['pipeline']}/{m['stage']}", m["kind"], m["key"], art.uri])
            except (KdrayError, KeyError) as e:  # one broken artifact does not hide the others
                typer.echo(
                    f"warning: skipped {store.uri(rel)}: {e if isinstance(e, KdrayError) else 'missing ' + str(e)}",
                    err=True,
                )
        for line in aligned(rows):
            typer.echo(line)
        return
    reg = registry(what)
    rows = []
    for name in reg.names():
        doc = (getattr(reg.get(name), "__doc__", None) or "").strip().splitlines()
        rows.append([name, doc[0] if doc else "", f"from {reg.origin(name)}"])
    for line in aligned(rows):
        typer.echo(line)


def aligned(rows: list[list[str]]) -> list[str]:
    """Rows as lines whose columns line up (two spaces apart; the last column is not padded)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)] if rows else []
    return ["  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]).rstrip() for r in rows]


def registry(what: str) -> Registry:
    if what not in REGISTRIES:
        raise KdrayError(f"nothing to list called {what!r}; {did_you_mean(what, list(REGISTRIES))}")
    return REGISTRIES[what]


@app.command()
@guarded
def show(uri: str = typer.Argument(..., help="artifact URI (a stage's output folder)")) -> None:
    """Print an artifact's manifest (and its report, for an evaluate stage)."""

    art = open_artifact(uri)
    m = art.manifest
    facts = [["pipeline", str(m.get("pipeline"))], ["stage", f"{m.get('stage')} ({m.get('kind')})"]]
    facts += [["key", str(m.get("key"))], ["uri", art.uri]]
    if isinstance(m.get("model"), dict):
        facts.append(["model", str(m["model"].get("name"))])
    facts += [
        [k, progress.number(v)]
        for k, v in (m.get("metrics") or {}).items()
        if isinstance(v, (int, float)) and k not in ("loop_started", "lr")
    ]
    for line in aligned(facts):
        typer.echo(line)
    typer.echo("")
    typer.echo(json.dumps(m, indent=2, default=str))
    if art.exists("report.md"):
        typer.echo(art.read_bytes("report.md").decode(errors="replace"))  # checked: no link out of the artifact


@app.command()
@guarded
def sweep(
    spec: str = typer.Argument(..., help="pipeline YAML file"),
    stage: Optional[str] = typer.Option(None, "--stage", help="the stage to sweep (train, distill or transfer)"),
    grid: Optional[list[str]] = typer.Option(None, "--grid", help="key.path=v1,v2 (repeatable): trials = product"),
    space: Optional[str] = typer.Option(
        None, "--sweep", help="a sweep spec YAML: stage, space (grid/choice/uniform/loguniform/randint), num_samples"
    ),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides"),
    max_concurrent: int = typer.Option(2, "--max-concurrent", min=1, help="trials running at once"),
    metric: str = typer.Option("val_acc", help="what ranks the trials: a validation metric (val_acc, val_loss)"),
    mode: str = typer.Option("max", help="max or min (val_loss: min)"),
) -> None:
    """Run many variants of one stage (students x hyperparameters) as Ray Tune trials, ranked in a report."""

    p = load_pipeline(spec, overrides or [])
    trials: Any
    options: dict[str, Any] = {"max_concurrent": max_concurrent, "metric": metric, "mode": mode}
    if space:
        sw = load_sweep(space)
        stage, trials, options = stage or sw.stage, sample_settings(sw), sw.options()  # with scheduler, choose
    elif stage and grid:
        trials = parse_grid(grid)
    else:
        raise KdrayError(
            "kdray sweep needs --stage and --grid key=v1,v2, or --sweep SWEEP.yaml",
            hint="e.g. kdray sweep SPEC --stage student --grid optim.lr=0.001,0.003",
        )
    report = run_sweep(p, stage, trials, **options, log=lambda m: typer.echo(m, err=True))
    typer.echo(f"sweep report: {report['uri']}")
    if (report.get("chosen") or {}).get("uri"):
        typer.echo(f"chosen student: {report['chosen']['uri']}")


@app.command("export")
@guarded
def export_cmd(
    artifact: str = typer.Argument(..., help="artifact URI of a train, distill, transfer or adapt stage"),
    fmt: str = typer.Option("onnx", "--format", help="onnx or torchscript"),
    tolerance: float = typer.Option(1e-4, help="largest allowed abs difference from PyTorch's outputs"),
    latency_batch: int = typer.Option(128, "--latency-batch", min=1, help="batch size the latency is measured at"),
) -> None:
    """Export a model (ONNX checked with onnxruntime, or TorchScript) next to its artifact, with exports.json."""

    record = export_artifact(artifact, fmt, tolerance=tolerance, latency_batch=latency_batch)
    typer.echo(summary(record))


data_app = typer.Typer(no_args_is_help=True, help="Datasets from files: convert them into Parquet shards.")
app.add_typer(data_app, name="data")


@data_app.command("import")
@guarded
def data_import(
    src: str = typer.Argument(..., help="an image folder (<class>/<file>.png), a folder of IDX files, or an .npz"),
    dest: str = typer.Argument(..., help="where the shards and dataset.json go: a folder, file:// or s3:// URI"),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=1, help="resize images to this square size"),
    channels: Optional[int] = typer.Option(None, "--channels", min=1, max=3, help="1 (grey) or 3 (RGB)"),
    shard_rows: int = typer.Option(10_000, "--shard-rows", min=1, help="images per Parquet shard"),
    test_fraction: float = typer.Option(0.2, "--test-fraction", min=0.0, max=0.9, help="held out without test/"),
    seed: int = typer.Option(0, "--seed", help="seed of the held-out test rows"),
    class_names: Optional[str] = typer.Option(None, "--class-names", help="comma-separated, for IDX and .npz"),
    as_: Optional[str] = typer.Option(
        None, "--as", help="images or arrays (.npz only; default: images when it holds pixels, else arrays)"
    ),
) -> None:
    """Convert SRC into Parquet shards with a dataset.json (classes, counts, mean/std, fingerprint) under DEST."""

    meta = import_dataset(
        src,
        dest,
        as_=as_,
        image_size=image_size,
        channels=channels,
        shard_rows=shard_rows,
        test_fraction=test_fraction,
        seed=seed,
        class_names=class_names.split(",") if class_names else None,
        log=lambda m: typer.echo(m, err=True),
        meter=progress.meter(lambda m: typer.echo(m, err=True)),  # a live bar on a terminal, else plain lines
    )
    size = meta.get("image_size")  # array shards (--as arrays) record a dtype and shape instead
    rows = f"{meta['dtype']} {meta['shape']}" if "dtype" in meta else f"{meta['channels']}x{size}x{size}"
    typer.echo(
        f"{dest}: {meta['num_classes']} classes, {rows}, "
        f"train {meta['splits']['train']['rows']:,} / test {meta['splits']['test']['rows']:,}, "
        f"fingerprint {meta['fingerprint']}; use data: {{name: parquet, path: {dest}}}"
    )


@app.command("inspect")
@guarded
def inspect_cmd(
    spec: str = typer.Argument(..., help="pipeline YAML file"),
    stage: str = typer.Option(..., "--stage", help="the stage whose model to show"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides"),
    depth: Optional[int] = typer.Option(None, "--depth", help="show modules down to this nesting depth"),
    batch: int = typer.Option(8, "--batch", min=1, help="examples in the batch run through the model"),
) -> None:
    """Print a stage's module tree with parameter counts and each module's output shape for one batch."""

    p = load_pipeline(spec, overrides or [])
    model, x = stage_model_and_batch(p, stage, batch)
    typer.echo(f"stage {stage!r}: input {'x'.join(map(str, x.shape))}")
    typer.echo(render_modules(inspect_model(model, x), depth))


@app.command()
@guarded
def score(
    spec: str = typer.Argument(..., help="pipeline YAML file"),
    stage: str = typer.Option(..., "--stage", help="a transfer stage: its candidates (or source) are scored"),
    layers: bool = typer.Option(False, "--layers", help="also score every feature layer of the best source"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides"),
) -> None:
    """Rank candidate sources for a transfer stage by LogME and LEEP on its target data (no training)."""

    p = load_pipeline(spec, overrides or [])
    target = p.stage(stage)
    if target.kind != "transfer":
        raise KdrayError(f"--stage {stage!r} is a {target.kind} stage; score ranks the sources of a transfer stage")
    keys = plan(p)
    parents = parent_artifacts(p, target, keys)
    rows = score_sources(parents, target.data)
    typer.echo("| rank | source | model | LogME | LEEP |\n|---|---|---|---|---|")
    for r in rows:
        typer.echo(f"| {r['rank']} | {r['ref']} | {r['model']} | {r['logme']:+.4f} | {r['leep']:+.4f} |")
    result: dict[str, Any] = {"stage": stage, "sources": rows}
    if layers:
        result["layers"] = score_layers(parents[rows[0]["ref"]], target.data)
        for r in result["layers"]:
            typer.echo(f"  {rows[0]['ref']}.{r['layer']:<12} ({r['dims']} dims) LogME {r['logme']:+.4f}")
    store = Storage(p.storage.uri).child(f"{p.name}/_scores/{stage}-{keys[stage]}")
    write_artifact(
        store,
        {"kind": "score", "pipeline": p.name, "stage": stage, "key": keys[stage], "metrics": {"best": rows[0]["ref"]}},
        None,
        {"ranking.json": json.dumps(result, indent=2).encode()},
    )
    typer.echo(f"ranking: {store.uri()}")


@app.command()
@guarded
def submit(
    spec: str = typer.Argument(..., help="pipeline YAML file"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides"),
    launcher: str = typer.Option(
        "kuberay", "--launcher", help="ray (an existing cluster) or kuberay (a RayJob per stage)"
    ),
    only: Optional[list[str]] = typer.Option(None, "--only", help="submit only this stage (repeatable)"),
    force: bool = typer.Option(False, "--force", help="rerun stages even if their artifact exists"),
) -> None:
    """Run a pipeline's stages on a cluster: the Ray Job Submission API or KubeRay RayJobs."""

    outcomes = submit_command(
        spec, overrides or [], launcher, only or None, force=force, log=lambda m: typer.echo(m, err=True)
    )
    for o in outcomes:
        typer.echo(f"{o.stage:<16} {o.kind:<9} {o.status:<7} {o.seconds:7.1f}s  {o.uri}")


@app.command()
@guarded
def render(
    spec: str = typer.Argument(..., help="pipeline YAML file"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides"),
    stage: Optional[str] = typer.Option(None, "--stage", help="only this stage"),
) -> None:
    """Print the KubeRay RayJob manifests the kuberay launcher would create (validated)."""

    typer.echo(render_command(spec, overrides or [], stage))


def value_name(marker: str | None) -> str | None:
    """``<int range>`` -> ``INTEGER``, ``<list[str]>`` -> ``TEXT``: what a value is, as click names it."""
    if not marker:
        return None
    bare = marker.strip("<>").replace(" range", "").removeprefix("list[").removesuffix("]")
    return {"str": "TEXT", "int": "INTEGER", "float": "NUMBER"}.get(bare, bare.upper())


def plain_help(command: Any) -> None:
    """Help without typer's type markers (``<bool>``, ``<list[str]>``): flags and arguments show none,
    an option that takes a value shows click's name for it (``TEXT``, ``INTEGER``)."""
    for param in command.params:
        takes_value = param.param_type_name == "option" and not getattr(param, "is_flag", False)
        shown = param.display_type_rich if takes_value else (lambda ctx: None)
        param.display_type_rich = lambda ctx, shown=shown: value_name(shown(ctx))  # type: ignore[attr-defined]
    help_option = command.get_help_option

    def get_help_option(ctx: Any) -> Any:
        option = help_option(ctx)
        if option is not None:
            option.display_type_rich = lambda ctx: None
        return option

    command.get_help_option = get_help_option  # type: ignore[method-assign]
    for sub in getattr(command, "commands", {}).values():
        plain_help(sub)


cluster_app = typer.Typer(no_args_is_help=True, help="A local Ray cluster that every kdray command here joins.")
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("up")
@guarded
def cluster_up(cpus: Optional[int] = typer.Option(None, "--cpus", min=1, help="CPUs it offers (default: all)")) -> None:
    """Start a Ray cluster on this machine that `kdray run` (and flows) join instead of starting their own."""
    from kdray.engine import cluster
    from kdray.engine.driver import RAY_ENV

    doc, started = cluster.up(RAY_ENV, cpus)
    typer.echo(
        f"Ray cluster {'up' if started else 'already up'} at {doc['address']} ({doc['cpus']} CPUs, "
        f"auth {doc.get('auth_mode', 'token')}), recorded in {cluster.cluster_file()}: kdray commands on this "
        "machine join it (a stage's run.address still wins). Stop it with: kdray cluster down"
    )


@cluster_app.command("down")
@guarded
def cluster_down() -> None:
    """Stop the cluster `kdray cluster up` started (only its processes)."""
    from kdray.engine import cluster

    doc = cluster.down()
    typer.echo(f"Ray cluster at {doc['address']} stopped." if doc else "No kdray cluster is recorded here.")


def main() -> None:
    global DEBUG
    if "--debug" in sys.argv[1:]:
        sys.argv.remove("--debug")
        DEBUG = True
    try:
        command = typer.main.get_command(app)
        plain_help(command)
        command()
    except KdrayError as e:  # raised outside a command (argument parsing, imports)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
