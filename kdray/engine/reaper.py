"""No Ray process outlives the command that started an embedded cluster, even after ``kill -9``.

When ``kdray run`` is killed with SIGKILL it cannot shut Ray down. Ray's GCS server and raylet
share the driver's fate, but processes they started (the dashboard and runtime-env agents, idle
workers) notice only minutes later. So ``ensure_ray`` starts this module as a tiny watcher process
after it starts a cluster:

    python -m kdray.engine.reaper SESSION_NAME GCS_ADDRESS

It holds the read end of a pipe whose write end only the driver has, and blocks on it. The pipe
closes when the driver exits, however it exits; the watcher then ends, with SIGKILL, every process
of that cluster, and exits: those whose command line names the cluster's session (GCS, raylet,
agents), and those that started with ``RAY_ADDRESS=GCS_ADDRESS`` in their environment (worker and
actor processes, which retitle their command line; ``embedded_cluster_env`` gives every process of
an embedded cluster that address, unique to it). Linux only (it reads ``/proc``); elsewhere it only waits.

This module imports nothing but the standard library: it starts in a few tens of milliseconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import IO


def session_pids(session: str, exclude: set[int], address: str = "") -> list[int]:
    """Process ids whose command line names the Ray session (``session_2026-...``) or whose initial
    environment holds ``RAY_ADDRESS=<address>``."""
    needle = session.encode()
    env_entry = f"RAY_ADDRESS={address}".encode() if address else None
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                hit = needle in f.read()
            if not hit and env_entry:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    hit = env_entry in f.read().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if hit:
            found.append(int(entry))
    return found


def reap(session: str, address: str = "", rounds: int = 5, pause_s: float = 0.5) -> int:
    """SIGKILL the cluster's processes, a few rounds apart (a dying raylet may still start one); how many."""
    killed: set[int] = set()
    for _ in range(rounds):
        pids = session_pids(session, {os.getpid()}, address)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except OSError:
                pass
        time.sleep(pause_s)
    return len(killed)


def watch(session: str, address: str) -> subprocess.Popen[bytes]:
    """Start the watcher for the cluster; the returned process's stdin is the pipe (keep it open)."""
    return subprocess.Popen(
        [sys.executable, "-m", "kdray.engine.reaper", session, address],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # out of the terminal's process group: a Ctrl-C is the driver's to handle
        close_fds=True,
    )


def stop(watcher: subprocess.Popen[bytes] | None, timeout_s: float = 10.0) -> None:
    """After a clean ``ray.shutdown()``: close the pipe; the watcher reaps stragglers, if any, and exits."""
    if watcher is None:
        return
    stdin: IO[bytes] | None = watcher.stdin
    if stdin is not None:
        stdin.close()
    try:
        watcher.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        watcher.kill()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m kdray.engine.reaper SESSION_NAME GCS_ADDRESS", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the pipe's end ends the watch
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except OSError:
        pass
    reap(argv[0], argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
