"""Run a pipeline: every stage whose parents are finished, each keyed by its spec and its parents.

A stage's key is the hash of its spec and its parents' keys (or, for an artifact URI parent, its
weights hash), so changing one stage reruns it and its descendants only. A stage whose key
already has a manifest is "cached" and not run again, unless ``force``.

Stages that do not depend on each other run at the same time, as far as the CPUs allow
(``kdray.engine.concurrency``): a stage that runs alone runs in this process; stages that overlap run
in child processes (``python -m kdray.worker``) joined to the same Ray cluster, their log lines
prefixed with the stage name. A failed stage stops only the stages that depend on it; the others
finish and are published, then ``run_pipeline`` raises the first failure (its notes name every failed
stage and the stages not run).

Where a stage runs is its ``run.launcher`` (``kdray.engine.launchers``): ``local`` in this process, ``ray`` as a
job on an existing Ray cluster, ``kuberay`` as a RayJob on Kubernetes. ``evaluate`` stages always run
locally: they only read finished artifacts and need no cluster.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Literal

from kdray.contracts.checkpoint import Artifact, open_artifact, read_artifact
from kdray.contracts.specs import is_artifact_uri, spec_hash
from kdray.contracts.stage import kind_of
from kdray.core import layout
from kdray.core.errors import KdrayError
from kdray.core.meter import short_time
from kdray.core.storage import Storage
from kdray.core.usercode import from_user_code
from kdray.data import lineage
from kdray.engine import concurrency
from kdray.engine.launchers import LAUNCHERS, artifact_store, kuberay, local, ray  # noqa: F401 (registers them)
from kdray.engine.preflight import preflight
from kdray.engine.resolved import ResolvedStage, resolve, resolve_stage
from kdray.engine.spec import PipelineSpec
from kdray.engine.specpaths import as_written

KEY_LENGTH = 12


@dataclass
class StageOutcome:
    stage: str
    kind: str
    key: str
    uri: str
    status: str  # "ran" | "cached"
    seconds: float
    metrics: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def stage_key(stage: Any, parent_keys: dict[str, str], written: dict[str, str] | None = None) -> str:
    """The content key of a stage: its spec (without the run placement) and its parents' keys. File
    paths taken from the spec's folder count as written (``written``: kdray.engine.specpaths)."""
    spec = as_written(stage.model_dump(mode="json", exclude={"run"}), written or {})
    return spec_hash({"spec": spec, "parents": parent_keys})[:KEY_LENGTH]


def plan(spec: PipelineSpec) -> dict[str, str]:
    """Stage name -> key, for the whole pipeline (no I/O except reading URI parents' manifests)."""
    keys: dict[str, str] = {}
    for stage in spec.stages:
        parents = {}
        for _, ref in stage.references():
            parents[ref] = open_artifact(ref).manifest["key"] if is_artifact_uri(ref) else keys[ref]
        seed = spec.run_for(stage).seed  # the seed changes results, so it is part of the key
        keys[stage.name] = stage_key(stage, {**parents, "_seed": str(seed)}, spec.written.get(stage.name))
    return keys


def run_pipeline(
    spec: PipelineSpec,
    *,
    force: bool | list[str] = False,
    only: list[str] | None = None,
    log: Callable[[str], None] = print,
    max_concurrent: int | None = None,
) -> list[StageOutcome]:
    """Run every stage (or ``only`` these) as soon as its parents are finished and its CPUs are free
    (at most ``max_concurrent`` at a time; 1 runs them one by one, in order); ``force`` reruns all
    (True) or the named stages. Returns the outcomes in pipeline order."""
    for name in [*(only or []), *(force if isinstance(force, list) else [])]:
        spec.stage(name)  # `--only nosuch` is an error with a did-you-mean, not a run of nothing
    preflight(spec)  # every file the spec names exists, S3 has credentials: before any stage starts
    root = Storage(spec.storage.uri)
    root.check_writable()
    keys = plan(spec)
    names = [s.name for s in spec.stages if only is None or s.name in only]
    forced = {n for n in names if force is True or (isinstance(force, list) and n in force)}
    return _Scheduler(spec, keys, names, forced, log, max_concurrent or len(names) or 1).run()


def run_stage(
    spec: PipelineSpec,
    name: str,
    *,
    force: bool = False,
    keys: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> StageOutcome:
    """Run one stage whose parents are finished (or return its cached artifact).

    This is the unit a Prefect task runs: it needs nothing from the caller but the spec, so a
    retry (or another process) can run it again and Ray resumes from the stage's last checkpoint.
    The stage runs where its resolved ``launcher`` says (``kdray.engine.launchers``); a remote launcher
    returns once the cluster has published the artifact, which is then read back from storage.
    Called from several threads at once (Prefect's submitted tasks), each call first waits for its
    stage's CPUs (``concurrency.CPUS``), and a local stage runs in a child process if another thread
    already runs one in this process.
    """
    keys = keys or plan(spec)
    stale: set[str] = set()
    cached = None if force else cached_outcome(spec, name, keys, log=log, stale=stale)
    if cached is not None:
        return cached
    with concurrency.CPUS.hold(resolve_stage(spec, name, keys).cpus):
        return launch_stage(spec, name, keys, force=force or name in stale, log=log)


def cached_outcome(
    spec: PipelineSpec,
    name: str,
    keys: dict[str, str],
    *,
    log: Callable[[str], None] = print,
    stale: set[str] | None = None,
) -> StageOutcome | None:
    """The outcome of a stage whose artifact already exists and is current (logged as cached), else None.

    An artifact is not believed when the data it was made from changed since (its manifest's data
    fingerprints, ``kdray.data.lineage``) or a parent was published again with other weights: the stage
    is then added to ``stale`` (it must start over, not resume its old run) and the reason is logged.
    """
    t0 = time.perf_counter()
    stage = resolve_stage(spec, name, keys)
    store, root = stage.store, stage.root
    art = read_artifact(store)
    if art is None:
        return None
    reasons = stale_reasons(spec, name, art, keys, root, log)
    if reasons:
        log(
            f"[{spec.name}] stage {name}: not using the cached artifact at {store.uri()}: {'; '.join(reasons)}; rerunning it"
        )
        if stale is not None:
            stale.add(name)
        return None
    log(f"[{spec.name}] stage {name}: cached at {store.uri()}")
    return _outcome(spec, name, keys[name], art, "cached", t0)


def stale_reasons(
    spec: PipelineSpec, name: str, art: Artifact, keys: dict[str, str], root: Storage, log: Callable[[str], None]
) -> list[str]:
    """Why a finished artifact no longer matches its inputs: a parent published again with other
    weights, or data whose fingerprint differs from the one its manifest records. Empty: it is current.

    A dataset that cannot be read here (an unfinished import, a deleted folder) is an error, except for a
    stage that runs on a cluster (``run.launcher``), whose data may be reachable only from there."""
    stage = spec.stage(name)
    reasons, parents = [], {}
    for record in art.manifest.get("parents") or []:
        ref = record.get("ref") if isinstance(record, dict) else None
        if not isinstance(ref, str):
            continue
        now = (
            read_artifact(ref)
            if is_artifact_uri(ref)
            else (read_artifact(artifact_store(root, spec.name, ref, keys[ref])) if ref in keys else None)
        )
        if now is None:
            continue  # the parent is gone: this artifact is still what it was made from
        parents[ref] = now
        was_w, now_w = record.get("weights_sha256"), now.weights_sha256
        if (was_w or now_w) and was_w != now_w:
            reasons.append(
                f"parent {ref} was published again since, with other weights ({str(now_w)[:12]}, was {str(was_w)[:12]})"
            )
        elif not (was_w or now_w) and record.get("version_uri") not in (None, now.pinned_uri):
            reasons.append(f"parent {ref} was published again since ({now.pinned_uri})")
    recorded = art.manifest.get("data")
    try:
        now_data = lineage.of_datasets(kind_of(stage).datasets(stage, parents))
    except KdrayError as e:
        if resolve_stage(spec, name, keys).launcher == "local":
            raise
        log(f"[{spec.name}] stage {name}: its data is not readable here, so its fingerprint is not checked ({e})")
        return reasons
    if isinstance(recorded, dict):
        reasons += [f"data changed since the cached artifact: {c}" for c in lineage.changes(recorded, now_data)]
    return reasons


def launch_stage(
    spec: PipelineSpec,
    name: str,
    keys: dict[str, str],
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
    where: Literal["auto", "child"] = "auto",
) -> StageOutcome:
    """Run the stage now (no cache check, no CPU reservation) and return its outcome.

    A remote launcher always runs from this thread (it only follows a job). A local stage runs in
    this process (``where="auto"``, unless another thread runs a stage here) or in a child process.
    """
    stage = resolve_stage(spec, name, keys)
    store = stage.store
    try:
        return _launch(stage, keys, force=force, log=log, where=where)
    except KdrayError as e:
        if e.details and "The full traceback is in" not in str(e):  # a user's code or a Ray worker failed
            e.args = (f"{e}{traceback_told(store, e.details)}",)
        raise
    except Exception as e:
        err = from_user_code(e, stage=name)  # the user's code, run here (a teacher cache, an evaluation)
        trace = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        if err is not None:
            raise KdrayError(f"{err}{traceback_told(store, trace)}") from None
        e.add_note(f"stage {name!r} failed;{traceback_told(store, trace).rstrip('.')}")
        raise


def traceback_told(store: Storage, text: str) -> str:
    """Write a failed stage's full traceback beside its artifact (``logs/failure-<UTC time>.log``) and
    return the sentence that says where it is (or that `--debug` prints it, if it could not be written)."""
    rel = f"{layout.LOGS}/failure-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.log"
    try:
        store.write_bytes(rel, text.encode())
    except Exception:  # the log is a courtesy: never hide the failure behind a second one
        return " The full traceback could not be written beside the artifact; `--debug` prints it."
    uri = store.uri(rel)
    return f" The full traceback is in {uri[len('file://') :] if uri.startswith('file://') else uri}."


def _launch(
    stage: ResolvedStage,
    keys: dict[str, str],
    *,
    force: bool,
    log: Callable[[str], None],
    where: Literal["auto", "child"],
) -> StageOutcome:
    t0 = time.perf_counter()
    parents = parent_artifacts(stage.spec, stage.stage, keys, stage.root)  # a missing parent fails here, first
    if stage.launcher != "local":
        return _launch_here(stage, parents, force=force, log=log, t0=t0)
    if where == "auto":
        with concurrency.in_process_slot.take() as here:
            if here:
                return _launch_here(stage, parents, force=force, log=log, t0=t0)
    log(f"[{stage.pipeline}] stage {stage.name} ({stage.stage.kind}) -> {stage.store.uri()} in a child process")
    doc = concurrency.run_in_child(stage, force=force, log=log)
    art = read_artifact(stage.store)
    if art is None:
        raise KdrayError(
            f"the child process finished stage {stage.name!r}, but {stage.store.uri()} has no manifest.json",
            hint="Read the stage's log above.",
        )
    return _outcome(stage.spec, stage.name, stage.key, art, str(doc.get("status", "ran")), t0)


def _launch_here(
    stage: ResolvedStage,
    parents: dict[str, Artifact],
    *,
    force: bool,
    log: Callable[[str], None],
    t0: float,
) -> StageOutcome:
    launcher, name, store = stage.launcher, stage.name, stage.store
    via = "" if launcher == "local" else f" via the {launcher} launcher"
    log(f"[{stage.pipeline}] stage {name} ({stage.stage.kind}) -> {store.uri()}{via}")
    art = LAUNCHERS.get(launcher)().run(stage, log, parents=parents, force=force)
    if art is None:  # a remote launcher: the artifact was published by the cluster, read it back
        art = read_artifact(store)
        if art is None:
            raise KdrayError(
                f"the {launcher} launcher finished stage {name!r}, but {store.uri()} has no "
                "manifest.json: the remote run did not publish its artifact",
                hint="Check that the cluster writes to the same storage as this machine "
                "(storage.uri, KDRAY_S3_ENDPOINT) and read the job's log above.",
            )
    return _outcome(stage.spec, name, stage.key, art, "ran", t0)


def _outcome(spec: PipelineSpec, name: str, key: str, art: Artifact, status: str, t0: float) -> StageOutcome:
    kind = spec.stage(name).kind
    return StageOutcome(
        name, kind, key, art.uri, status, round(time.perf_counter() - t0, 3), art.manifest.get("metrics", {})
    )


class _Scheduler:
    """Runs the chosen stages of a pipeline as a DAG: every stage whose parents are finished starts as
    soon as its CPUs are free (``concurrency.CPUS``). One stage that runs alone runs here, in this
    thread (Ctrl-C reaches it as before); stages that overlap run in child processes, each followed by
    a thread whose log lines carry the stage's name. A failure skips the stages that depend on it.

    Two stages that read the same parent never run at the same time: what they derive from it on the
    driver side (a teacher-output cache, data-free samples) is shared by key, and is built by the first.
    """

    def __init__(
        self,
        spec: PipelineSpec,
        keys: dict[str, str],
        names: list[str],
        forced: set[str],
        log: Callable[[str], None],
        max_concurrent: int,
    ):
        self.spec, self.keys, self.names, self.forced, self._log = spec, keys, names, forced, log
        self.stages = resolve(spec, keys)
        self.max_concurrent = max(1, max_concurrent)
        self.reads = {n: {ref for _, ref in spec.stage(n).references()} for n in names}
        self.parents = {n: [ref for _, ref in spec.stage(n).references() if ref in names] for n in names}
        self.width = max((len(n) for n in names), default=0)
        self.done: dict[str, StageOutcome] = {}
        self.failed: dict[str, Exception] = {}
        self.not_run: dict[str, str] = {}  # stage -> the failed stage it depends on
        self.running: dict[str, float] = {}  # stage -> the CPUs it holds
        self.events: queue.Queue[tuple[str, StageOutcome | None, BaseException | None]] = queue.Queue()
        self.abort = threading.Event()
        self.lock = threading.Lock()

    def log(self, message: str) -> None:
        with self.lock:
            self._log(message)

    def run(self) -> list[StageOutcome]:
        pending = list(self.names)
        try:
            while pending or self.running:
                self._drop_dependants(pending)
                ready = [n for n in pending if all(p in self.done for p in self.parents[n])]
                cached = False
                for n in ready:
                    outcome = (
                        None
                        if n in self.forced
                        else cached_outcome(self.spec, n, self.keys, log=self.log, stale=self.forced)
                    )
                    if outcome is not None:
                        pending.remove(n)
                        self.done[n] = outcome
                        cached = True
                if cached:  # their children may be ready now
                    continue
                start: list[tuple[str, float]] = []
                for n in ready:
                    busy = [*self.running, *(m for m, _ in start)]
                    if len(busy) >= self.max_concurrent or any(self.reads[n] & self.reads[m] for m in busy):
                        continue
                    got = concurrency.CPUS.try_acquire(self.stages[n].cpus)
                    if got is not None:
                        start.append((n, got))
                        pending.remove(n)
                if len(start) == 1 and not self.running:
                    self._run_here(*start[0])
                    continue
                if start:
                    self.log(
                        f"[{self.spec.name}] starting {', '.join(n for n, _ in start)}"
                        + (f" alongside {', '.join(self.running)}" if self.running else "")
                        + f" ({concurrency.CPUS.held:g} of {concurrency.CPUS.total():g} CPUs held)"
                    )
                for n, cpus in start:
                    self._start(n, cpus)
                if not self.running:
                    if pending:  # cannot happen: references point to earlier stages
                        raise RuntimeError(f"stages {pending} can never start")
                    break
                self._collect(*self.events.get())
        except BaseException:  # an interrupt (or a bug here): stop what still runs, then raise
            self._stop()
            raise
        return self._finish()

    def _drop_dependants(self, pending: list[str]) -> None:
        for n in list(pending):
            bad = [p for p in self.parents[n] if p in self.failed or p in self.not_run]
            if bad:
                pending.remove(n)
                self.not_run[n] = self.not_run.get(bad[0], bad[0])
                self.log(f"[{self.spec.name}] stage {n} not run: it depends on stage {bad[0]}, which did not finish")

    def _run_here(self, name: str, cpus: float) -> None:
        self.running[name] = cpus
        try:
            outcome = launch_stage(self.spec, name, self.keys, force=name in self.forced, log=self.log)
        except Exception as e:
            self._collect(name, None, e)
            return
        self._collect(name, outcome, None)

    def _start(self, name: str, cpus: float) -> None:
        self.running[name] = cpus
        prefix = f"{name:<{self.width}} | "

        def log(message: str) -> None:
            if self.abort.is_set():  # a remote launcher stops its job when its log raises this
                raise KeyboardInterrupt
            for line in message.splitlines() or [""]:
                self.log(prefix + line)

        def body() -> None:
            try:
                out = launch_stage(self.spec, name, self.keys, force=name in self.forced, log=log, where="child")
                self.events.put((name, out, None))
            except BaseException as e:
                self.events.put((name, None, e))

        threading.Thread(target=body, name=f"kdray-stage-{name}", daemon=True).start()

    def _collect(self, name: str, outcome: StageOutcome | None, error: BaseException | None) -> None:
        concurrency.CPUS.release(self.running.pop(name))
        if outcome is not None:
            self.done[name] = outcome
            if self.running or len(self.names) > 1:
                self.log(f"[{self.spec.name}] stage {name} {outcome.status} in {short_time(outcome.seconds)}")
        elif isinstance(error, Exception):
            self.failed[name] = error
            first = (str(error).strip().splitlines() or [""])[0]
            self.log(f"[{self.spec.name}] stage {name} failed: {type(error).__name__}: {first}")
        elif error is not None:  # an interrupt inside a stage's thread: stop everything
            raise error

    def _stop(self) -> None:
        self.abort.set()
        if self.running:
            self.log(f"[{self.spec.name}] interrupted: stopping {', '.join(self.running)}")
        concurrency.interrupt_children()
        deadline = time.monotonic() + concurrency.INTERRUPT_GRACE_S
        while self.running and time.monotonic() < deadline:
            try:
                name, _, _ = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            concurrency.CPUS.release(self.running.pop(name, 0.0))
        for name in list(self.running):
            concurrency.CPUS.release(self.running.pop(name))

    def _finish(self) -> list[StageOutcome]:
        outcomes = [self.done[n] for n in self.names if n in self.done]
        if not self.failed:
            return outcomes
        failed = [n for n in self.names if n in self.failed]
        note = f"pipeline {self.spec.name!r}: stage{'s' if len(failed) > 1 else ''} failed: " + ", ".join(
            f"{n} ({type(self.failed[n]).__name__})" for n in failed
        )
        if self.not_run:
            note += "; not run (they depend on a failed stage): " + ", ".join(self.not_run)
        if outcomes:
            note += "; finished: " + ", ".join(o.stage for o in outcomes)
        self.log(f"[{self.spec.name}] {note}")
        error = self.failed[failed[0]]
        error.add_note(note)
        raise error


def parent_artifacts(
    spec: PipelineSpec, stage: Any, keys: dict[str, str], root: Storage | None = None
) -> dict[str, Artifact]:
    """Reference -> finished artifact, for every stage or URI that ``stage`` reads."""
    root = root or Storage(spec.storage.uri)
    return {ref: _existing(root, spec, ref, keys) for _, ref in stage.references()}


def _existing(root: Storage, spec: PipelineSpec, ref: str, keys: dict[str, str]) -> Artifact:
    """A parent that was not run in this call: an artifact URI, or an earlier stage's finished output."""
    if is_artifact_uri(ref):
        return open_artifact(ref)
    art = read_artifact(artifact_store(root, spec.name, ref, keys[ref]))
    if art is None:
        raise KdrayError(
            f"stage {ref!r} has no finished artifact for key {keys[ref]}",
            hint=f"Run it first (kdray run SPEC without --only, or --only {ref}).",
        )
    return art
