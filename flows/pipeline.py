"""Run a whole pipeline spec as a Prefect flow: one task per stage, each as soon as its parents finish.

    python flows/pipeline.py examples/fmnist_cnn_to_mlp_hinton.yaml [stages.teacher.optim.epochs=1] [--force]
    kdray-flow examples/fmnist_cnn_to_mlp_hinton.yaml      (the same, as an installed command)

Every stage is a submitted task that waits for its parents (``wait_for``), so independent stages run at
the same time, as far as the CPUs allow (``kdray.engine.run_stage`` holds each stage's CPUs and runs a
stage in a child process when another one already runs in this process). Two stages that read the same
parent run one after the other (what they derive from it, such as a teacher cache, is built once), and
without depending on each other's success (``allow_failure``). A failed stage stops only the stages that
depend on it; the others finish and their reports are published, then the flow raises the first failure
with a note naming every failed stage and the stages not run.

Without PREFECT_API_URL, Prefect starts a temporary local server for the run.
"""

from __future__ import annotations

from typing import Any, Optional, cast

from prefect import flow
from prefect.futures import PrefectFuture, wait
from prefect.utilities.annotations import allow_failure

from flows.tasks import load_spec, publish_report, run_stage, spec_from_json


@flow(name="kdray-pipeline", persist_result=True, result_serializer="json")
def pipeline_flow(spec_uri: str, overrides: Optional[list[str]] = None, force: bool = False) -> list[dict[str, Any]]:
    """Run every stage of the pipeline, independent ones concurrently (finished ones are cached), and
    publish its reports."""
    spec = load_spec(spec_uri, list(overrides or []))
    pipeline = spec_from_json(spec)
    reads = {s.name: [ref for _, ref in s.references()] for s in pipeline.stages}
    stages: dict[str, PrefectFuture] = {}
    reports: list[PrefectFuture] = []
    for name, refs in reads.items():
        wait_for: list[Any] = [stages[r] for r in refs if r in stages]  # its parents must finish first
        wait_for += [allow_failure(stages[m]) for m in stages if set(reads[m]) & set(refs)]  # and siblings end
        stages[name] = run_stage.submit(spec, name, force, wait_for=wait_for, return_state=False)
        reports.append(publish_report.submit(cast(Any, stages[name])))  # Prefect passes the stage's result
    wait([*stages.values(), *reports])
    outcomes = [f.result() for f in stages.values() if f.state.is_completed()]
    failed = {n: f for n, f in stages.items() if f.state.is_failed()}
    if failed:
        not_run = [n for n, f in stages.items() if not f.state.is_final()]
        note = f"pipeline {spec['name']!r}: stage{'s' if len(failed) > 1 else ''} failed: {', '.join(failed)}"
        if not_run:
            note += "; not run (they depend on a failed stage): " + ", ".join(not_run)
        if outcomes:
            note += "; finished: " + ", ".join(o["stage"] for o in outcomes)
        error = next(iter(failed.values())).state.result(raise_on_failure=False)
        if isinstance(error, BaseException):
            error.add_note(note)
            raise error
        raise RuntimeError(note)
    return outcomes


def cli() -> None:
    """``kdray-flow SPEC [key.path=value ...] [--force]``: the pipeline through Prefect."""
    import os

    from flows import main

    # A temporary Prefect server needs longer than Prefect's 20 s default to start on a busy laptop.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    main(pipeline_flow, stages=False)


if __name__ == "__main__":
    cli()
