"""The driver side of training: ``fit(job)`` runs the loop here (``workers: 0``) or as a Ray Train
``TorchTrainer`` (``workers >= 1``), and returns the weights to publish and the history.

The Ray run name is deterministic (pipeline, stage, key), so building the trainer again with the
same ``RunConfig(name, storage_path)`` resumes the run where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from kdray.contracts.checkpoint import bytes_to_state
from kdray.contracts.specs import RunSpec
from kdray.contracts.stage import FitResult, Job, kind_of
from kdray.core import layout
from kdray.core.errors import KdrayError, StorageError
from kdray.core.storage import Storage
from kdray.core.usercode import from_user_code
from kdray.engine import cluster, diagnostics, progress, reaper
from kdray.engine.datasets import stream_cpus, stream_datasets, streams
from kdray.engine.loop import train
from kdray.engine.rayauth import token_auth_if_token_available
from kdray.engine.raylogs import quiet_ray_logs
from kdray.engine.raypolicy import find_user_error, trainer_class

# Settings that make a small Ray Train fit start in seconds on a laptop (see docs/architecture.md).
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # otherwise every worker line is printed twice
    "RAY_CHDIR_TO_TRIAL_DIR": "0",  # sweep trials run where kdray was started: relative paths in a spec hold
    # Ray starts its workers at nice 15, below everything else on the node; here they do the training, and at
    # nice 15 any other process (even the driver's progress output) takes the CPU from them (docs/benchmarks.md)
    "RAY_worker_niceness": "0",
}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: Ray supplies rank, device, checkpoints and reporting."""
    import ray.train
    import ray.train.torch

    job = Job.from_config(config)
    quiet_ray_logs()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device() if job.run.use_gpu else torch.device("cpu")
    resume_from = None
    if ray.train.get_checkpoint():
        resume_from = ray.train.get_checkpoint().to_directory(tempfile.mkdtemp(prefix="kdray-resume-"))

    def report(metrics: dict[str, Any], folder: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(folder) if folder else None
        ray.train.report(metrics, checkpoint=ckpt)  # every rank calls it: it is a barrier
        if folder:  # Ray has copied it to storage
            shutil.rmtree(folder, ignore_errors=True)

    def wrap(method: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(method, move_to_device=False)

    diagnostics.record_placement(job, rank)
    with user_code_errors(job):
        train(
            job,
            rank=rank,
            world=ctx.get_world_size(),
            device=device,
            resume_from=resume_from,
            report=report,
            wrap=wrap,
            instrument=diagnostics.instrument(job, rank),
            progress=progress.worker_progress(config.get("progress_hub"), rank, f"{job.pipeline}/{job.spec.name}"),
        )


@contextlib.contextmanager
def user_code_errors(job: Job) -> Iterator[None]:
    """An exception raised in the user's own code (a ``model.import`` network) leaves the block as a
    ``UserCodeError``: one paragraph, exit code 2, no retry by Ray; its traceback travels in ``details``."""
    try:
        yield
    except Exception as e:
        model = getattr(job.spec, "model", None)
        field = f"stages.{job.spec.name}.model.import" if getattr(model, "import_", None) else None
        err = from_user_code(e, stage=job.spec.name, field=field)
        if err is None:
            raise
        raise err from None


class Interrupted(BaseException):
    """SIGINT or SIGTERM while a command runs: unwinds like KeyboardInterrupt, carrying the signal."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM


_catching = False


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def _install_handlers() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_interrupted)


@contextlib.contextmanager
def catch_signals() -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM raise ``Interrupted`` in this (main) thread, also
    after Ray starts; the previous handlers come back afterwards (a long-lived process, such as a
    test runner or a Prefect worker, keeps its own).

    Embedded Ray installs its own SIGTERM handler (it exits 1 mid-call); ``ensure_ray`` puts this
    one back, and the CLI then shuts Ray down itself (``shutdown_ray``), leaving no Ray process.
    """
    global _catching
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    _catching = True
    _install_handlers()
    try:
        yield
    finally:
        _catching = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def shutdown_ray() -> None:
    """Stop the Ray this process started or joined (a no-op without one)."""
    global _watcher
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    reaper.stop(_watcher)  # it ends what the shutdown left behind, if anything
    _watcher = None


@contextlib.contextmanager
def embedded_cluster_env() -> Iterator[None]:
    """The environment an embedded cluster's processes start with (see docs/architecture.md, "Logs").

    * Token authentication stays on (Ray 2.59+'s default for a local cluster: a generated token in
      ``~/.ray/auth_token``); only Ray's notice that it chose this default is kept out of the log.
    * ``RAY_ADDRESS`` (and the GCS port it names): Ray processes that look their cluster up (Ray
      Train's PlacementGroupCleaner uses the state API) otherwise scan the machine's processes and
      fail when another Ray instance runs there. Set only while the cluster starts, so its processes
      inherit it and this process keeps its own environment.
    """
    if os.environ.get("RAY_ADDRESS"):  # joining a parent's cluster: it already set all this
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RAY_GCS_SERVER_PORT": str(port), "RAY_ADDRESS": f"127.0.0.1:{port}"}
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_watcher: subprocess.Popen[bytes] | None = None  # kdray.engine.reaper, while this process runs a cluster
_ray_lock = threading.Lock()  # stages of one pipeline may start at once, from several threads


class _NotMainThreadNotice(logging.Filter):
    """Drops Ray's notice that ``ray.init`` ran outside the main thread: kdray starts Ray on its own
    thread on purpose (``_RayHost``) and installs its own signal handlers (``catch_signals``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


class _RayHost:
    """The one thread that starts (or joins) Ray for this process; it lives as long as the process.

    Ray starts an embedded cluster's GCS server and raylet with ``prctl(PR_SET_PDEATHSIG, SIGKILL)``,
    and Linux sends that signal when the *thread* that started them ends, not the process. Started from
    a stage's thread, or from a Prefect task's worker thread, the cluster was killed the moment that
    thread finished, under every stage still running or yet to come (their driver then aborted in Ray's
    C++ client: "Failed to connect to GCS within 60 seconds"). So ``ray.init`` always runs here, on a
    daemon thread that never returns: the cluster shares the fate of the process, as Ray intends (and
    ``kdray.engine.reaper`` ends it if the process is killed).
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], None], concurrent.futures.Future[None]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the host thread and wait for it (its exception is raised here)."""
        if threading.current_thread() is self._thread:
            fn()
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="kdray-ray-host", daemon=True)
                self._thread.start()
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._jobs.put((fn, done))
        done.result()

    def _serve(self) -> None:
        while True:
            fn, done = self._jobs.get()
            try:
                fn()
            except BaseException as e:  # handed to the caller, which raises it in its own thread
                done.set_exception(e)
            else:
                done.set_result(None)


_ray_host = _RayHost()


def ensure_ray(run: RunSpec) -> None:
    """Start embedded Ray (or connect to ``run.address``) once per process, with laptop-friendly settings.

    Safe from any thread: the cluster is started on the process's Ray host thread (see ``_RayHost``).
    """
    with _ray_lock:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            return
        _ray_host.call(lambda: _ensure_ray(run))


def _ensure_ray(run: RunSpec) -> None:
    global _watcher
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return
    ray_worker_log = logging.getLogger("ray._private.worker")
    ray_worker_log.setLevel(logging.WARNING)  # "Using address ...", "Connecting to ...", "Connected ..."
    ray_worker_log.addFilter(_NotMainThreadNotice())
    # a light module: the hook runs in every Ray worker process, Ray Train's controller included
    runtime_env = {"worker_process_setup_hook": "kdray.engine.raylogs.quiet_ray_logs"}
    shared = None if run.address or os.environ.get("RAY_ADDRESS") else cluster.running()  # `kdray cluster up`
    if run.address or shared:
        _join_cluster(run.address or (shared or {})["address"], runtime_env)
    else:
        address = None if os.environ.get("RAY_ADDRESS") else "local"  # a parent's cluster, else a new one
        with embedded_cluster_env():
            gcs = os.environ["RAY_ADDRESS"]
            ray.init(
                address=address,
                num_cpus=os.cpu_count(),
                include_dashboard=False,
                runtime_env=runtime_env,
                object_store_memory=256 * 1024**2,
                logging_level=logging.WARNING,
                log_to_driver=False,  # workers' lines stay in Ray's log files (see docs/architecture.md, "Logs")
            )
        if address == "local":  # this process started the cluster: none of it may outlive it, even a kill -9
            node: Any = ray._private.worker._global_node  # no public API names the session
            _watcher = reaper.watch(node.session_name, gcs)


def _join_cluster(address: str, runtime_env: dict[str, Any]) -> None:
    """Connect this process to the Ray cluster at ``address`` (``run.address``, or ``auto``)."""
    import ray

    token_auth_if_token_available()
    try:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    except (ConnectionError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise KdrayError(
            f"run.address {address!r}: could not connect to the Ray cluster there ({first[:300]})",
            hint="Check that the cluster is up (`ray status --address ADDRESS`) and reachable from this machine. "
            "If it uses token authentication (Ray's default), give this process its token: "
            "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, or the token file RAY_AUTH_TOKEN_PATH "
            "(default ~/.ray/auth_token).",
        ) from None


def ray_child_env() -> dict[str, str]:
    """What a process joining this process's Ray cluster needs in its environment, beyond ``RAY_ADDRESS``:
    the authentication mode Ray chose when it started (or joined) the cluster, since a process that
    connects by address does not choose it (Ray's rule), and the settings in ``RAY_ENV``."""
    env = {k: os.environ.get(k, v) for k, v in RAY_ENV.items()}
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode:
        env["RAY_AUTH_MODE"] = mode
    return env


def fit(job: Job, storage: Storage) -> FitResult:
    """Run the job's training loop and return the trained weights and the per-epoch history.

    With ``run.workers >= 1`` the loop runs as a Ray Train ``TorchTrainer`` of that many workers,
    which checkpoints to ``<storage>/_ray/<run name>`` and resumes from there if an earlier attempt
    of the same run left a checkpoint. ``run.workers == 0`` runs the same loop in this process
    without Ray (fastest for small jobs, tests and sweep trials); it checkpoints to
    ``<storage>/_ray/<run name>/in_process`` and resumes from there the same way.
    """
    t0 = time.perf_counter()
    fault = diagnostics.fault_for(job)  # read here: Ray's worker processes do not see this environment
    if fault:
        job = job.replace(extras={**job.extras, "fault": fault})
    streams(job, kind_of(job.spec))  # data.stream: refused here (naming the field) where it cannot apply
    threads = torch.get_num_threads()  # the loop sets its own thread count
    try:
        folder, run_path = _fit_here(job, storage) if job.run.workers == 0 else _fit_on_ray(job, storage)
    finally:
        torch.set_num_threads(threads)
    with open(os.path.join(folder, "method.safetensors"), "rb") as f:
        method_state = bytes_to_state(f.read(), folder)
    with open(os.path.join(folder, "history.json")) as f:
        history = json.load(f)
    shutil.rmtree(folder, ignore_errors=True)
    prefix = job.extras.get("publish_prefix", "model.")  # what the stage publishes (e.g. the selected copy)
    model_state = {k[len(prefix) :]: v for k, v in method_state.items() if k.startswith(prefix)}
    return FitResult(model_state, history, run_path, time.perf_counter() - t0)


_epoch_listeners: list[Callable[[dict[str, Any]], None]] = []


@contextlib.contextmanager
def on_epoch(listener: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """While the block runs, ``listener(metrics)`` sees every epoch of a loop run in this process
    (``workers: 0``), after the epoch's checkpoint is saved: how a sweep trial reports each epoch to
    Ray Tune, whose scheduler (ASHA) may then stop the trial."""
    _epoch_listeners.append(listener)
    try:
        yield
    finally:
        _epoch_listeners.remove(listener)


IN_PROCESS = "in_process"  # the in-process loop's checkpoints, beside Ray Train's in the run folder
COMPLETE = "COMPLETE"  # written last: a checkpoint folder without it is half-written and never read


def _fit_here(job: Job, storage: Storage) -> tuple[str, str]:
    """The loop in this process, checkpointing every epoch to storage as a Ray Train run does, and
    resuming from the newest complete checkpoint; returns a local copy of the last one and the run folder."""
    run_dir = f"{layout.ray_run(job.run_name)}/{IN_PROCESS}"
    last: list[str] = []  # the newest checkpoint folder; older ones are removed

    def report(metrics: dict[str, Any], folder: str | None) -> None:
        if folder is None:
            return
        _upload_checkpoint(storage, f"{run_dir}/checkpoint_{int(metrics['epoch']):06d}", folder)
        _prune_checkpoints(storage, run_dir, job.run.keep_checkpoints)
        if last:
            shutil.rmtree(last.pop(), ignore_errors=True)
        last.append(folder)
        for listener in list(_epoch_listeners):  # e.g. a sweep trial reporting the epoch to Ray Tune
            listener(metrics)

    device = torch.device("cpu")
    if job.run.use_gpu:
        if not torch.cuda.is_available():
            raise KdrayError(
                "run.use_gpu is true but this machine has no CUDA device",
                hint="Set run.use_gpu: false, or run on a machine with a GPU.",
            )
        device = torch.device("cuda")
    resume_from = _download_latest(storage, run_dir)
    if resume_from is not None and _finished(resume_from, job):
        # every epoch is done (the publish failed, or the artifact folder was deleted): publish from it
        print(
            f"[{job.pipeline}/{job.spec.name}] all {job.spec.optim.epochs} epoch(s) are in the run's last "
            "checkpoint: publishing from it",
            flush=True,
        )
        return resume_from, storage.uri(run_dir)
    shown = progress.local_progress(f"{job.pipeline}/{job.spec.name}")
    try:
        with user_code_errors(job):
            train(
                job,
                device=device,
                resume_from=resume_from,
                report=report,
                instrument=diagnostics.instrument(job, 0),
                progress=shown,
            )
    finally:
        shown.close()
    return last[0], storage.uri(run_dir)


def _finished(folder: str, job: Job) -> bool:
    """Whether a downloaded checkpoint already holds every epoch of ``job`` (its history says so).

    An unreadable history is not decided here: the loop's resume reports it as a corrupt checkpoint."""
    try:
        with open(os.path.join(folder, "history.json")) as f:
            history = json.load(f)
        return isinstance(history, list) and bool(history) and int(history[-1]["epoch"]) >= job.spec.optim.epochs
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _checkpoints(storage: Storage, run_dir: str) -> list[str]:
    """The complete checkpoint folders of an in-process run, oldest first."""
    names = [p.rsplit("/", 1)[-1] for p in storage.list(run_dir)]
    return [n for n in sorted(names) if n.startswith("checkpoint_") and storage.exists(f"{run_dir}/{n}/{COMPLETE}")]


def _upload_checkpoint(storage: Storage, rel: str, folder: str) -> None:
    for name in sorted(os.listdir(folder)):
        storage.upload_file(os.path.join(folder, name), f"{rel}/{name}")
    storage.write_bytes(f"{rel}/{COMPLETE}", b"")


def _prune_checkpoints(storage: Storage, run_dir: str, keep: int) -> None:
    for name in _checkpoints(storage, run_dir)[:-keep]:
        storage.delete_dir(f"{run_dir}/{name}")


def _download_latest(storage: Storage, run_dir: str) -> str | None:
    """A local copy of the newest complete checkpoint of this run, or None for a fresh start."""
    found = _checkpoints(storage, run_dir)
    if not found:
        return None
    rel, local = f"{run_dir}/{found[-1]}", tempfile.mkdtemp(prefix="kdray-resume-")
    for path in storage.list(rel):
        name = path.rsplit("/", 1)[-1]
        if name != COMPLETE:
            storage.download(f"{rel}/{name}", os.path.join(local, name))
    return local


def _fit_on_ray(job: Job, storage: Storage) -> tuple[str, str]:
    """The loop as a TorchTrainer; returns a local copy of the final checkpoint and the run folder."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    TorchTrainer = trainer_class()  # raises a user error raised in a worker at once (no retry)
    run = job.run
    quiet_ray_logs()
    ensure_ray(run)
    storage_path, filesystem = layout.ray_storage(storage)
    cpus, ray_datasets = run.cpus_per_worker, dict[str, Any]()
    if streams(job, kind_of(job.spec)):  # Ray Data reads and decodes the shards; each worker iterates its share
        ray_datasets, facts = stream_datasets(job, kind_of(job.spec))
        job = job.replace(extras={**job.extras, "stream": facts})
        cpus, note = stream_cpus(run.workers, run.cpus_per_worker, ray.cluster_resources().get("CPU", 0.0))
        if note:
            print(f"[{job.pipeline}/{job.spec.name}] {note}", flush=True)
    shown = contextlib.ExitStack()  # the workers' progress, shown here (or by a parent process's hub)
    hub = progress.existing_hub() or shown.enter_context(progress.hub())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**job.to_config(), "progress_hub": hub},
        scaling_config=ScalingConfig(
            num_workers=run.workers,
            use_gpu=run.use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if run.use_gpu else {})},
        ),
        datasets=ray_datasets or None,
        dataset_config=DataConfig(datasets_to_split="all"),  # disjoint shares, n // workers rows each
        run_config=RunConfig(
            name=job.run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints),
            logging_config=LoggingConfig(os.environ.get("KDRAY_RAY_TRAIN_LOG_LEVEL", "WARNING")),
        ),  # type: ignore[call-arg]
    )
    try:
        with shown:
            result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; surface a user error as itself
        cause = _user_error(e) or _storage_error(e, job, storage, storage_path) or _worker_error(e, job)
        if cause is not None:
            raise cause from None
        raise
    if result.checkpoint is None:
        raise KdrayError(f"stage {job.spec.name!r} finished without a checkpoint")
    return result.checkpoint.to_directory(tempfile.mkdtemp(prefix="kdray-final-")), result.path


def _user_error(e: BaseException) -> KdrayError | None:
    """The KdrayError raised inside a worker, found through Ray's wrappers (causes, worker failures)."""
    return find_user_error(e)


def _causes(e: BaseException) -> Iterator[BaseException]:
    """``e`` and every exception inside Ray's wrappers (causes, contexts, ``cause``, worker and controller failures)."""
    seen: set[int] = set()
    stack: list[Any] = [e]
    while stack:
        err = stack.pop()
        if not isinstance(err, BaseException) or id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        stack += [err.__cause__, err.__context__, getattr(err, "cause", None), getattr(err, "controller_failure", None)]
        failures = getattr(err, "worker_failures", None)
        if isinstance(failures, dict):
            stack += list(failures.values())


class WorkerError(KdrayError):
    """A stage that failed inside a Ray worker, told by its real cause; ``details`` holds Ray's full report.

    ``transient``: a worker that died (out of memory, a node lost, a fault) may not die again, so an
    orchestrator's retries apply (the stage resumes from its last checkpoint); an error in the user's own
    code is a ``UserCodeError`` instead, which is not retried."""

    transient = True


def _worker_error(e: BaseException, job: Job) -> WorkerError | None:
    """A failure inside a Ray Train worker or a Ray Data task as one paragraph naming its innermost cause
    (for example a corrupt Parquet page and the reader's message), with Ray's full report in ``details``."""
    causes = [c for c in _causes(e) if c is not e]
    if not causes:
        return None
    inner = causes[-1]
    for c in causes:  # the original exception a RayTaskError carries, where there is one
        original = getattr(c, "cause", None)
        if isinstance(original, BaseException) and not type(original).__name__.startswith(("Ray", "WorkerGroup")):
            inner = original
    text = str(inner).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # a RayTaskError's text ends with the original exception's "Type: message" line
    first = lines[-1].strip() if lines and "Traceback" in text else (lines[0].strip() if lines else "")
    if not first:
        first = type(inner).__name__
    elif not first.startswith(type(inner).__name__) and "Error" not in first.split(":")[0]:
        first = f"{type(inner).__name__}: {first}"
    err = WorkerError(f"stage {job.spec.name!r} failed in a Ray worker: {first[:500]}")
    err.details = "".join(traceback.format_exception(type(e), e, e.__traceback__)) + "\n" + str(e)
    return err


def _storage_error(e: BaseException, job: Job, storage: Storage, run_root: str = "") -> StorageError | None:
    """An I/O failure of the run's storage inside Ray (an S3 outage while checkpointing) as a StorageError.

    Only an error that names the run's storage (or a connection that failed) counts: a data file that
    cannot be read (a corrupt Parquet shard) is the data's problem, told by ``_worker_error``."""
    for err in _causes(e):
        text = str(err)
        ours = (run_root and run_root in text) or "_ray" in text or isinstance(err, ConnectionError)
        if isinstance(err, OSError) and ours:  # pyarrow's S3 and local file errors
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            return StorageError(
                f"stage {job.spec.name!r}: Ray Train could not read or write the run's storage "
                f"{storage.uri('_ray')} ({first[:300]})",
                hint=storage._hint() + " Then rerun: the stage resumes from its last checkpoint.",
                transient=True,
            )
    return None
