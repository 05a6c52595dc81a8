"""Run only the stages of one kind of a pipeline (the stages they read must be finished).

    python flows/stages.py train   examples/fmnist_cnn_to_mlp_hinton.yaml [key.path=value ...] [--stages NAME ...]
    python flows/stages.py distill examples/fmnist_cnn_to_mlp_hinton.yaml --stages student [--force]

``KIND`` is any registered stage kind (``kdray ls stages``: train, distill, transfer, share, adapt,
evaluate, or a plug-in's). A stage that reads a stage not run here needs that stage's finished
artifact; otherwise the flow fails before running anything and names the stage to run first.
"""

from __future__ import annotations

from typing import Any, Optional

from prefect import flow

from flows.tasks import run_kind


@flow(name="kdray-stages", flow_run_name="{kind}-stages", persist_result=True, result_serializer="json")
def stages_flow(
    spec_uri: str,
    kind: str,
    stages: Optional[list[str]] = None,
    overrides: Optional[list[str]] = None,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Run the stages of one kind of the pipeline (or only ``stages``) in order."""
    return run_kind(spec_uri, kind, stages, overrides, force)


if __name__ == "__main__":
    from flows import main

    main(stages_flow, kind=True)
