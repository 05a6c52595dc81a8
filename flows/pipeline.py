"""Run a whole pipeline spec as a Prefect flow: one task per stage, in order, reports as artifacts.

    python flows/pipeline.py examples/fmnist_cnn_to_mlp_hinton.yaml [stages.teacher.optim.epochs=1] [--force]
    kdray-flow examples/fmnist_cnn_to_mlp_hinton.yaml      (the same, as an installed command)

Without PREFECT_API_URL, Prefect starts a temporary local server for the run.
"""

from __future__ import annotations

from typing import Any, Optional

from prefect import flow

from flows.tasks import load_spec, publish_report, run_stage


@flow(name="kdray-pipeline", persist_result=True, result_serializer="json")
def pipeline_flow(spec_uri: str, overrides: Optional[list[str]] = None, force: bool = False) -> list[dict[str, Any]]:
    """Run every stage of the pipeline in order (finished ones are cached) and publish its reports."""
    spec = load_spec(spec_uri, list(overrides or []))
    outcomes = []
    for stage in spec["stages"]:
        outcome = run_stage(spec, stage["name"], force)  # a direct call waits: parents finish first
        publish_report(outcome)
        outcomes.append(outcome)
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
