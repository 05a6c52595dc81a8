"""``kdray cluster up`` / ``down``: a local Ray cluster that later commands join instead of starting their own.

Real commands and a real ``ray start`` (token authentication on, Ray's default); the cluster's record lives
in a temporary ``KDRAY_CLUSTER_FILE``, so nothing here sees or leaves a user's cluster.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdray.engine import cluster, reaper

BIN = Path(sys.executable).parent


def env_for(cluster_file: Path) -> dict[str, str]:
    """A user's environment (no ``RAY_*`` left by an embedded Ray of this test process) with its own record."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["KDRAY_CLUSTER_FILE"] = str(cluster_file)
    return env


def kdray(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "kdray"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_a_record_whose_cluster_is_gone_is_ignored(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    record = tmp_path / "cluster.json"
    record.write_text(json.dumps({"address": f"127.0.0.1:{port}", "session": "session_gone"}))
    monkeypatch.setenv("KDRAY_CLUSTER_FILE", str(record))
    assert cluster.recorded() == {"address": f"127.0.0.1:{port}", "session": "session_gone"}
    assert cluster.running() is None  # ensure_ray then starts its own cluster, as without a record
    record.write_text("not json")
    assert cluster.recorded() is None


@pytest.mark.slow
def test_up_then_a_run_joins_it_then_down_stops_only_it(tmp_path):
    env = env_for(tmp_path / "cluster.json")
    up = kdray(["cluster", "up", "--cpus", "2"], env, tmp_path)
    assert up.returncode == 0, up.stderr[-3000:]
    doc = json.loads((tmp_path / "cluster.json").read_text())
    try:
        assert "kdray cluster down" in up.stdout and doc["address"] in up.stdout
        assert doc["auth_mode"] == "token" and doc["session"].startswith("session_")
        assert cluster.answers(doc["address"])
        again = kdray(["cluster", "up"], env, tmp_path)  # idempotent: the same cluster
        assert again.returncode == 0 and "already up" in again.stdout
        assert json.loads((tmp_path / "cluster.json").read_text())["address"] == doc["address"]

        spec = tmp_path / "one.yaml"
        data = {"name": "synthetic", "options": {"num_samples": 128, "image_size": 8, "num_classes": 4}}
        spec.write_text(
            yaml.safe_dump(
                {
                    "name": "joined",
                    "storage": {"uri": f"file://{tmp_path}/runs"},
                    "run": {"workers": 1, "cpus_per_worker": 1},
                    "stages": [
                        {
                            "name": "fit",
                            "kind": "train",
                            "model": {"name": "mlp_64"},
                            "data": data,
                            "optim": {"epochs": 1, "batch_size": 32, "lr": 3e-3},
                        }
                    ],
                }
            )
        )
        done = kdray(["run", str(spec), "--json"], env, tmp_path)
        assert done.returncode == 0, done.stderr[-4000:]
        assert [o["status"] for o in json.loads(done.stdout)] == ["ran"]
        # the run's Ray Train worker ran in the recorded cluster (its session's logs), and the cluster
        # outlived the command that used it
        logs = Path(doc["temp_dir"]) / doc["session"] / "logs"
        train_logs = logs / "train"
        assert train_logs.is_dir() and any(train_logs.iterdir()), "no Ray Train run in the recorded cluster"
        assert cluster.answers(doc["address"])
    finally:
        down = kdray(["cluster", "down"], env, tmp_path)
    assert down.returncode == 0 and doc["address"] in down.stdout
    assert not (tmp_path / "cluster.json").exists()
    assert not cluster.answers(doc["address"])
    assert reaper.session_pids(doc["session"], {os.getpid()}, doc["address"]) == []
    assert "No kdray cluster" in kdray(["cluster", "down"], env, tmp_path).stdout
