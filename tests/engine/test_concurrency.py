"""Independent stages run at the same time (``kdray run`` and the Prefect pipeline flow); a failed stage stops
only the stages that depend on it. Stages use ``workers: 0`` on synthetic data: the loop runs in the stage's
process, and stages that overlap run in child processes (``python -m kdray.worker``).

Overlap is read from the stages' own records, with no timing threshold: a stage handed to a child process
starts with its ``stage.json`` (written just before the process starts) and ends with its ``manifest.json``
(written last); under Prefect, the task runs' start and end times. Two stages ran at the same time when
each started before the other ended. (Their training loops overlap too on a quiet machine, but on 2 busy
cores the imports of one child can take longer than the other's whole loop.)
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import yaml
from helpers import synthetic_pipeline
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import pipeline_flow
from kdray.contracts.checkpoint import open_artifact
from kdray.core.errors import DataError, KdrayError
from kdray.engine import concurrency
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline

# Big enough that each stage trains for a few seconds, small enough for a 2-core machine.
DATA = {"name": "synthetic", "options": {"num_samples": 2048, "image_size": 12, "num_classes": 4}}


def two_roots(tmp_path: Path, *, epochs: int = 3, bad: str | None = None) -> dict:
    """teacher and scratch (independent), student (distilled from teacher), after (reads scratch)."""
    doc = synthetic_pipeline(tmp_path, epochs=epochs)
    teacher = doc["stages"][0]
    teacher["data"] = DATA
    scratch = {**copy.deepcopy(teacher), "name": "scratch", "model": {"name": "mlp_64"}}
    student = {
        **copy.deepcopy(teacher),
        "name": "student",
        "kind": "distill",
        "teacher": "teacher",
        "model": {"name": "mlp_64"},
        "optim": {"epochs": 1, "batch_size": 64, "lr": 3e-3},
    }
    after = {"name": "after", "kind": "evaluate", "models": ["scratch"]}
    doc["stages"] += [scratch, student, after]
    if bad:  # the teacher's (and so its student's) folder holds no data: it fails when it loads it
        (tmp_path / "missing").mkdir(exist_ok=True)  # it exists (preflight passes), but is empty
        for s in doc["stages"]:
            if s["name"] in (bad, "student"):
                s["data"] = {"name": "fashion_mnist", "path": str(tmp_path / "missing")}
    return doc


def published(tmp_path: Path) -> dict[str, Path]:
    """Stage name -> its manifest.json, for every published stage."""
    return {p.parent.parent.name: p for p in (tmp_path / "runs" / "synth").glob("*/*/manifest.json")}


def assert_overlapped(started: dict[str, float], finished: dict[str, float]) -> None:
    a, b = started
    assert started[a] < finished[b] and started[b] < finished[a], (
        f"the stages did not overlap: started {started}, finished {finished}"
    )


def child_stage_times(tmp_path: Path, *names: str) -> tuple[dict[str, float], dict[str, float]]:
    manifests = published(tmp_path)
    started = {n: (manifests[n].parent / "stage.json").stat().st_mtime for n in names}
    return started, {n: manifests[n].stat().st_mtime for n in names}


def task_run_times(state, *names: str, timeout: float = 30.0) -> tuple[dict[str, float], dict[str, float]]:
    """Start and end times of the flow run's ``run-<stage>`` task runs, as the server recorded them."""
    flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = {r.name: r for r in client.read_task_runs(flow_run_filter=flow_run)}
            chosen = [runs.get(f"run-{n}") for n in names]
            if all(r and r.start_time and r.end_time for r in chosen) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    started = {n: r.start_time.timestamp() for n, r in zip(names, chosen) if r and r.start_time}
    finished = {n: r.end_time.timestamp() for n, r in zip(names, chosen) if r and r.end_time}
    return started, finished


def test_independent_stages_run_at_the_same_time_and_dependants_after(tmp_path):
    lines: list[str] = []
    out = run_pipeline(parse_pipeline(two_roots(tmp_path)), log=lines.append)
    assert [o.stage for o in out] == ["teacher", "scratch", "student", "after"], "outcomes in pipeline order"
    assert all(o.status == "ran" for o in out)
    text = "\n".join(lines)
    assert "[synth] starting teacher, scratch" in text, text
    assert any(line.startswith("teacher | [synth/teacher] epoch 3") for line in lines), "prefixed child lines"
    assert any(line.startswith("scratch | [synth/scratch] epoch 3") for line in lines)
    assert_overlapped(*child_stage_times(tmp_path, "teacher", "scratch"))
    loops = [open_artifact(o.uri).manifest["history"][0]["loop_started"] for o in out[:2]]
    assert all(t > min(child_stage_times(tmp_path, "teacher", "scratch")[0].values()) for t in loops)
    assert concurrency.CPUS.held == 0, "every stage gave its CPUs back"

    again = run_pipeline(parse_pipeline(two_roots(tmp_path)), log=lines.append)
    assert [o.status for o in again] == ["cached"] * 4 and [o.uri for o in again] == [o.uri for o in out]


def test_a_failed_stage_stops_only_its_dependants(tmp_path):
    lines: list[str] = []
    with pytest.raises(KdrayError, match="no train-images") as info:
        run_pipeline(parse_pipeline(two_roots(tmp_path, epochs=1, bad="teacher")), log=lines.append)
    note = "\n".join(info.value.__notes__)
    assert "stage failed: teacher" in note and "not run (they depend on a failed stage): student" in note, note
    assert "finished: scratch, after" in note
    assert sorted(published(tmp_path)) == ["after", "scratch"], "the independent stages were published"
    assert "[synth] stage student not run: it depends on stage teacher, which did not finish" in lines
    assert concurrency.CPUS.held == 0


def test_one_at_a_time_keeps_order_and_the_original_error(tmp_path):
    """max_concurrent=1: stages run here, one by one in pipeline order; a failure still skips only its dependants."""
    lines: list[str] = []
    with pytest.raises(DataError, match="no train-images"):
        run_pipeline(parse_pipeline(two_roots(tmp_path, epochs=1, bad="teacher")), log=lines.append, max_concurrent=1)
    assert not any(" | " in line for line in lines), "nothing ran in a child process"
    assert sorted(published(tmp_path)) == ["after", "scratch"]


# --------------------------------------------------------------------------- the Prefect flow


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_spec(tmp_path: Path, doc: dict) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_flow_runs_independent_stages_at_the_same_time(prefect_server, tmp_path):
    doc = two_roots(tmp_path)
    doc["stages"] = doc["stages"][:2]  # teacher and scratch
    state = pipeline_flow(write_spec(tmp_path, doc), return_state=True)
    outcomes = state.result()
    assert [o["stage"] for o in outcomes] == ["teacher", "scratch"] and all(o["status"] == "ran" for o in outcomes)
    assert_overlapped(*task_run_times(state, "teacher", "scratch"))


def test_flow_failure_stops_only_its_dependants(prefect_server, tmp_path):
    with pytest.raises(KdrayError, match="no train-images") as info:
        pipeline_flow(write_spec(tmp_path, two_roots(tmp_path, epochs=1, bad="teacher")))
    note = "\n".join(info.value.__notes__)
    assert "failed: teacher" in note and "not run (they depend on a failed stage): student" in note, note
    assert sorted(published(tmp_path)) == ["after", "scratch"]
