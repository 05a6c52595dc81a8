"""Run only the train stages of a pipeline: source networks, teachers and baselines.

    python flows/source.py examples/fmnist_cnn_to_mlp_hinton.yaml [--stages NAME ...] [--force]

Train stages read no other stage, so this is the flow to run first; the other one-kind flows
(distill.py, transfer.py, adapt.py) then find its artifacts.
"""

from __future__ import annotations

from typing import Any, Optional

from prefect import flow

from flows.tasks import run_kind


@flow(name="kdray-source", persist_result=True, result_serializer="json")
def source_flow(
    spec_uri: str, stages: Optional[list[str]] = None, overrides: Optional[list[str]] = None, force: bool = False
) -> list[dict[str, Any]]:
    """Run the train stages of the pipeline (or only ``stages``) in order."""
    return run_kind(spec_uri, "train", stages, overrides, force)


if __name__ == "__main__":
    from flows import main

    main(source_flow)
