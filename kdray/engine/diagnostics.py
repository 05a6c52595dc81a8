"""Instruments for tests and for finding out where a run ran; the training loop knows none of this.

* a **fault** (``job.extras["fault"]`` or ``$KDRAY_INJECT_FAULT`` with a ``stage`` name):
  ``{"epoch": 1, "step": 3, "rank": 0, "marker": "/tmp/x", "how": "raise" | "kill" | "pause"}`` fails
  once, at that step of that epoch on that rank (the marker file makes it fire only on the first
  attempt; ``kill`` ends the worker process abruptly; ``pause`` holds the step until ``<marker>.go``
  exists, at most 120 s, so that a test can break something outside, such as the storage, at a known
  point). How fault-tolerance tests break a run for real.
* a **publish fault** (``$KDRAY_INJECT_FAULT`` = ``{"stage": ..., "how": "publish", "marker": ...}``): the
  stage's commit (its ``manifest.json``) fails once with "No space left on device", after its weights and
  files are written, as when the disk fills while publishing (``publish_store``).
* a **placement log** (``job.extras["placement_log"]``): each rank writes its node and process id.
* a **rows log** (``job.extras["rows_log"]``): each rank appends the row ids (``batch["index"]``) of
  every training batch to ``rank<r>.jsonl``, one line per batch: ``{"epoch": e, "rows": [...]}``.
"""

from __future__ import annotations

import errno
import json
import os
import time
from typing import Any

import torch.nn as nn

from kdray.contracts.checkpoint import MANIFEST
from kdray.contracts.stage import Job
from kdray.core.storage import Storage


def fault_for(job: Job) -> dict[str, Any] | None:
    fault = job.extras.get("fault")
    if fault is None:
        env = json.loads(os.environ.get("KDRAY_INJECT_FAULT") or "null")
        fault = env if env and env.get("stage") == job.spec.name and env.get("how") != "publish" else None
    return fault


def publish_store(stage: str, store: Storage) -> Storage:
    """The artifact folder a stage publishes to: ``store``, or one whose commit fails once (a publish fault)."""
    fault = json.loads(os.environ.get("KDRAY_INJECT_FAULT") or "null")
    if not fault or fault.get("stage") != stage or fault.get("how") != "publish":
        return store
    return _FullAtCommit(store.uri(), fault["marker"])


class _FullAtCommit(Storage):
    """A storage folder whose ``manifest.json`` write fails once with ENOSPC (the disk filled while publishing)."""

    def __init__(self, uri: str, marker: str):
        super().__init__(uri)
        self.marker = marker

    def write_bytes(self, rel: str, data: bytes) -> None:
        if rel == MANIFEST and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise self._wrap("write", rel, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path(rel)))
        super().write_bytes(rel, data)


def instrument(job: Job, rank: int):
    """The loop's ``instrument(method)`` callback for this job: installs a fault if one is configured."""
    fault = fault_for(job)
    rows_log = job.extras.get("rows_log")

    def install(method: nn.Module) -> None:
        if rows_log:
            log_rows(method, rows_log, rank)
        if not fault or fault.get("rank", 0) != rank:
            return
        where = {"epoch": -1, "step": 0}
        on_epoch_start = method.on_epoch_start

        def count_epoch(epoch: int, progress: float) -> None:
            where.update(epoch=epoch, step=0)
            on_epoch_start(epoch, progress)  # type: ignore[operator]  # torch: Module.__getattr__

        def before_step(_module: nn.Module, _args: Any) -> None:
            if (where["epoch"], where["step"]) == (fault["epoch"], fault.get("step", 0)):
                fire(fault, where["epoch"], where["step"], rank)
            where["step"] += 1

        method.on_epoch_start = count_epoch  # type: ignore[method-assign, assignment]
        method.register_forward_pre_hook(before_step)

    return install


def log_rows(method: nn.Module, folder: str, rank: int) -> None:
    """Append each training batch's row ids to ``<folder>/rank<rank>.jsonl`` (validation is not logged)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"rank{rank}.jsonl")
    epoch = {"now": -1}
    on_epoch_start = method.on_epoch_start

    def count_epoch(e: int, progress: float) -> None:
        epoch["now"] = e
        on_epoch_start(e, progress)  # type: ignore[operator]  # torch: Module.__getattr__

    def record(_module: nn.Module, args: Any) -> None:
        batch = args[0] if args else None
        if isinstance(batch, dict) and "index" in batch:
            with open(path, "a") as f:
                f.write(json.dumps({"epoch": epoch["now"], "rows": batch["index"].tolist()}) + "\n")

    method.on_epoch_start = count_epoch  # type: ignore[method-assign, assignment]
    method.register_forward_pre_hook(record)


def fire(fault: dict[str, Any], epoch: int, step: int, rank: int) -> None:
    if os.path.exists(fault["marker"]):
        return
    open(fault["marker"], "w").close()
    if fault.get("how") == "pause":
        deadline = time.monotonic() + 120
        while not os.path.exists(fault["marker"] + ".go") and time.monotonic() < deadline:
            time.sleep(0.05)
        return
    if fault.get("how") == "kill":
        os.kill(os.getpid(), 9)
    raise RuntimeError(f"injected fault at epoch {epoch}, step {step}, rank {rank}")


def record_placement(job: Job, rank: int) -> None:
    """Write ``rank<r>.json`` (rank, Ray node id, pid) into ``job.extras["placement_log"]``, if set."""
    folder = job.extras.get("placement_log")
    if not folder:
        return
    import ray

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}, f)
