"""Run a sweep of one pipeline stage as a Prefect flow, and publish its ranked report as an artifact.

    python flows/sweep.py examples/fmnist_cnn_to_mlp_hinton.yaml examples/sweeps/fmnist_students.yaml

The sweep spec (``kdray.sweeps.spec.SweepSpec``) names the stage, its search space, ``num_samples``,
the validation metric that ranks the trials, how many run at once, an optional scheduler (ASHA) and
an optional ``choose`` rule. The trials run as Ray Tune trials (``kdray.sweeps.sweep.run_sweep``);
finished trials are cached artifacts, so a rerun of the flow (a nightly schedule, a retry) resumes.
The chosen student's URI is published as a Prefect link artifact beside the report.
``prefect.yaml`` holds deployments of this flow.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from flows.tasks import load_spec, spec_from_json
from kdray.sweeps import report as sweep_report
from kdray.sweeps import spec as sweep_spec
from kdray.sweeps import sweep as ksweep


@task(name="run-sweep", task_run_name="sweep-{stage}", persist_result=True, result_serializer="json")
def run_sweep(spec: dict[str, Any], sweep: dict[str, Any], stage: str) -> dict[str, Any]:
    """Run every trial (finished ones are cached) and return the ranked report as JSON."""
    sw = sweep_spec.parse_sweep(sweep)
    return ksweep.run_sweep(
        spec_from_json(spec), stage, sweep_spec.sample_settings(sw), **sw.options(), log=get_run_logger().info
    )


@flow(name="kdray-sweep", persist_result=True, result_serializer="json")
def sweep_flow(spec_uri: str, sweep_uri: str, overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """Sweep the stage the sweep spec names; publish the ranked trials as a Markdown artifact."""
    spec = load_spec(spec_uri, list(overrides or []))
    sweep = sweep_spec.load_sweep(sweep_uri)
    report = run_sweep(spec, sweep.model_dump(mode="json"), sweep.stage)
    key = f"{spec['name']}-{sweep.stage}-sweep".lower().replace("_", "-")
    create_markdown_artifact(
        markdown=f"{sweep_report.markdown(report)}\n\nSweep artifact: `{report['uri']}`\n",
        key=key,
        description=f"kdray sweep of stage {sweep.stage!r}: {len(report['trials'])} trials by {report['metric']}",
    )
    chosen = report.get("chosen") or {}
    if chosen.get("uri"):  # the student a later pipeline references (teacher:, model.weights:)
        create_link_artifact(
            link=chosen["uri"],
            link_text=f"{chosen['trial']} ({chosen['model']})",
            key=f"{key}-chosen",
            description=f"kdray sweep of stage {sweep.stage!r}: the chosen student ({chosen['rule']})",
        )
    return {
        "uri": report["uri"],
        "key": key,
        "best": report["trials"][0] if report["trials"] else None,
        "chosen": chosen or None,
        "stopped": report.get("stopped", 0),
    }


def cli() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: python flows/sweep.py PIPELINE.yaml SWEEP.yaml [key.path=value ...]")
    result = sweep_flow(sys.argv[1], sys.argv[2], sys.argv[3:])
    print(f"sweep report: {result['uri']}")


if __name__ == "__main__":
    cli()
