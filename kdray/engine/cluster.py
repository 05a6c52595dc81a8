"""A local Ray cluster that outlives one command: ``kdray cluster up`` starts it, every later ``kdray run``
(and flow, and child stage) on this machine joins it, ``kdray cluster down`` stops it.

Starting an embedded cluster is the largest fixed cost of a short run on Ray (``ray.init`` and its
shutdown, about 6 s of the 15 s a one-stage run pays on 2 CPUs, docs/benchmarks.md). A cluster started
once takes that out of every run. It is Ray's own ``ray start --head`` with the settings of an embedded
cluster (``driver.RAY_ENV``: worker niceness, Ray Train's intervals), token authentication on (Ray's
default: a token in ``~/.ray/auth_token``, generated if missing), its own temporary folder and GCS port.

Where it is, is one JSON file (``KDRAY_CLUSTER_FILE``, default ``~/.kdray/cluster.json``): the address,
the session, the temporary folder and the CPUs. ``ensure_ray`` joins the cluster it names when the
stage sets no ``run.address`` and the cluster answers; a file whose cluster is gone is ignored (and
removed by ``down``). ``down`` ends only that cluster's processes (``reaper``: those naming its session
or started with its address), never another Ray on the machine, as ``ray stop`` would.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from kdray.core.errors import KdrayError
from kdray.engine import reaper

START_TIMEOUT_S = 120.0  # `ray start` on a loaded 2-core machine takes 5-15 s
PROBE_TIMEOUT_S = 2.0


def cluster_file() -> str:
    """Where the running cluster is recorded (``KDRAY_CLUSTER_FILE``, default ``~/.kdray/cluster.json``)."""
    return os.environ.get("KDRAY_CLUSTER_FILE") or os.path.join(os.path.expanduser("~"), ".kdray", "cluster.json")


def recorded() -> dict[str, Any] | None:
    """The cluster the file names, or None (no file, or not kdray's JSON)."""
    try:
        with open(cluster_file()) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("address"), str) else None


def answers(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the GCS at ``host:port`` accepts a connection (bounded wait; no Ray import)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def running() -> dict[str, Any] | None:
    """The recorded cluster if it answers (what ``ensure_ray`` joins), else None."""
    doc = recorded()
    if doc is None or not answers(doc["address"]):
        return None
    return doc


def _ray_command() -> str:
    found = os.path.join(os.path.dirname(sys.executable), "ray")
    return found if os.path.exists(found) else (shutil.which("ray") or "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def up(settings: dict[str, str], cpus: int | None = None) -> tuple[dict[str, Any], bool]:
    """Start the cluster with these Ray settings (``driver.RAY_ENV``; the environment's own win), or find
    the one that runs; returns its record and whether it was started now."""
    doc = running()
    if doc is not None:
        return doc, False
    cpus = cpus or os.cpu_count() or 1
    port = _free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = tempfile.mkdtemp(prefix="kdray-ray-")  # short: Ray's socket paths live under it
    env = dict(os.environ)
    for k, v in settings.items():
        env.setdefault(k, v)
    env["RAY_ADDRESS"] = address  # every process of the cluster carries it: how `down` finds them
    if not env.get("RAY_AUTH_MODE"):  # Ray's default: token authentication, with a generated token
        subprocess.run(
            [_ray_command(), "get-auth-token", "--generate"],
            env=env,
            stdout=subprocess.DEVNULL,  # the token itself: never printed
            stderr=subprocess.DEVNULL,
            timeout=START_TIMEOUT_S,
            check=False,
        )
        env["RAY_AUTH_MODE"] = "token"
    command = [
        _ray_command(),
        "start",
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus}",
        "--include-dashboard=false",
        f"--object-store-memory={256 * 1024**2}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _reap_temp(temp_dir, address)
        raise KdrayError(
            f"kdray cluster up: `ray start` did not finish within {START_TIMEOUT_S:.0f} s",
            hint="The machine may be overloaded; try again, or read Ray's logs under " + temp_dir + ".",
        ) from None
    if proc.returncode != 0:
        _reap_temp(temp_dir, address)
        last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
        raise KdrayError(
            f"kdray cluster up: `ray start` failed (exit code {proc.returncode}): {last[:300]}",
            hint="Read Ray's logs under " + temp_dir + "; `kdray run` still starts its own cluster without one.",
        )
    doc = {
        "address": address,
        "session": _session(temp_dir),
        "temp_dir": temp_dir,
        "cpus": cpus,
        "auth_mode": env["RAY_AUTH_MODE"],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = cluster_file()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, path)
    return doc, True


def _session(temp_dir: str) -> str:
    latest = os.path.join(temp_dir, "session_latest")
    return os.path.basename(os.path.realpath(latest)) if os.path.exists(latest) else ""


def _reap_temp(temp_dir: str, address: str) -> None:
    session = _session(temp_dir)
    if session:
        reaper.reap(session, address)


def down() -> dict[str, Any] | None:
    """Stop the recorded cluster's processes and forget it; returns its record (None if there was none)."""
    doc = recorded()
    if doc is None:
        return None
    if doc.get("session"):
        reaper.reap(str(doc["session"]), str(doc["address"]))
    try:
        os.remove(cluster_file())
    except FileNotFoundError:
        pass
    if doc.get("temp_dir"):
        shutil.rmtree(str(doc["temp_dir"]), ignore_errors=True)
    return doc
