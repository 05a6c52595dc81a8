"""Prefect flows over the kdray library: thin, straight-line scripts that call typed tasks.

    flows/pipeline.py   the whole pipeline, stage by stage, and its reports as Prefect artifacts
    flows/stages.py     only the stages of one kind (``train``, ``distill``, ...), parents finished first
    flows/sweep.py      a sweep of one stage         flows/deploy.py    cron deployments to a work pool
    flows/tasks.py      the tasks they call: load_spec, check_parents, run_stage, publish_report

The library (``kdray/``) never imports Prefect; everything Prefect-specific lives here.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable


def main(
    flow: Callable[..., Any], argv: list[str] | None = None, *, stages: bool = True, kind: bool = False
) -> list[dict]:
    """Command line of a flow script: ``[KIND] SPEC [key.path=value ...] [--stages NAME ...] [--force]``.

    Prints one line per stage outcome; bad input (a KdrayError) is one line on stderr and exit code 2.
    """
    import sys

    from kdray.core.errors import KdrayError

    parser = argparse.ArgumentParser(description=(flow.__doc__ or "").strip().splitlines()[0])
    if kind:
        parser.add_argument("kind", help="the stage kind to run: train, distill, transfer, share, adapt, evaluate")
    parser.add_argument("spec_uri", help="pipeline YAML: a path, file://... or s3://.../pipeline.yaml")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. run.workers=2")
    parser.add_argument("--force", action="store_true", help="rerun stages even if their artifact exists")
    if stages:
        parser.add_argument("--stages", nargs="+", help="run only these stages (default: all of this kind)")
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = {"stages": args.stages} if stages else {}
    if kind:
        kwargs["kind"] = args.kind
    try:
        # Bad input is told before Prefect starts (a temporary server takes seconds, and a failed flow
        # run logs its exception with a traceback): the spec is read and its files checked here too.
        from kdray.engine.preflight import preflight
        from kdray.engine.spec import load_pipeline

        preflight(load_pipeline(args.spec_uri, list(args.overrides)), args.spec_uri)
        outcomes = flow(args.spec_uri, overrides=args.overrides, force=args.force, **kwargs)
    except KdrayError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    for o in outcomes:
        print(f"{o['stage']:<16} {o['kind']:<9} {o['status']:<7} {o['seconds']:7.1f}s  {o['uri']}")
    return outcomes
