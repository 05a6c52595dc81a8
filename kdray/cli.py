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
    kdray flow run SPEC                                # through Prefect

Bad input (a spec, a path, a bucket, a checkpoint) is reported as one paragraph on stderr with
exit code 2 and no traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from kdray.errors import KdrayError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kdray: knowledge distillation, transfer and domain adaptation on Ray.")


def fail(err: KdrayError) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(err.exit_code)


def guarded(fn):
    """Turn a KdrayError into its message and exit code 2; let real bugs keep their traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KdrayError as e:
            fail(e)

    return wrapper


@app.command()
@guarded
def validate(spec: str = typer.Argument(..., help="pipeline YAML file"),
             overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides")) -> None:
    """Check a pipeline spec (fields, registry names, stage references) without running it."""
    from kdray.specs import load_pipeline

    p = load_pipeline(spec, overrides or [])
    typer.echo(f"{spec}: OK — pipeline {p.name!r}, {len(p.stages)} stages: "
               + ", ".join(f"{s.name} ({s.kind})" for s in p.stages))


@app.command()
@guarded
def run(spec: str = typer.Argument(..., help="pipeline YAML file"),
        overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides"),
        force: bool = typer.Option(False, "--force", help="rerun stages even if their artifact exists"),
        only: Optional[list[str]] = typer.Option(None, "--only", help="run only this stage (repeatable)"),
        json_out: bool = typer.Option(False, "--json", help="print the stage outcomes as JSON")) -> None:
    """Run a pipeline here: embedded Ray (or run.address), artifacts to the spec's storage."""
    from kdray.pipeline import run_pipeline
    from kdray.specs import load_pipeline

    p = load_pipeline(spec, overrides or [])
    outcomes = run_pipeline(p, force=force, only=only or None, log=lambda m: typer.echo(m, err=True))
    if json_out:
        typer.echo(json.dumps([o.to_json() for o in outcomes], indent=2))
        return
    for o in outcomes:
        typer.echo(f"{o.stage:<16} {o.kind:<9} {o.status:<7} {o.seconds:7.1f}s  {o.uri}")
    reports = [o for o in outcomes if o.kind == "evaluate"]
    for o in reports:
        from kdray.checkpoint import open_artifact

        typer.echo("")
        typer.echo(open_artifact(o.uri).store.read_bytes("report.md").decode())


@app.command()
def schema() -> None:
    """Print the JSON Schema of pipeline specs (for editor validation of YAML)."""
    from kdray.specs import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


REGISTRIES = ("models", "datasets", "losses", "stages", "shifts", "adapt-methods")


@app.command("ls")
@guarded
def ls(what: str = typer.Argument("models", help=f"one of: {', '.join(REGISTRIES)}, or a storage URI")) -> None:
    """List registered names (models, datasets, losses, ...) or the finished artifacts under a storage URI."""
    if "://" in what or what.startswith(("/", ".")):
        from kdray.checkpoint import read_artifact
        from kdray.storage import Storage

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


def registry(what: str):
    from kdray.registry import did_you_mean

    if what == "models":
        from kdray.models import MODELS as reg
    elif what == "datasets":
        from kdray.data import DATASETS as reg
    elif what == "losses":
        from kdray.losses import LOSSES as reg
    elif what == "stages":
        from kdray.stages import STAGES as reg
    elif what == "shifts":
        from kdray.shifts import SHIFTS as reg
    elif what == "adapt-methods":
        from kdray.adapt import ADAPT_METHODS as reg
    else:
        raise KdrayError(f"nothing to list called {what!r}; {did_you_mean(what, list(REGISTRIES))}")
    return reg


@app.command()
@guarded
def show(uri: str = typer.Argument(..., help="artifact URI (a stage's output folder)")) -> None:
    """Print an artifact's manifest (and its report, for an evaluate stage)."""
    from kdray.checkpoint import open_artifact

    art = open_artifact(uri)
    typer.echo(json.dumps(art.manifest, indent=2, default=str))
    if art.store.exists("report.md"):
        typer.echo(art.store.read_bytes("report.md").decode())


@app.command()
@guarded
def sweep(spec: str = typer.Argument(..., help="pipeline YAML file"),
          stage: str = typer.Option(..., "--stage", help="the stage to sweep (train, distill or transfer)"),
          grid: list[str] = typer.Option(..., "--grid", help="key.path=v1,v2 (repeatable): the trials are the product"),
          overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides"),
          max_concurrent: int = typer.Option(2, "--max-concurrent", min=1, help="trials running at once"),
          metric: str = typer.Option("test_acc", help="what ranks the trials")) -> None:
    """Run many variants of one stage (students x hyperparameters) as Ray Tune trials, ranked in a report."""
    from kdray.specs import load_pipeline
    from kdray.sweep import parse_grid, run_sweep

    p = load_pipeline(spec, overrides or [])
    report = run_sweep(p, stage, parse_grid(grid), max_concurrent=max_concurrent, metric=metric,
                       log=lambda m: typer.echo(m, err=True))
    typer.echo(f"sweep report: {report['uri']}")


@app.command()
@guarded
def score(spec: str = typer.Argument(..., help="pipeline YAML file"),
          stage: str = typer.Option(..., "--stage", help="a transfer stage: its candidates (or source) are scored"),
          layers: bool = typer.Option(False, "--layers", help="also score every feature layer of the best source"),
          overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides")) -> None:
    """Rank candidate sources for a transfer stage by LogME and LEEP on its target data (no training)."""
    from kdray.checkpoint import write_artifact
    from kdray.pipeline import parent_artifacts, plan
    from kdray.scoring import score_layers, score_sources
    from kdray.specs import load_pipeline
    from kdray.storage import Storage

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
    result = {"stage": stage, "sources": rows}
    if layers:
        result["layers"] = score_layers(parents[rows[0]["ref"]], target.data)
        for r in result["layers"]:
            typer.echo(f"  {rows[0]['ref']}.{r['layer']:<12} ({r['dims']} dims) LogME {r['logme']:+.4f}")
    store = Storage(p.storage.uri).child(f"{p.name}/_scores/{stage}-{keys[stage]}")
    write_artifact(store, {"kind": "score", "pipeline": p.name, "stage": stage, "key": keys[stage],
                           "metrics": {"best": rows[0]["ref"]}}, None,
                   {"ranking.json": json.dumps(result, indent=2).encode()})
    typer.echo(f"ranking: {store.uri()}")


@app.command()
@guarded
def submit(spec: str = typer.Argument(..., help="pipeline YAML file"),
           overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides"),
           launcher: str = typer.Option("kuberay", "--launcher", help="ray (an existing cluster) or kuberay (a RayJob per stage)"),
           only: Optional[list[str]] = typer.Option(None, "--only", help="submit only this stage (repeatable)"),
           force: bool = typer.Option(False, "--force", help="rerun stages even if their artifact exists")) -> None:
    """Run a pipeline's stages on a cluster: the Ray Job Submission API or KubeRay RayJobs."""
    from kdray.launch import submit_command

    outcomes = submit_command(spec, overrides or [], launcher, only or None, force=force,
                              log=lambda m: typer.echo(m, err=True))
    for o in outcomes:
        typer.echo(f"{o.stage:<16} {o.kind:<9} {o.status:<7} {o.seconds:7.1f}s  {o.uri}")


@app.command()
@guarded
def render(spec: str = typer.Argument(..., help="pipeline YAML file"),
           overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides"),
           stage: Optional[str] = typer.Option(None, "--stage", help="only this stage")) -> None:
    """Print the KubeRay RayJob manifests the kuberay launcher would create (validated)."""
    from kdray.launch import render_command

    typer.echo(render_command(spec, overrides or [], stage))


flow_app = typer.Typer(no_args_is_help=True, help="Run pipelines as Prefect flows (flows/).")


@flow_app.command("run")
@guarded
def flow_run(spec: str = typer.Argument(..., help="pipeline YAML: a path, file://... or s3://.../pipeline.yaml"),
             overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value overrides"),
             force: bool = typer.Option(False, "--force", help="rerun stages even if their artifact exists")) -> None:
    """Run a pipeline through Prefect (flows/pipeline.py): a temporary server unless PREFECT_API_URL is set."""
    import os

    # A temporary Prefect server needs longer than Prefect's 20 s default to start on a busy laptop.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        from flows.pipeline import pipeline_flow
    except ModuleNotFoundError as e:
        if e.name != "flows":
            raise
        raise KdrayError("the flows package is not importable",
                         hint="Reinstall kdray so that its flows package is installed too (pip install -e . in "
                              "the repository), or run python -m kdray.cli flow run ... from the repository "
                              "root.") from None
    for o in pipeline_flow(spec, overrides or [], force):
        typer.echo(f"{o['stage']:<16} {o['kind']:<9} {o['status']:<7} {o['seconds']:7.1f}s  {o['uri']}")


app.add_typer(flow_app, name="flow")


def main() -> None:
    try:
        app()
    except KdrayError as e:  # raised outside a command (argument parsing, imports)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
