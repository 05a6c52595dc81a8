"""Run one stage from its ``stage.json``: what the ``ray`` and ``kuberay`` launchers start on a cluster.

    python -m kdray.worker s3://<bucket>/<prefix>/<pipeline>/<stage>/<key>/stage.json

(or a ``file://`` URI on a shared filesystem). ``stage.json`` is written by ``kdray.engine.launchers``:
``{"spec": <pipeline spec JSON>, "stage": <name>, "key": <stage key>, "force": <bool>}``. The
worker validates the spec, checks that it computes the same stage key as the submitter (the same
kdray on both sides), and runs the stage with ``kdray.engine.pipeline.run_stage`` and the ``local``
launcher. Inside a Ray job (``RAY_ADDRESS`` is set, or Ray's job config is) the stage's
``address`` becomes ``"auto"``, so ``fit`` joins the cluster it runs in instead of starting a new
Ray; elsewhere it starts embedded Ray. A finished artifact makes the run a no-op ("cached").

Progress goes to stderr; the outcome is one JSON line on stdout (``StageOutcome.to_json()``).
A ``KdrayError`` prints ``error: <message>`` on stderr and exits 2, without a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from kdray.core.errors import KdrayError, SpecError
from kdray.core.storage import Storage
from kdray.engine.pipeline import StageOutcome, plan, run_stage
from kdray.engine.spec import PipelineSpec, parse_pipeline

USAGE = "usage: python -m kdray.worker <stage-uri>   (the URI of a stage.json written by kdray submit)"
# Set by Ray's job supervisor in the entrypoint's environment (ray/_private/runtime_env/constants.py).
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def read_stage_file(uri: str) -> dict[str, Any]:
    """The parsed ``stage.json`` at ``uri``, checked for its three required fields."""
    if "/" not in uri.rstrip("/"):
        raise KdrayError(
            f"{uri!r} is not the URI of a stage.json",
            hint="Give e.g. s3://bucket/prefix/<pipeline>/<stage>/<key>/stage.json.",
        )
    folder, name = uri.rstrip("/").rsplit("/", 1)
    raw = Storage(folder).read_bytes(name)
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KdrayError(
            f"{uri} is not valid JSON ({e})",
            hint="It is written by the submitting kdray; submit the stage again to rewrite it.",
        ) from None
    missing = [k for k in ("spec", "stage", "key") if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise KdrayError(
            f"{uri} lacks {', '.join(missing)}; a stage file holds spec, stage and key",
            hint="It is written by the submitting kdray; submit the stage again to rewrite it.",
        )
    return doc


def in_ray_cluster() -> bool:
    """Whether this process was started by a Ray job (or told where its cluster is)."""
    return bool(os.environ.get("RAY_ADDRESS")) or RAY_JOB_CONFIG_ENV in os.environ


def pinned_spec(doc: dict[str, Any], source: str) -> PipelineSpec:
    """The pipeline spec with this stage pinned to the ``local`` launcher and the right Ray address."""
    spec_doc = doc["spec"]
    stages = spec_doc.get("stages") if isinstance(spec_doc, dict) else None
    entry = next((s for s in stages or [] if isinstance(s, dict) and s.get("name") == doc["stage"]), None)
    if entry is None:
        raise SpecError(
            f"{source}: the spec has no stage named {doc['stage']!r}",
            hint="The stage file is inconsistent; launch the stage again to rewrite it.",
        )
    entry["run"] = {**(entry.get("run") or {}), "launcher": "local", "address": "auto" if in_ray_cluster() else None}
    return parse_pipeline(spec_doc, source)


def run(uri: str, log=None) -> StageOutcome:
    """Run the stage described at ``uri``; returns its ``StageOutcome``."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    doc = read_stage_file(uri)
    spec = pinned_spec(doc, uri)
    keys = plan(spec)
    if keys[doc["stage"]] != doc["key"]:
        raise KdrayError(
            f"stage {doc['stage']!r}: this kdray computes key {keys[doc['stage']]} but the submitter "
            f"computed {doc['key']} ({uri})",
            hint="The cluster runs a different kdray version than the machine that submitted; "
            "use the same image/version on both sides.",
        )
    return run_stage(spec, doc["stage"], force=bool(doc.get("force", False)), keys=keys, log=log)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1 or args[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        outcome = run(args[0])
    except KdrayError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    print(json.dumps(outcome.to_json()), flush=True)
    return 0
