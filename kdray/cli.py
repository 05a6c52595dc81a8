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

Prefect runs live on the flows side: ``kdray-flow SPEC`` (or ``python flows/pipeline.py SPEC``).

Bad input (a spec, a path, a bucket, a checkpoint) is reported as one paragraph on stderr with
exit code 2 and no traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Optional

import typer

from kdray.adapt.methods import ADAPT_METHODS
from kdray.core.checkpoint import open_artifact, read_artifact, write_artifact
from kdray.core.data import DATASETS
from kdray.core.errors import KdrayError
from kdray.core.models import MODELS
from kdray.core.registry import Registry, did_you_mean
from kdray.core.shifts import SHIFTS
from kdray.core.stage import STAGE_KINDS
from kdray.core.storage import Storage
from kdray.distill.losses import LOSSES
from kdray.engine.pipeline import parent_artifacts, plan, run_pipeline
from kdray.engine.spec import json_schema, load_pipeline
from kdray.engine.submit import render_command, submit_command
from kdray.engine.sweep import parse_grid, run_sweep
from kdray.transfer.mapping import MATCH_STRATEGIES
from kdray.transfer.scoring import score_layers, score_sources

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="kdray: knowledge distillation, transfer and domain adaptation on Ray.",
)


def fail(err: KdrayError) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(err.exit_code)


def guarded(fn):
    """Turn a KdrayError into its message and exit code 2; let real bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KdrayError as e:
            fail(e)

    return wrapper


@app.command()
@guarded
def validate(
    spec: str = typer.Argument(..., help="pipeline YAML file"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides"),
) -> None:
    """Check a pipeline spec (fields, registry names, stage references) without running it."""

    p = load_pipeline(spec, overrides or [])
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
) -> None:
    """Run a pipeline here: embedded Ray (or run.address), artifacts to the spec's storage."""

    p = load_pipeline(spec, overrides or [])
    outcomes = run_pipeline(p, force=force, only=only or None, log=lambda m: typer.echo(m, err=True))
    if json_out:
        typer.echo(json.dumps([o.to_json() for o in outcomes], indent=2))
        return
    for o in outcomes:
        typer.echo(f"{o.stage:<16} {o.kind:<9} {o.status:<7} {o.seconds:7.1f}s  {o.uri}")
    reports = [o for o in outcomes if o.kind == "evaluate"]
    for o in reports:
        typer.echo("")
        typer.echo(open_artifact(o.uri).store.read_bytes("report.md").decode())


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
        for rel in store.list(recursive=True):
            if rel.endswith("/manifest.json"):
                art = read_artifact(store.child(rel.rsplit("/", 1)[0]))
                if art:
                    m = art.manifest
                    typer.echo(f"{m['pipeline']}/{m['stage']}  {m['kind']:<9} {m['key']}  {art.uri}")
        return
    reg = registry(what)
    for name in reg.names():
        doc = (getattr(reg.get(name), "__doc__", None) or "").strip().splitlines()
        typer.echo(f"{name:<22} {doc[0] if doc else ''}")


def registry(what: str) -> Registry:
    if what not in REGISTRIES:
        raise KdrayError(f"nothing to list called {what!r}; {did_you_mean(what, list(REGISTRIES))}")
    return REGISTRIES[what]


@app.command()
@guarded
def show(uri: str = typer.Argument(..., help="artifact URI (a stage's output folder)")) -> None:
    """Print an artifact's manifest (and its report, for an evaluate stage)."""

    art = open_artifact(uri)
    typer.echo(json.dumps(art.manifest, indent=2, default=str))
    if art.store.exists("report.md"):
        typer.echo(art.store.read_bytes("report.md").decode())


@app.command()
@guarded
def sweep(
    spec: str = typer.Argument(..., help="pipeline YAML file"),
    stage: str = typer.Option(..., "--stage", help="the stage to sweep (train, distill or transfer)"),
    grid: list[str] = typer.Option(..., "--grid", help="key.path=v1,v2 (repeatable): the trials are the product"),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides"),
    max_concurrent: int = typer.Option(2, "--max-concurrent", min=1, help="trials running at once"),
    metric: str = typer.Option("test_acc", help="what ranks the trials"),
) -> None:
    """Run many variants of one stage (students x hyperparameters) as Ray Tune trials, ranked in a report."""

    p = load_pipeline(spec, overrides or [])
    report = run_sweep(
        p, stage, parse_grid(grid), max_concurrent=max_concurrent, metric=metric, log=lambda m: typer.echo(m, err=True)
    )
    typer.echo(f"sweep report: {report['uri']}")


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


def main() -> None:
    try:
        app()
    except KdrayError as e:  # raised outside a command (argument parsing, imports)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
