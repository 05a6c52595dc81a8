"""Prefect flows on a real temporary Prefect server: JSON results, report artifacts, caching, retries that
resume from the last checkpoint, bad input that is not retried, one-kind flows, deployments.

Prefect's own ``prefect_test_harness`` gives this module a temporary database and server (about
11 s, once). Flows are called like functions; the client reads back what the server recorded.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from helpers import REPO, synthetic_pipeline
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.schedules import CronSchedule
from prefect.states import Failed
from prefect.testing.utilities import prefect_test_harness

from flows import main
from flows.deploy import IMAGE_SOURCE, build_deployment, k8s_job_variables
from flows.pipeline import pipeline_flow
from flows.stages import stages_flow
from flows.tasks import is_infrastructure_failure, report_key, select_stages
from kdray.contracts.checkpoint import open_artifact
from kdray.core.errors import KdrayError, SpecError
from kdray.engine.launchers import spec_to_json
from kdray.engine.pipeline import plan
from kdray.engine.spec import load_pipeline, parse_pipeline

EVAL = {"name": "eval", "kind": "evaluate", "models": ["teacher"]}
EXAMPLE = "examples/fmnist_cnn_to_mlp_hinton.yaml"


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_spec(tmp_path: Path, doc: dict) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def task_runs(state, timeout: float = 20.0) -> dict[str, object]:
    """Task runs of a finished flow run by name. Task states reach the server as events, so poll
    until every run recorded a final state."""
    flow_run_id = state.state_details.flow_run_id
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if runs and all(r.state and r.state.is_final() for r in runs) or time.monotonic() > deadline:
                return {r.name: r for r in runs}
            time.sleep(0.5)


# --------------------------------------------------------------------------- pure parts (no server)


def test_retry_condition_retries_infrastructure_errors_only():
    assert is_infrastructure_failure(None, None, Failed(data=RuntimeError("worker died"))) is True
    assert is_infrastructure_failure(None, None, Failed(data=OSError("connection reset"))) is True
    assert is_infrastructure_failure(None, None, Failed(data=SpecError("unknown model 'x'"))) is False
    assert is_infrastructure_failure(None, None, Failed(data=KdrayError("bad path"))) is False
    from kdray.core.errors import StorageError

    assert is_infrastructure_failure(None, None, Failed(data=StorageError("S3 did not answer", transient=True))) is True
    assert is_infrastructure_failure(None, None, Failed(data=StorageError("no such artifact"))) is False


def test_spec_json_round_trip_keeps_keys_and_run_merging(tmp_path):
    doc = synthetic_pipeline(tmp_path, workers=2, extra_stages=[EVAL])
    doc["stages"][1]["run"] = {"use_gpu": False}  # a per-stage override of one field only
    spec = parse_pipeline(copy.deepcopy(doc))
    again = parse_pipeline(json.loads(json.dumps(spec_to_json(spec))))
    assert plan(again) == plan(spec)
    assert again.run_for(again.stages[1]).workers == 2, "unset stage run fields still come from the pipeline"


def test_report_keys_and_stage_selection():
    assert report_key("fmnist-cnn-to-mlp", "eval") == "fmnist-cnn-to-mlp-eval"
    assert report_key("A_b", "x.y") == "a-b-x-y"
    spec = {
        "name": "p",
        "stages": [{"name": "t", "kind": "train"}, {"name": "s", "kind": "distill"}, {"name": "s2", "kind": "distill"}],
    }
    assert select_stages(spec, "distill") == ["s", "s2"]
    assert select_stages(spec, "distill", ["s2"]) == ["s2"]
    with pytest.raises(KdrayError, match=r"'t' is not a distill stage of pipeline 'p'; its distill stages are: s, s2"):
        select_stages(spec, "distill", ["t"])
    with pytest.raises(KdrayError, match=r"pipeline 'p' has no adapt stage; its stages are: t \(train\)"):
        select_stages(spec, "adapt")


def test_k8s_job_variables_size_the_pod_from_the_run_settings(tmp_path):
    cpu = parse_pipeline(synthetic_pipeline(tmp_path, workers=2, cpus_per_worker=1.5))
    v = k8s_job_variables(cpu, image="reg.example/kdray:1", namespace="ml")
    assert (v["image"], v["namespace"], v["name"]) == ("reg.example/kdray:1", "ml", "synth")
    assert (v["cpu_request"], v["cpu_limit"], v["memory_request"], v["memory_limit"]) == ("4", "4", "8Gi", "8Gi")
    assert "gpu_limit" not in v and v["labels"]["kdray.io/pipeline"] == "synth"

    big = {
        **synthetic_pipeline(tmp_path)["stages"][0],
        "name": "big",
        "run": {"workers": 4, "use_gpu": True, "cpus_per_worker": 0.5},
    }
    gpu = k8s_job_variables(parse_pipeline(synthetic_pipeline(tmp_path, workers=1, extra_stages=[big])))
    assert (gpu["cpu_request"], gpu["memory_request"], gpu["gpu_limit"]) == ("3", "6Gi", "4"), (
        "the largest stage: 1 + 4 x 0.5 CPUs, one GPU per worker"
    )

    local_loop = k8s_job_variables(parse_pipeline(synthetic_pipeline(tmp_path, workers=0, cpus_per_worker=2.5)))
    assert (local_loop["cpu_request"], local_loop["memory_limit"]) == ("2500m", "6Gi")
    remote = k8s_job_variables(
        parse_pipeline(synthetic_pipeline(tmp_path, workers=8, use_gpu=True, launcher="kuberay"))
    )
    assert (remote["cpu_request"], remote["memory_request"]) == ("1", "2Gi") and "gpu_limit" not in remote, (
        "with kuberay the workers run in their own pods; the flow pod only submits"
    )
    for variables in (v, gpu, local_loop, remote):
        assert all(not any(w in k.upper() for w in ("SECRET", "PASSWORD", "TOKEN", "AWS_")) for k in variables["env"])


def test_k8s_job_variables_fit_the_work_pool_template(tmp_path):
    """The variables validate against the kdray-k8s base job template and land in the pod spec."""
    from prefect.utilities.templating import apply_values

    template = json.loads((REPO / "k8s/base/prefect-base-job-template.json").read_text())
    v = k8s_job_variables(parse_pipeline(synthetic_pipeline(tmp_path, workers=2)))
    jsonschema.validate(v, template["variables"])
    defaults = {k: p["default"] for k, p in template["variables"]["properties"].items() if "default" in p}
    job = apply_values(template["job_configuration"], {**defaults, **v})
    container = job["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert job["namespace"] == "kdray" and container["image"] == "kdray:latest"
    assert container["resources"] == {
        "requests": {"cpu": "3", "memory": "6Gi"},
        "limits": {"cpu": "3", "memory": "6Gi"},
    }


def test_deployment_schedule_parameters_and_code_location(tmp_path):
    local = build_deployment(EXAMPLE, cron="0 3 * * *", pool="kdray-local")
    (schedule,) = local.schedules
    assert isinstance(schedule.schedule, CronSchedule)
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 3 * * *", "UTC")
    assert local.name == "fmnist-cnn-to-mlp-local" and local.work_pool_name == "kdray-local"
    assert local.parameters == {"spec_uri": str(REPO / EXAMPLE), "overrides": []}, "absolute: runs may start elsewhere"
    assert local.entrypoint == "flows/pipeline.py:pipeline_flow" and local.job_variables == {}
    assert local.storage.to_pull_step() == {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}

    k8s = build_deployment(
        EXAMPLE,
        cron="30 1 * * 1",
        pool="kdray-k8s",
        pool_type="kubernetes",
        timezone="Europe/Paris",
        overrides=["storage.uri=s3://kdray/runs"],
    )
    assert (k8s.schedules[0].schedule.cron, k8s.schedules[0].schedule.timezone) == ("30 1 * * 1", "Europe/Paris")
    assert k8s.parameters == {"spec_uri": EXAMPLE, "overrides": ["storage.uri=s3://kdray/runs"]}, "in the image"
    assert k8s.storage.to_pull_step()["prefect.deployments.steps.set_working_directory"]["directory"] == IMAGE_SOURCE
    assert k8s.job_variables == k8s_job_variables(load_pipeline(EXAMPLE))
    with pytest.raises(KdrayError, match=r"--cron '0 3 \* \*'.*Invalid cron string"):
        build_deployment(EXAMPLE, cron="0 3 * *", pool="kdray-local")


def test_prefect_yaml_deployments_parse_and_match_the_specs():
    from prefect.cli.deploy._models import PrefectYamlModel  # the schema `prefect deploy` reads it with

    config = PrefectYamlModel.model_validate(yaml.safe_load((REPO / "prefect.yaml").read_text()))
    assert {d.work_pool.name for d in config.deployments} == {"kdray-local", "kdray-k8s"}
    for d in config.deployments:
        path, func = d.entrypoint.split(":")
        assert (REPO / path).is_file() and f"def {func}(" in (REPO / path).read_text()
        (raw,) = d.schedules
        assert CronSchedule(cron=raw.cron, timezone=raw.timezone).cron == "0 3 * * *"
        spec = load_pipeline(str(REPO / d.parameters["spec_uri"]), d.parameters["overrides"])
        if d.work_pool.name == "kdray-k8s":
            assert d.work_pool.job_variables == k8s_job_variables(spec), "regenerate: flows.deploy.k8s_job_variables"
            assert d.pull == [{"prefect.deployments.steps.set_working_directory": {"directory": IMAGE_SOURCE}}]
            assert spec.storage.uri.startswith("s3://"), "a pod's local disk does not outlive the run"


# --------------------------------------------------------------------------- flows on the Prefect server


def test_pipeline_flow_publishes_json_results_and_a_report_then_caches(tmp_path, prefect_server, monkeypatch):
    import flows.tasks

    doc = synthetic_pipeline(tmp_path, extra_stages=[EVAL])
    spec_path = write_spec(tmp_path, doc)
    parses: list[str] = []  # parses of the spec after load-spec's own: the flow and its tasks take that one
    real_parse = flows.tasks.parse_pipeline
    monkeypatch.setattr(flows.tasks, "parse_pipeline", lambda *a, **k: parses.append("parse") or real_parse(*a, **k))
    state = pipeline_flow(spec_path, return_state=True)
    assert parses == [], "the spec is parsed once per run (by load-spec), not again by the flow or each stage"
    outcomes = state.result()
    assert [(o["stage"], o["kind"], o["status"]) for o in outcomes] == [
        ("teacher", "train", "ran"),
        ("eval", "evaluate", "ran"),
    ]
    assert json.loads(json.dumps(outcomes)) == outcomes, "task results are plain JSON"
    assert [o["key"] for o in outcomes] == list(plan(parse_pipeline(doc)).values()), "the same keys as `kdray run`"
    teacher = open_artifact(outcomes[0]["uri"])
    assert outcomes[0]["metrics"]["val_acc"] == teacher.manifest["history"][-1]["val_acc"]

    runs = task_runs(state)
    assert set(runs) >= {"load-spec", "run-teacher", "run-eval"}
    assert all(r.state.is_completed() and r.run_count == 1 for r in runs.values())
    stored = runs["run-teacher"].state.data  # where Prefect persisted the task's result
    assert stored.serializer.type == "json"
    assert json.loads(json.loads(Path(stored.storage_key).read_text())["result"]) == outcomes[0]

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["synth-eval"])))
    assert artifact.type == "markdown" and artifact.flow_run_id == state.state_details.flow_run_id
    report = open_artifact(outcomes[1]["uri"]).store.read_bytes("report.md").decode()
    assert artifact.data.startswith(report) and outcomes[1]["uri"] in artifact.data

    again = pipeline_flow(spec_path)
    assert [o["status"] for o in again] == ["cached", "cached"]
    assert [o["uri"] for o in again] == [o["uri"] for o in outcomes]


@pytest.mark.slow
def test_a_retried_stage_resumes_from_its_last_checkpoint(tmp_path, prefect_server, ray_local, monkeypatch):
    marker = tmp_path / "fired"
    monkeypatch.setenv(
        "KDRAY_INJECT_FAULT",
        json.dumps({"stage": "teacher", "epoch": 1, "step": 0, "rank": 0, "marker": str(marker), "how": "raise"}),
    )
    spec_path = write_spec(tmp_path, synthetic_pipeline(tmp_path, workers=1, epochs=3, max_failures=0))
    state = pipeline_flow(spec_path, return_state=True)
    (outcome,) = state.result()
    assert marker.exists(), "the fault fired on the first attempt"
    history = open_artifact(outcome["uri"]).manifest["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["resumed"] for h in history] == [0, 1, 1], "epoch 1 was kept from the checkpoint, not trained again"
    run = task_runs(state)["run-teacher"]
    assert run.run_count == 2 and run.state.is_completed(), "one failed attempt, one retry"


def test_bad_input_fails_without_retries_and_the_cli_exits_2(tmp_path, prefect_server, capsys):
    doc = synthetic_pipeline(tmp_path)
    doc["stages"][0]["model"]["name"] = "cnn_smal"
    spec_path = write_spec(tmp_path, doc)
    state = pipeline_flow(spec_path, return_state=True)
    assert state.is_failed()
    with pytest.raises(SpecError, match="unknown model 'cnn_smal'; did you mean 'cnn_small'"):
        state.result()
    runs = task_runs(state)
    assert list(runs) == ["load-spec"] and runs["load-spec"].run_count == 1, "a SpecError is not retried"

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:  # kdray-flow SPEC
        main(pipeline_flow, [spec_path], stages=False)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "error:" in err and "unknown model 'cnn_smal'" in err and "Traceback" not in err


def test_one_kind_flows_need_their_parents_finished(tmp_path, prefect_server):
    data = synthetic_pipeline(tmp_path)["stages"][0]["data"]
    doc = synthetic_pipeline(
        tmp_path,
        epochs=1,
        extra_stages=[
            {
                "name": "student",
                "kind": "distill",
                "teacher": "teacher",
                "model": {"name": "mlp_64"},
                "data": data,
                "optim": {"epochs": 1, "batch_size": 32},
            }
        ],
    )
    spec_path = write_spec(tmp_path, doc)
    state = stages_flow(spec_path, "distill", return_state=True)
    with pytest.raises(
        KdrayError,
        match=r"stage 'student' reads stage 'teacher' \(train\), which has no finished "
        r"artifact.*Run it first: python flows/stages.py train SPEC --stages teacher",
    ):
        state.result()
    assert [o["stage"] for o in stages_flow(spec_path, "train")] == ["teacher"]
    (student,) = stages_flow(spec_path, "distill", stages=["student"])
    assert (student["stage"], student["kind"], student["status"]) == ("student", "distill", "ran")
    assert open_artifact(student["uri"]).manifest["parents"][0]["ref"] == "teacher"


def test_one_flow_runs_any_kind_and_refuses_an_unknown_one(tmp_path):
    """``flows/stages.py KIND SPEC``: one parametrised flow for every registered kind (no copy per kind);
    a kind that does not exist is named with the known ones before anything runs."""
    spec = spec_to_json(parse_pipeline(synthetic_pipeline(tmp_path)))
    with pytest.raises(KdrayError, match=r"unknown stage kind 'distil'; did you mean 'distill'\? Known: adapt, "):
        select_stages(spec, "distil")
    done = subprocess.run(
        [sys.executable, str(REPO / "flows" / "stages.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0 and "kind" in done.stdout and "spec_uri" in done.stdout, done.stderr
