"""The Prefect tasks of kdray's flows: verbs over library calls, small JSON in and out.

A stage's outcome crosses task boundaries as ``StageOutcome.to_json()`` (stage, kind, key, artifact
URI, status, seconds, metrics): URIs, never tensors, persisted with the JSON serializer.

Retries are for infrastructure only. ``run_stage`` retries any exception except a ``KdrayError``
(bad input fails the same way every time). Because the Ray run name is deterministic
(``<pipeline>-<stage>-<key>``), a retried stage resumes from its last checkpoint instead of
starting again.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from kdray.contracts.checkpoint import open_artifact, read_artifact
from kdray.contracts.specs import is_artifact_uri
from kdray.contracts.stage import STAGE_KINDS
from kdray.core.errors import KdrayError
from kdray.core.registry import did_you_mean
from kdray.engine import pipeline as kpipeline
from kdray.engine.launchers import spec_to_json
from kdray.engine.preflight import preflight
from kdray.engine.resolved import resolve
from kdray.engine.spec import PipelineSpec, load_pipeline, parse_pipeline

RETRY_DELAYS: list[float] = [2, 15]  # seconds before the first and the second retry


_PARSED: dict[str, PipelineSpec] = {}  # the spec's JSON -> the spec, parsed once per process
_PARSED_LOCK = threading.Lock()


def spec_from_json(spec: dict[str, Any]) -> PipelineSpec:
    """The pipeline spec that ``load_spec`` returned as JSON (Prefect passes tasks JSON, which any
    process can read). Parsed once per process: a flow's tasks in one process share the parse
    ``load_spec`` made, and a task in another process parses it once there."""
    text = json.dumps(spec, sort_keys=True)
    with _PARSED_LOCK:
        parsed = _PARSED.get(text)
    if parsed is None:
        parsed = parse_pipeline(copy.deepcopy(spec), f"pipeline {spec.get('name')!r}")
        _remember(text, parsed)
    return parsed


def _remember(text: str, spec: PipelineSpec) -> None:
    with _PARSED_LOCK:
        if len(_PARSED) >= 16:  # a long-lived worker serving many deployments keeps only the latest
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[text] = spec


def is_infrastructure_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry anything but a ``KdrayError`` (bad input), except a
    storage error marked transient (an S3 server that did not answer)."""
    try:
        state.result()
    except KdrayError as e:
        return bool(getattr(e, "transient", False))
    except Exception:
        return True
    return True


def report_key(pipeline: str, stage: str) -> str:
    """The Prefect artifact key of a report: lower-case letters, digits and dashes only."""
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]+", "-", f"{pipeline}-{stage}".lower())).strip("-")


def select_stages(spec: dict[str, Any], kind: str, names: list[str] | None = None) -> list[str]:
    """The stages of ``kind`` to run, in pipeline order: all of them, or those in ``names``."""
    if kind not in STAGE_KINDS:
        raise KdrayError(f"unknown stage kind {kind!r}; {did_you_mean(kind, STAGE_KINDS.names())}")
    of_kind = [s["name"] for s in spec["stages"] if s["kind"] == kind]
    for name in names or []:
        if name not in of_kind:
            raise KdrayError(
                f"stage {name!r} is not a {kind} stage of pipeline {spec['name']!r}; "
                f"its {kind} stages are: {', '.join(of_kind) or 'none'}."
            )
    chosen = [n for n in of_kind if names is None or n in names]
    if not chosen:
        raise KdrayError(
            f"pipeline {spec['name']!r} has no {kind} stage; its stages are: "
            + ", ".join(f"{s['name']} ({s['kind']})" for s in spec["stages"])
            + ".",
            hint="Run flows/pipeline.py to run every stage.",
        )
    return chosen


@task(
    name="load-spec",
    task_run_name="load-spec",
    retries=len(RETRY_DELAYS),
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=is_infrastructure_failure,
    persist_result=True,
    result_serializer="json",
)
def load_spec(spec_uri: str, overrides: list[str]) -> dict[str, Any]:
    """Read and validate the pipeline spec; return it as JSON (a path or a storage URI)."""
    spec = load_pipeline(spec_uri, overrides)
    preflight(spec, spec_uri)  # files the spec names exist, S3 has credentials: before any stage starts
    get_run_logger().info(f"pipeline {spec.name!r}: " + ", ".join(f"{s.name} ({s.kind})" for s in spec.stages))
    doc = spec_to_json(spec)
    _remember(json.dumps(doc, sort_keys=True), spec)  # the flow's tasks take this parse, not a new one
    return doc


@task(name="check-parents", task_run_name="check-parents", result_serializer="json")
def check_parents(spec: dict[str, Any], stages: list[str]) -> None:
    """Fail before running anything if a stage reads a stage that is neither finished nor run here."""
    pipeline = spec_from_json(spec)
    resolved = resolve(pipeline, kpipeline.plan(pipeline))
    for i, name in enumerate(stages):
        for _, ref in resolved[name].stage.references():
            if is_artifact_uri(ref) or ref in stages[:i]:
                continue
            store = resolved[ref].store
            if read_artifact(store) is None:
                kind = resolved[ref].stage.kind
                raise KdrayError(
                    f"stage {name!r} reads stage {ref!r} ({kind}), which has no finished artifact at {store.uri()}",
                    hint=f"Run it first: python flows/stages.py {kind} SPEC "
                    f"--stages {ref} (or the whole pipeline: python flows/pipeline.py SPEC).",
                )


@task(
    name="run-stage",
    task_run_name="run-{stage}",
    retries=len(RETRY_DELAYS),
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=is_infrastructure_failure,
    persist_result=True,
    result_serializer="json",
)
def run_stage(spec: dict[str, Any], stage: str, force: bool = False) -> dict[str, Any]:
    """Run one stage (its parents must be finished) or find it cached; return its outcome as JSON."""
    outcome = kpipeline.run_stage(spec_from_json(spec), stage, force=force, log=get_run_logger().info)
    return outcome.to_json()


@task(name="publish-report", task_run_name="publish-{outcome[stage]}", result_serializer="json")
def publish_report(outcome: dict[str, Any]) -> str | None:
    """Publish an evaluate stage's ``report.md`` as a Prefect Markdown artifact; return its key."""
    if outcome["kind"] != "evaluate":
        return None
    art = open_artifact(outcome["uri"])
    key = report_key(art.manifest["pipeline"], outcome["stage"])
    markdown = art.store.read_bytes("report.md").decode()
    create_markdown_artifact(
        markdown=f"{markdown}\n\nArtifact: `{outcome['uri']}`\n",
        key=key,
        description=f"kdray report of stage {outcome['stage']!r} ({outcome['status']})",
    )
    get_run_logger().info(f"published report {key!r} from {outcome['uri']}")
    return key


def run_kind(
    spec_uri: str, kind: str, stages: list[str] | None, overrides: list[str] | None, force: bool
) -> list[dict[str, Any]]:
    """The body of the one-kind flows: the chosen stages of ``kind`` in order, parents checked first."""
    spec = load_spec(spec_uri, list(overrides or []))
    names = select_stages(spec, kind, stages)
    check_parents(spec, names)
    return [run_stage(spec, name, force) for name in names]
