"""The ``kdray`` command line.

    kdray validate examples/fmnist_cnn_to_mlp_hinton.yaml
    kdray plan examples/fmnist_cnn_to_mlp_hinton.yaml         # which stages would run, which are cached
    kdray run examples/fmnist_cnn_to_mlp_hinton.yaml stages.teacher.optim.epochs=1 --force
    kdray schema > kdray.schema.json
    kdray ls models
    kdray ls runs                                             # the finished artifacts in a folder
    kdray show runs/fmnist-cnn-to-mlp/teacher/<key>
    kdray sweep SPEC --stage student --grid model.name=mlp_64,mlp_128 --grid optim.lr=0.001,0.003
    kdray score SPEC --stage target --layers           # LogME/LEEP of the candidate sources
    kdray submit SPEC --launcher ray|kuberay           # stages on a Ray cluster or as RayJobs
    kdray render SPEC                                  # the RayJob manifests, validated
    kdray export ARTIFACT --format onnx                # the model as ONNX, checked with onnxruntime
    kdray inspect SPEC --stage teacher                 # module tree, parameters, output shapes
    kdray data import ./images s3://bucket/ds          # image folder / IDX / .npz -> Parquet shards

``validate``, ``plan``, ``run``, ``ls`` and ``show`` take ``--json``. Prefect runs live on the flows
side: ``kdray-flow SPEC`` (or ``python flows/pipeline.py SPEC``).

Bad input (a spec, a path, a bucket, a checkpoint) is reported as one paragraph on stderr with
exit code 2 and no traceback.

Everything but typer is imported inside the command that needs it, so ``kdray --help`` and shell
completion answer at once (torch, Ray and pydantic take seconds to import).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import re
import shutil
import sys
import textwrap
import threading
from typing import TYPE_CHECKING, Any, Iterator, Optional

import typer
import typer.rich_utils

from kdray.core import layout
from kdray.core.errors import KdrayError

if TYPE_CHECKING:
    from kdray.core.registry import Registry

# typer draws help and usage errors with rich, forced to a terminal's codes under GITHUB_ACTIONS or
# PY_COLORS even into a file or pipe; kdray follows rich's own rule instead: codes only on a terminal, or
# with FORCE_COLOR; never colours with NO_COLOR (rich reads it).
typer.rich_utils.FORCE_TERMINAL = True if os.environ.get("FORCE_COLOR") else None

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="kdray: knowledge distillation, transfer and domain adaptation on Ray.",
)

# the names `kdray ls` lists, and the module that registers each (imported only when listed)
REGISTRIES = {
    "models": ("kdray.models", "MODELS"),
    "datasets": ("kdray.data.datasets", "DATASETS"),
    "losses": ("kdray.distill.losses", "LOSSES"),
    "stages": ("kdray.contracts.stage", "STAGE_KINDS"),
    "shifts": ("kdray.data.shifts", "SHIFTS"),
    "adapt-methods": ("kdray.adapt.methods", "ADAPT_METHODS"),
    "transfer-strategies": ("kdray.transfer.mapping", "MATCH_STRATEGIES"),
}
NBSP = "\u00a0"  # what textwrap does not break at
REPORT_FILES = ("report.md", "report.html", "report.json", "curves.png", "comparison.png")


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
            from kdray.core.usercode import from_user_code

            err = from_user_code(e)
            if err is None:
                raise
            fail(err)

    return wrapper


# --------------------------------------------------------------------------- shared arguments


def complete_spec(incomplete: str) -> list[str]:
    """Shell completion of a spec argument: folders and YAML files that start with what is typed."""
    folder, _, start = incomplete.rpartition("/")
    try:
        entries = sorted(os.scandir(folder or "."), key=lambda e: e.name)
    except OSError:
        return []
    prefix = f"{folder}/" if folder else ""
    return [
        prefix + e.name + ("/" if e.is_dir() else "")
        for e in entries
        if e.name.startswith(start)
        and not e.name.startswith(".")
        and (e.is_dir() or e.name.endswith((".yaml", ".yml")))
    ]


def complete_ls(incomplete: str) -> list[str]:
    return [n for n in REGISTRIES if n.startswith(incomplete)] + complete_spec(incomplete)


def spec_arg() -> Any:
    return typer.Argument(..., metavar="SPEC", help="the pipeline's YAML file", autocompletion=complete_spec)


def overrides_arg() -> Any:
    return typer.Argument(
        None, metavar="KEY.PATH=VALUE", help="change a field of the spec, e.g. stages.teacher.optim.epochs=1"
    )


def json_opt(what: str) -> Any:
    return typer.Option(False, "--json", help=f"print {what} as JSON on stdout")


def echo_json(doc: Any) -> None:
    typer.echo(json.dumps(doc, indent=2, default=str))


def width() -> int:
    """The columns to fit: the terminal's (or $COLUMNS), 80 when piped."""
    return shutil.get_terminal_size((80, 24)).columns


# --------------------------------------------------------------------------- commands


@app.command()
@guarded
def validate(
    spec: str = spec_arg(),
    overrides: Optional[list[str]] = overrides_arg(),
    json_out: bool = json_opt("the pipeline's name and stages"),
) -> None:
    """Check a pipeline spec (fields, registry names, stage references) without running it."""
    from kdray.core.meter import counted
    from kdray.engine.spec import load_pipeline

    p = load_pipeline(spec, overrides or [])
    from kdray.engine.preflight import preflight

    preflight(p, spec)
    if json_out:
        stages = [{"name": s.name, "kind": s.kind} for s in p.stages]
        echo_json({"spec": spec, "valid": True, "pipeline": p.name, "stages": stages})
        return
    typer.echo(
        f"{spec}: OK, pipeline {p.name!r}, {counted(len(p.stages), 'stage')}: "
        + ", ".join(f"{s.name} ({s.kind})" for s in p.stages)
    )


@app.command("plan")
@guarded
def plan_cmd(
    spec: str = spec_arg(),
    overrides: Optional[list[str]] = overrides_arg(),
    json_out: bool = json_opt("every stage's kind, key, status and artifact"),
) -> None:
    """Show what `kdray run` would do: each stage's kind, key, and whether it is cached or would run."""
    from kdray.core.meter import counted
    from kdray.core.storage import Storage
    from kdray.engine.launchers import artifact_store
    from kdray.engine.pipeline import cached_outcome, plan
    from kdray.engine.spec import load_pipeline

    p = load_pipeline(spec, overrides or [])
    keys = plan(p)
    root = Storage(p.storage.uri)
    rows = []
    for s in p.stages:
        cached = cached_outcome(p, s.name, keys, log=lambda _m: None)
        uri = cached.uri if cached else artifact_store(root, p.name, s.name, keys[s.name]).uri()
        status = "cached" if cached else "would run"
        rows.append({"stage": s.name, "kind": s.kind, "key": keys[s.name], "status": status, "uri": uri})
    if json_out:
        echo_json({"spec": spec, "pipeline": p.name, "storage": root.uri(), "stages": rows})
        return
    for line in aligned(
        [["stage", "kind", "key", "status"], *([r["stage"], r["kind"], r["key"], r["status"]] for r in rows)]
    ):
        typer.echo(line)
    done = sum(r["status"] == "cached" for r in rows)
    typer.echo(f"{counted(len(rows) - done, 'stage')} would run, {done} cached; artifacts under {root.uri(p.name)}.")


@app.command()
@guarded
def run(
    spec: str = spec_arg(),
    overrides: Optional[list[str]] = overrides_arg(),
    force: bool = typer.Option(False, "--force", help="rerun stages even if their artifact exists"),
    only: Optional[list[str]] = typer.Option(None, "--only", metavar="STAGE", help="run only this stage (repeatable)"),
    json_out: bool = json_opt("the stage outcomes (and the evaluate stages' report paths)"),
    max_concurrent: Optional[int] = typer.Option(
        None, "--max-concurrent", min=1, help="run at most this many stages at once (default: as CPUs allow)"
    ),
) -> None:
    """Run a pipeline here (embedded Ray, or run.address), artifacts to the spec's storage; stages that do not depend on each other run at the same time."""
    from kdray.contracts.checkpoint import open_artifact
    from kdray.core.meter import short_time
    from kdray.engine.driver import Interrupted, catch_signals
    from kdray.engine.pipeline import run_pipeline
    from kdray.engine.spec import load_pipeline

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
        docs = []
        for o in outcomes:
            doc = o.to_json()
            if o.kind == "evaluate":
                doc["reports"] = report_uris(open_artifact(o.uri))
            docs.append(doc)
        echo_json(docs)
        return
    rows = [[o.stage, o.kind, o.status, short_time(o.seconds), o.uri] for o in outcomes]
    for line in aligned(rows):
        typer.echo(line)
    for o in outcomes:
        if o.kind == "evaluate":
            print_results(open_artifact(o.uri))


def report_uris(art: Any) -> dict[str, str]:
    """The report files an evaluate stage published, by name."""
    return {name: art.store.uri(name) for name in REPORT_FILES if art.exists(name)}


def stop_after_signal(e: Any, where: str, spec: str) -> None:
    """One line saying where the run stopped and how to resume; Ray shut down; exit 130 or 143."""
    from kdray.engine.driver import shutdown_ray

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
    from kdray.engine import progress
    from kdray.engine.driver import ensure_ray
    from kdray.engine.pipeline import plan
    from kdray.engine.resolved import resolve

    ray_stages = [s for s in resolve(p, plan(p)).values() if s.needs_ray]
    if not ray_stages or not sys.stderr.isatty():
        yield
        return
    ensure_ray(ray_stages[0].run)
    with progress.hub():
        yield


# --------------------------------------------------------------------------- an evaluate stage's results


def short_model(name: str, limit: int = 20) -> str:
    """A model's name for a narrow column: an import path's last part (``nets.py:WideCNN`` -> ``WideCNN``)."""
    short = re.split(r"[:./]", name)[-1] if ":" in name else name
    return short if len(short) <= limit else short[: limit - 3] + "..."


def results_lines(report: dict[str, Any], columns: int) -> list[str]:
    """An evaluate stage's results in ``columns`` characters: a table when it fits, else one record per
    model; then what each column measures and what each model is compared with."""
    from kdray.evaluate.figures import LEGEND, spread
    from kdray.evaluate.stage import legend

    rows = report["models"]
    fields: list[tuple[str, Any]] = [
        ("stage", lambda r: r["stage"]),
        ("model", lambda r: short_model(r["model"])),
        ("top-1", lambda r: f"{r['top1']:.4f}"),
        ("params", lambda r: f"{r['parameters']:,}"),
        ("latency", spread),
    ]
    if any("agreement" in r for r in rows):
        fields.append(("agreement", lambda r: f"{r['agreement']:.4f}" if "agreement" in r else ""))
    if any("gain_over_scratch" in r for r in rows):
        fields.append(("gain", lambda r: f"{r['gain_over_scratch']:+.4f}" if "gain_over_scratch" in r else ""))
    cells = [[name for name, _ in fields], *([str(cell(r)) for _, cell in fields] for r in rows)]
    title = f"{report['pipeline']}: test split of {report['data']['name']} ({report['test_examples']:,} examples)"
    lines = textwrap.wrap(title, columns) + [""]
    table = aligned(cells)
    if max(len(line) for line in table) <= columns:
        lines += table
    else:  # too narrow for a table: one record per model, its figures wrapped as whole "name value" pairs
        for r, row in zip(rows, cells[1:]):
            lines += textwrap.wrap(f"{r['stage']} ({r['kind']}, {short_model(r['model'], 40)})", columns)
            pairs = [f"{name} {value}".replace(" ", NBSP) for (name, _), value in zip(fields[2:], row[2:]) if value]
            wrapped = textwrap.wrap("  ".join(pairs), columns, initial_indent="  ", subsequent_indent="  ")
            lines += [line.replace(NBSP, " ") for line in wrapped]  # a figure stays beside its name
    batch = max((r.get("latency_batch", 0) for r in rows), default=0)
    shown = [name for name, _ in fields if name in LEGEND]
    lines.append("")
    for text in legend(shown, batch):
        lines += textwrap.wrap(text, columns, subsequent_indent="  ", break_on_hyphens=False)
    for r in rows:
        against = [f"teacher {r['teacher']!r}"] if "teacher" in r else []
        against += [f"baseline {r['scratch']!r}"] if "scratch" in r else []
        if against:
            lines += textwrap.wrap(
                f"{r['stage']} is compared with its {' and its '.join(against)}.", columns, break_on_hyphens=False
            )
    return lines


def print_results(art: Any) -> None:
    """An evaluate stage's results sized for the terminal (80 columns when piped), then where its reports
    are (the full table, every column, is in report.md and report.html)."""
    columns = width()
    typer.echo("")
    for line in results_lines(art.read_json("report.json"), columns):
        typer.echo(line)
    for name, uri in report_uris(art).items():
        if name != "report.json":
            typer.echo(f"  {name:<15} {uri}")


# --------------------------------------------------------------------------- looking around


@app.command()
def schema() -> None:
    """Print the JSON Schema of pipeline specs (for editor validation of YAML)."""
    from kdray.engine.spec import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


def registry(what: str) -> Registry:
    import importlib

    module, name = REGISTRIES[what]
    importlib.import_module("kdray.engine.spec")  # registers every built-in entry (file datasets, stage kinds, ...)
    return getattr(importlib.import_module(module), name)


def describe(obj: Any) -> str:
    """The first paragraph of a docstring as plain text (no reStructuredText roles or literals)."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    first = " ".join(doc.split("\n\n", 1)[0].split())
    first = re.sub(r",? see :[a-z]+:`[^`]+`", "", first)  # a pointer into the code means nothing here
    first = re.sub(r",?\s*(see\s+)?``kdray(\.\w+)+``(?=[),;])", "", first)
    first = re.sub(r":[a-z]+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], first)
    return re.sub(r"``([^`]+)``", r"\1", first)


def is_folder_like(what: str) -> bool:
    return "://" in what or what.startswith(("/", ".", "~")) or os.path.exists(what)


@app.command("ls")
@guarded
def ls(
    what: str = typer.Argument(
        "models",
        metavar="WHAT",
        help=f"one of: {', '.join(REGISTRIES)}; or a folder or storage URI (runs, ./runs, s3://bucket/prefix)",
        autocompletion=complete_ls,
    ),
    json_out: bool = json_opt("the entries (or artifacts)"),
) -> None:
    """List registered names (models, datasets, losses, ...) or the finished artifacts in a folder or under a storage URI."""
    if what in REGISTRIES:
        list_registry(what, json_out)
    elif is_folder_like(what):
        list_artifacts(what, json_out)
    else:
        from kdray.core.registry import did_you_mean

        raise KdrayError(
            f"nothing to list called {what!r}: no such registry or folder; {did_you_mean(what, list(REGISTRIES))}",
            hint="Give a registry name, or the folder or storage URI of finished artifacts (e.g. ./runs).",
        )


def list_registry(what: str, json_out: bool) -> None:
    """Name and description, wrapped to the terminal; an entry a plug-in added also says where from."""
    reg = registry(what)
    entries = [{"name": n, "description": describe(reg.get(n)), "origin": reg.origin(n)} for n in reg.names()]
    if json_out:
        echo_json(entries)
        return
    name_w = max((len(e["name"]) for e in entries), default=0)
    text_w = max(width() - name_w - 2, 30)
    for e in entries:
        text = e["description"] + ("" if e["origin"].startswith("kdray.") else f" (from {e['origin']})")
        wrapped = textwrap.wrap(text, text_w, break_on_hyphens=False) or [""]
        typer.echo(f"{e['name']:<{name_w}}  {wrapped[0]}".rstrip())
        for more in wrapped[1:]:
            typer.echo(f"{'':<{name_w}}  {more}")


def list_artifacts(where: str, json_out: bool) -> None:
    from kdray.contracts.checkpoint import read_artifact
    from kdray.core.storage import Storage

    store = Storage(where)
    if store.scheme == "file" and not os.path.isdir(store.root):
        raise KdrayError(
            f"no folder {where!r} (looked for {store.root}).",
            hint="Give the folder of a pipeline's storage.uri, e.g. ./runs after `kdray run`.",
        )
    rows = []
    for rel in store.find("manifest.json"):  # bounded, never follows links
        if "/" not in rel or re.search(r"(^|/)v/[0-9a-f]{16}/manifest\.json$", rel):
            continue  # a version folder's copy: its artifact is listed once, by its own manifest
        try:
            art = read_artifact(store.child(rel.rsplit("/", 1)[0]))
            if art:
                m = art.manifest
                rows.append(
                    {"pipeline": m["pipeline"], "stage": m["stage"], "kind": m["kind"], "key": m["key"], "uri": art.uri}
                )
        except (KdrayError, KeyError) as e:  # one broken artifact does not hide the others
            reason = e if isinstance(e, KdrayError) else f"its manifest has no {e}"
            typer.echo(f"warning: skipped {store.uri(rel)}: {reason}", err=True)
    if json_out:
        echo_json(rows)
        return
    if not rows:
        typer.echo(f"no finished artifacts in {store.uri()}", err=True)
    for line in aligned([[f"{r['pipeline']}/{r['stage']}", r["kind"], r["key"], r["uri"]] for r in rows]):
        typer.echo(line)


def aligned(rows: list[list[str]]) -> list[str]:
    """Rows as lines whose columns line up (two spaces apart; the last column is not padded)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)] if rows else []
    return ["  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]).rstrip() for r in rows]


@app.command()
@guarded
def show(
    uri: str = typer.Argument(..., metavar="ARTIFACT", help="a stage's artifact: its folder or storage URI"),
    json_out: bool = json_opt("the manifest (and an evaluate stage's report.json)"),
) -> None:
    """Print what an artifact holds: its stage, key, model and metrics (and an evaluate stage's results)."""
    from kdray.contracts.checkpoint import open_artifact
    from kdray.core.meter import number, short_time

    art = open_artifact(uri)
    m = art.manifest
    for name in ("report.json", "report.md"):  # read (so checked: its digest, no link out of the artifact)
        if art.exists(name):
            art.read_bytes(name)
    if json_out:
        doc: dict[str, Any] = {"uri": art.uri, "manifest": m}
        if art.exists("report.json"):
            doc["report"] = art.read_json("report.json")
        echo_json(doc)
        return
    facts = [["pipeline", str(m.get("pipeline"))], ["stage", f"{m.get('stage')} ({m.get('kind')})"]]
    facts += [["key", str(m.get("key"))], ["uri", art.uri]]
    if isinstance(m.get("model"), dict):
        facts.append(["model", str(m["model"].get("name"))])
    facts += [
        [k, short_time(v) if k.endswith("_seconds") else number(v)]
        for k, v in (m.get("metrics") or {}).items()
        if isinstance(v, (int, float)) and k not in ("loop_started", "lr")
    ]
    files = sorted((m.get("files") or {}).keys()) if isinstance(m.get("files"), dict) else []
    if files:
        facts.append(["files", ", ".join(files)])
    for line in aligned(facts):
        typer.echo(line)
    if art.exists("report.json"):
        print_results(art)


# --------------------------------------------------------------------------- more than one run


@app.command()
@guarded
def sweep(
    spec: str = spec_arg(),
    stage: Optional[str] = typer.Option(None, "--stage", help="the stage to sweep (train, distill or transfer)"),
    grid: Optional[list[str]] = typer.Option(
        None, "--grid", metavar="KEY=V1,V2", help="values of one field (repeatable): the trials are every combination"
    ),
    space: Optional[str] = typer.Option(
        None, "--sweep", metavar="SWEEP", help="a sweep spec YAML: stage, space, num_samples (docs/sweeps.md)"
    ),
    overrides: Optional[list[str]] = overrides_arg(),
    max_concurrent: int = typer.Option(2, "--max-concurrent", min=1, help="trials running at once"),
    metric: str = typer.Option("val_acc", help="what ranks the trials: a validation metric (val_acc, val_loss)"),
    mode: str = typer.Option("max", help="max or min (val_loss: min)"),
) -> None:
    """Run many variants of one stage (students x hyperparameters) as Ray Tune trials, ranked in a report."""
    from kdray.engine.spec import load_pipeline
    from kdray.sweeps.spec import load_sweep, parse_grid, sample_settings
    from kdray.sweeps.sweep import run_sweep

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
            "kdray sweep needs --stage and --grid key=v1,v2, or --sweep SWEEP.yaml.",
            hint="For example: kdray sweep SPEC --stage student --grid optim.lr=0.001,0.003.",
        )
    report = run_sweep(p, stage, trials, **options, log=lambda m: typer.echo(m, err=True))
    typer.echo(f"sweep report: {report['uri']}")
    if (report.get("chosen") or {}).get("uri"):
        typer.echo(f"chosen student: {report['chosen']['uri']}")


@app.command("export")
@guarded
def export_cmd(
    artifact: str = typer.Argument(
        ..., metavar="ARTIFACT", help="the artifact of a train, distill, transfer or adapt stage"
    ),
    fmt: str = typer.Option("onnx", "--format", help="onnx, torchscript or hf (a Hugging Face folder)"),
    tolerance: float = typer.Option(1e-4, help="largest allowed abs difference from PyTorch's outputs"),
    latency_batch: int = typer.Option(128, "--latency-batch", min=1, help="batch size the latency is measured at"),
) -> None:
    """Export a model (ONNX checked with onnxruntime, TorchScript, or a Hugging Face folder) next to its artifact, with exports.json."""
    from kdray.evaluate.export import export_artifact, summary

    record = export_artifact(artifact, fmt, tolerance=tolerance, latency_batch=latency_batch)
    typer.echo(summary(record))


data_app = typer.Typer(no_args_is_help=True, help="Datasets from files: convert them into Parquet shards.")
app.add_typer(data_app, name="data")


@data_app.command("import")
@guarded
def data_import(
    src: str = typer.Argument(
        ..., metavar="SRC", help="an image folder (<class>/<file>.png), a folder of IDX files, or an .npz"
    ),
    dest: str = typer.Argument(
        ..., metavar="DEST", help="where the shards and dataset.json go: a folder, file:// or s3:// URI"
    ),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=1, help="resize images to this square size"),
    channels: Optional[int] = typer.Option(None, "--channels", min=1, max=3, help="1 (grey) or 3 (RGB)"),
    shard_rows: int = typer.Option(10_000, "--shard-rows", min=1, help="images per Parquet shard"),
    test_fraction: float = typer.Option(
        0.2, "--test-fraction", min=0.0, max=0.9, help="share held out as the test split when SRC has no test/ folder"
    ),
    seed: int = typer.Option(0, "--seed", help="seed of the held-out test rows"),
    class_names: Optional[str] = typer.Option(None, "--class-names", help="comma-separated, for IDX and .npz"),
    as_: Optional[str] = typer.Option(
        None, "--as", help="images, arrays (.npz only; default: images when it holds pixels, else arrays) or text"
    ),
    tokenizer: str = typer.Option(
        "bpe", "--tokenizer", help="--as text: bpe (trained here), bytes or a tokenizer.json"
    ),
    vocab_size: int = typer.Option(1024, "--vocab-size", min=260, help="--as text with bpe: the vocabulary size"),
    seq_len: int = typer.Option(128, "--seq-len", min=2, help="--as text: tokens a packed row"),
    suffix: list[str] = typer.Option([".py"], "--suffix", help="--as text: the file endings of a folder's documents"),
    exclude: list[str] = typer.Option([], "--exclude", help="--as text: leave out paths matching this glob"),
    text_field: str = typer.Option("text", "--text-field", help="--as text: a .jsonl line's text field"),
    val_fraction: float = typer.Option(0.1, "--val-fraction", min=0.0, max=0.5, help="--as text: validation documents"),
) -> None:
    """Convert SRC into Parquet shards with a dataset.json (classes, counts, mean/std, fingerprint) under DEST."""
    from kdray.data.files import import_dataset
    from kdray.engine import progress

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
        text={
            "tokenizer": tokenizer,
            "vocab_size": vocab_size,
            "seq_len": seq_len,
            "suffixes": tuple(suffix),
            "exclude": tuple(exclude),
            "text_field": text_field,
            "test_fraction": test_fraction,
            "val_fraction": val_fraction,
        },
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
    spec: str = spec_arg(),
    stage: str = typer.Option(..., "--stage", help="the stage whose model to show"),
    overrides: Optional[list[str]] = overrides_arg(),
    depth: Optional[int] = typer.Option(None, "--depth", help="show modules down to this nesting depth"),
    batch: int = typer.Option(8, "--batch", min=1, help="examples in the batch run through the model"),
) -> None:
    """Print a stage's module tree with parameter counts and each module's output shape for one batch."""
    from kdray.engine.spec import load_pipeline
    from kdray.evaluate.inspect import inspect_model, stage_model_and_batch
    from kdray.evaluate.inspect import render as render_modules

    p = load_pipeline(spec, overrides or [])
    model, x = stage_model_and_batch(p, stage, batch)
    typer.echo(f"stage {stage!r}: input {'x'.join(map(str, x.shape))}")
    typer.echo(render_modules(inspect_model(model, x), depth))


@app.command()
@guarded
def score(
    spec: str = spec_arg(),
    stage: str = typer.Option(..., "--stage", help="a transfer stage: its candidates (or source) are scored"),
    layers: bool = typer.Option(False, "--layers", help="also score every feature layer of the best source"),
    overrides: Optional[list[str]] = overrides_arg(),
) -> None:
    """Rank candidate sources for a transfer stage by LogME and LEEP on its target data (no training)."""
    from kdray.contracts.checkpoint import write_artifact
    from kdray.core.meter import article
    from kdray.core.storage import Storage
    from kdray.engine.pipeline import parent_artifacts, plan
    from kdray.engine.spec import load_pipeline
    from kdray.transfer.scoring import score_layers, score_sources

    p = load_pipeline(spec, overrides or [])
    target = p.stage(stage)
    if target.kind != "transfer":
        raise KdrayError(
            f"--stage {stage!r} is {article(target.kind)} {target.kind} stage; score ranks the sources of a transfer stage."
        )
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
    store = layout.scores(Storage(p.storage.uri), p.name, stage, keys[stage])
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
    spec: str = spec_arg(),
    overrides: Optional[list[str]] = overrides_arg(),
    launcher: str = typer.Option(
        "kuberay", "--launcher", help="ray (an existing cluster) or kuberay (a RayJob per stage)"
    ),
    only: Optional[list[str]] = typer.Option(
        None, "--only", metavar="STAGE", help="submit only this stage (repeatable)"
    ),
    force: bool = typer.Option(False, "--force", help="rerun stages even if their artifact exists"),
) -> None:
    """Run a pipeline's stages on a cluster: the Ray Job Submission API or KubeRay RayJobs."""
    from kdray.core.meter import short_time
    from kdray.engine.submit import submit_command

    outcomes = submit_command(
        spec, overrides or [], launcher, only or None, force=force, log=lambda m: typer.echo(m, err=True)
    )
    for line in aligned([[o.stage, o.kind, o.status, short_time(o.seconds), o.uri] for o in outcomes]):
        typer.echo(line)


@app.command()
@guarded
def render(
    spec: str = spec_arg(),
    overrides: Optional[list[str]] = overrides_arg(),
    stage: Optional[str] = typer.Option(None, "--stage", help="only this stage"),
) -> None:
    """Print the KubeRay RayJob manifests the kuberay launcher would create (validated)."""
    from kdray.engine.submit import render_command

    typer.echo(render_command(spec, overrides or [], stage))


# --------------------------------------------------------------------------- help text


def value_name(marker: str | None) -> str | None:
    """``<int range>`` -> ``INTEGER``, ``<list[str]>`` -> ``TEXT``: what a value is, as click names it."""
    if not marker:
        return None
    bare = marker.strip("<>").replace(" range", "").removeprefix("list[").removesuffix("]")
    return {"str": "TEXT", "int": "INTEGER", "float": "NUMBER"}.get(bare, bare.upper())


def plain_help(command: Any) -> None:
    """Help without typer's type markers (``<bool>``, ``<list[str]>``): flags and arguments show none,
    an option that takes a value shows its metavar or click's name for it (``TEXT``, ``INTEGER``)."""
    for param in command.params:
        if param.param_type_name == "argument":  # click's usage: SPEC, [WHAT], [KEY.PATH=VALUE]... (not {SPEC})
            name = param.metavar or param.name.upper()
            usage = (name if param.required else f"[{name}]") + ("..." if param.nargs != 1 else "")
            param._usage_display_name = lambda usage=usage: usage  # type: ignore[attr-defined]
            param._rich_display_name = lambda name=name, param=param: name + ("..." if param.nargs != 1 else "")  # type: ignore[attr-defined]
        takes_value = param.param_type_name == "option" and not getattr(param, "is_flag", False)
        shown = param.display_type_rich if takes_value else (lambda ctx: None)
        metavar = getattr(param, "metavar", None) if takes_value else None
        param.display_type_rich = (  # type: ignore[attr-defined]
            lambda ctx, shown=shown, metavar=metavar: metavar or value_name(shown(ctx))
        )
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
