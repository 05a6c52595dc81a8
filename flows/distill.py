"""Run only the distill stages of a pipeline (their teachers must be finished).

    python flows/distill.py examples/fmnist_cnn_to_mlp_hinton.yaml [--stages NAME ...] [--force]

A stage that reads a stage not run here needs that stage's finished artifact; otherwise the flow
fails before running anything and names the stage to run first.
"""

from __future__ import annotations

from typing import Any, Optional

from prefect import flow

from flows.tasks import run_kind


@flow(name="kdray-distill", persist_result=True, result_serializer="json")
def distill_flow(
    spec_uri: str, stages: Optional[list[str]] = None, overrides: Optional[list[str]] = None, force: bool = False
) -> list[dict[str, Any]]:
    """Run the distill stages of the pipeline (or only ``stages``) in order."""
    return run_kind(spec_uri, "distill", stages, overrides, force)


if __name__ == "__main__":
    from flows import main

    main(distill_flow)
