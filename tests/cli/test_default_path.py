"""The default path, as users run it: the installed commands, Ray's defaults, stages side by side.

Nothing here (or in conftest) touches Ray's settings: token authentication is on, as Ray starts a local
cluster by default. Each pipeline has two independent Ray stages that overlap (``cpus_per_worker: 1`` on
this 2-core machine), then a stage that depends on them (with ``workers: 2``), then evaluate: the shape
that died when the embedded cluster was started from a stage's thread (Linux kills a process's children
started with PR_SET_PDEATHSIG when the *thread* that started them ends) and when child stages joined it
without the authentication mode Ray had chosen.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
RAY_NOISE = ("InvalidAuthToken", "RayTrainWorker pid", "Failed to connect to GCS", "Traceback", "(pid=")

pytestmark = pytest.mark.slow


def two_branch_spec(tmp_path: Path, *, storage: str | None = None) -> Path:
    """teacher and scratch (independent, 1 CPU each) -> student (distil from teacher, 2 workers) -> eval."""
    data = {"name": "synthetic", "options": {"num_samples": 256, "image_size": 8, "num_classes": 4}}
    optim = {"epochs": 2, "batch_size": 32, "lr": 3e-3}
    doc = {
        "name": "twobranch",
        "storage": {"uri": storage or f"file://{tmp_path}/runs"},
        "run": {"workers": 1, "cpus_per_worker": 1},
        "stages": [
            {"name": "teacher", "kind": "train", "model": {"name": "cnn_small"}, "data": data, "optim": optim},
            {"name": "scratch", "kind": "train", "model": {"name": "mlp_64"}, "data": data, "optim": optim},
            {
                "name": "student",
                "kind": "distill",
                "teacher": "teacher",
                "model": {"name": "mlp_64"},
                "data": data,
                "optim": optim,
                "losses": [{"name": "cross_entropy", "weight": 0.5}, {"name": "hinton_kl", "weight": 0.5}],
                "run": {"workers": 2, "cpus_per_worker": 1},
            },
            {"name": "eval", "kind": "evaluate", "models": ["teacher", "scratch", "student"]},
        ],
    }
    path = tmp_path / "twobranch.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """An installed command, in a user's environment: this process's, less the ``RAY_*`` variables that an
    embedded Ray started by an earlier test in this process left in it (a user's shell has none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def assert_clean(out: str) -> None:
    """Only kdray's lines: no Ray worker prefixes, tracebacks, authentication failures or colour codes."""
    assert not ANSI.search(out), "colour codes in piped output"
    for noise in RAY_NOISE:
        assert noise not in out, f"{noise!r} in kdray's output:\n{out[-3000:]}"


def test_two_stages_side_by_side_then_a_dependent_stage_on_two_workers_then_evaluate(tmp_path):
    spec = two_branch_spec(tmp_path)
    done = run([str(BIN / "kdray"), "run", str(spec), "--json"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert_clean(done.stderr)
    assert "starting teacher, scratch" in done.stderr  # they did overlap
    outcomes = {o["stage"]: o for o in json.loads(done.stdout)}
    assert [outcomes[n]["status"] for n in ("teacher", "scratch", "student", "eval")] == ["ran"] * 4
    assert outcomes["teacher"]["metrics"]["val_acc"] > 0.5  # chance is 0.25
    assert outcomes["student"]["metrics"]["val_acc"] > 0.5

    again = run([str(BIN / "kdray"), "run", str(spec), "--json"], cwd=tmp_path)  # a rerun: nothing stale, nothing stuck
    assert again.returncode == 0, again.stderr[-4000:]
    assert [o["status"] for o in json.loads(again.stdout)] == ["cached"] * 4
    assert [o["uri"] for o in json.loads(again.stdout)] == [outcomes[n]["uri"] for n in outcomes]


def test_the_same_pipeline_through_kdray_flow(tmp_path):
    spec = two_branch_spec(tmp_path)
    done = run([str(BIN / "kdray-flow"), str(spec)], cwd=tmp_path, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    for noise in ("InvalidAuthToken", "Failed to connect to GCS"):
        assert noise not in out
    for stage in ("teacher", "scratch", "student", "eval"):
        assert list((tmp_path / "runs" / "twobranch" / stage).glob("*/manifest.json")), f"{stage} not published"
