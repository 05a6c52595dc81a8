"""What lets stages of one pipeline run at the same time: a CPU budget, one in-process slot, child processes.

* ``CPUS`` is this process's budget of CPUs for stages: a stage holds ``workers * cpus_per_worker``
  (a Ray Train run), ``cpus_per_worker`` (the loop in a process here: ``workers: 0``, ``evaluate``)
  or nothing (a remote launcher: the cluster queues its own work), out of the CPUs of the Ray
  cluster this process is connected to, or of this machine.
* At most **one** local stage runs *in this process* at a time (``in_process_slot``): the
  ``workers: 0`` loop and the stage kinds' driver-side work (teacher caches, data-free synthesis)
  use process-wide torch state, its default random generator (weight init, dropout) and its thread
  count, so two of them in threads of one process would make each other's results depend on timing.
  Ray Train V2 itself allows ``TorchTrainer.fit()`` from several threads (each fit has its own
  controller actor; the SIGINT handler is only installed from the main thread), but that would
  not isolate the driver-side work.
* Any other local stage runs in a child process, ``python -m kdray.worker <stage.json>`` (what a
  cluster runs for the remote launchers), joined to this process's Ray cluster through
  ``RAY_ADDRESS``; its output comes back line by line through ``log`` and its outcome as the JSON
  line it prints last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from kdray.core.errors import KdrayError
from kdray.engine.driver import ensure_ray, ray_child_env
from kdray.engine.launchers import ANSI, WORKER_COMMAND, log_tail, write_stage_file
from kdray.engine.resolved import ResolvedStage

Log = Callable[[str], None]
INTERRUPT_GRACE_S = 30.0  # how long an interrupted child may take to stop its Ray run before it is killed


class CpuBudget:
    """CPUs held by the stages this process runs, out of Ray's CPUs (if connected) or the machine's."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.held = 0.0

    @staticmethod
    def total() -> float:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            try:
                cpus = float(ray.cluster_resources().get("CPU", 0))
                if cpus > 0:
                    return cpus
            except Exception:  # a client connection that went away: fall back to this machine
                pass
        return float(os.cpu_count() or 1)

    def try_acquire(self, need: float) -> float | None:
        """Reserve ``need`` CPUs if they are free (a stage larger than the budget only when nothing else
        runs); return the amount to release, or None."""
        with self._cond:
            need = min(need, self.total())
            if self.held <= 1e-9 or self.held + need <= self.total() + 1e-9:
                self.held += need
                return need
            return None

    def release(self, amount: float) -> None:
        with self._cond:
            self.held = max(0.0, self.held - amount)
            self._cond.notify_all()

    @contextmanager
    def hold(self, need: float) -> Iterator[None]:
        """Wait until ``need`` CPUs are free and hold them for the block."""
        with self._cond:
            while (got := self.try_acquire(need)) is None:
                self._cond.wait()
        try:
            yield
        finally:
            self.release(got)


CPUS = CpuBudget()


class _Slot:
    """The one in-process place for a local stage; re-entrant for the thread that holds it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._depth = 0

    @contextmanager
    def take(self) -> Iterator[bool]:
        """Yield True if this thread now holds the slot (release on exit), False if another thread does."""
        me = threading.get_ident()
        if self._owner != me and not self._lock.acquire(blocking=False):
            yield False
            return
        self._owner, self._depth = me, self._depth + 1
        try:
            yield True
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._lock.release()


in_process_slot = _Slot()

_children: set[subprocess.Popen] = set()
_children_lock = threading.Lock()


def ray_address_for(stage: ResolvedStage) -> str | None:
    """The Ray address a child running ``stage`` joins: the stage's ``run.address``, or this process's
    embedded Ray (started here first, so that all stages share one cluster); None if it needs no Ray."""
    if not stage.needs_ray:
        return None
    run = stage.run
    if run.address:
        return run.address
    ensure_ray(run)
    import ray  # started by ensure_ray just above

    return str(ray.get_runtime_context().gcs_address)


def run_in_child(stage: ResolvedStage, *, force: bool, log: Log) -> dict[str, Any]:
    """Run one stage in a child process (``python -m kdray.worker``); return its outcome's JSON.

    A user error in the child (exit code 2, ``error: ...``) is raised here as a ``KdrayError``;
    any other failure as a ``RuntimeError`` with the end of the child's log.
    """
    name = stage.name
    uri = write_stage_file(stage, force=force)
    address = ray_address_for(stage)  # first: starting the cluster sets what the child must inherit
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if address:
        env.update(ray_child_env(), RAY_ADDRESS=address)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdray.worker", uri],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        env=env,
    )
    with _children_lock:
        _children.add(proc)
    tail: deque[str] = deque(maxlen=60)
    outcome: dict[str, Any] | None = None
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = ANSI.sub("", raw.rstrip("\n"))
            doc = _outcome(line, name)
            if doc is not None:
                outcome = doc
                continue
            if line.strip():
                tail.append(line)
                log(line)
        rc = proc.wait()
    finally:
        with _children_lock:
            _children.discard(proc)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if rc == 0 and outcome is not None:
        return outcome
    errors = [t for t in tail if t.startswith("error: ")]
    if rc == KdrayError.exit_code and errors:
        raise KdrayError(errors[-1][len("error: ") :])
    raise RuntimeError(
        f"stage {name!r} failed in its child process `{WORKER_COMMAND} {uri}` (exit code {rc}):\n"
        + log_tail("\n".join(tail))
    )


def _outcome(line: str, name: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        doc = json.loads(line)
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) and doc.get("stage") == name and "uri" in doc else None


def interrupt_children(grace_s: float = INTERRUPT_GRACE_S) -> None:
    """Send SIGINT to every running child stage (Ray Train aborts its run), kill those still alive after ``grace_s``."""
    with _children_lock:
        procs = list(_children)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
