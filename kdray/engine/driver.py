"""The driver side of training: ``fit(job)`` runs the loop here (``workers: 0``) or as a Ray Train
``TorchTrainer`` (``workers >= 1``), and returns the weights to publish and the history.

The Ray run name is deterministic (pipeline, stage, key), so building the trainer again with the
same ``RunConfig(name, storage_path)`` resumes the run where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

import torch
import torch.nn as nn

from kdray.core.checkpoint import bytes_to_state
from kdray.core.errors import KdrayError
from kdray.core.specs import RunSpec
from kdray.core.stage import FitResult, Job
from kdray.core.storage import Storage
from kdray.engine import diagnostics
from kdray.engine.loop import train

# Settings that make a small Ray Train fit start in seconds on a laptop (see docs/architecture.md).
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # otherwise every worker line is printed twice
}


def quiet_ray_logs() -> None:
    """Keep Ray Train's per-report INFO lines (and a state-API warning without a dashboard) out of the log.

    Runs in every Ray worker process (``worker_process_setup_hook``) and in the driver.
    """
    import logging

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    try:  # this one logs every report at INFO under a logger named by its file path
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


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
    train(
        job,
        rank=rank,
        world=ctx.get_world_size(),
        device=device,
        resume_from=resume_from,
        report=report,
        wrap=wrap,
        instrument=diagnostics.instrument(job, rank),
    )


def ensure_ray(run: RunSpec) -> None:
    """Start embedded Ray (or connect to ``run.address``) once per process, with laptop-friendly settings."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"worker_process_setup_hook": "kdray.engine.driver.quiet_ray_logs"}
    if run.address:
        ray.init(address=run.address, runtime_env=runtime_env)
    else:
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            runtime_env=runtime_env,
            object_store_memory=256 * 1024**2,
            logging_level=logging.WARNING,
        )


def fit(job: Job, storage: Storage) -> FitResult:
    """Run the job's training loop and return the trained weights and the per-epoch history.

    With ``run.workers >= 1`` the loop runs as a Ray Train ``TorchTrainer`` of that many workers,
    which checkpoints to ``<storage>/_ray/<run name>`` and resumes from there if an earlier attempt
    of the same run left a checkpoint. ``run.workers == 0`` runs the same loop in this process
    without Ray (fastest for small jobs, tests and sweep trials; it keeps no checkpoint to resume).
    """
    t0 = time.perf_counter()
    threads = torch.get_num_threads()  # the loop sets its own thread count
    try:
        folder, run_path = _fit_here(job) if job.run.workers == 0 else _fit_on_ray(job, storage)
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


def _fit_here(job: Job) -> tuple[str, None]:
    """The loop in this process; returns the last checkpoint folder."""
    last: list[str] = []  # the newest checkpoint folder; older ones are removed

    def report(metrics: dict[str, Any], folder: str | None) -> None:
        if folder is None:
            return
        if last:
            shutil.rmtree(last.pop(), ignore_errors=True)
        last.append(folder)

    device = torch.device("cpu")
    if job.run.use_gpu:
        if not torch.cuda.is_available():
            raise KdrayError(
                "run.use_gpu is true but this machine has no CUDA device",
                hint="Set run.use_gpu: false, or run on a machine with a GPU.",
            )
        device = torch.device("cuda")
    train(job, device=device, report=report, instrument=diagnostics.instrument(job, 0))
    return last[0], None


def _fit_on_ray(job: Job, storage: Storage) -> tuple[str, str]:
    """The loop as a TorchTrainer; returns a local copy of the final checkpoint and the run folder."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run = job.run
    quiet_ray_logs()
    ensure_ray(run)
    storage_path, filesystem = storage.ray_storage()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.to_config(),
        scaling_config=ScalingConfig(
            num_workers=run.workers,
            use_gpu=run.use_gpu,
            resources_per_worker={"CPU": run.cpus_per_worker, **({"GPU": 1} if run.use_gpu else {})},
        ),
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
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; surface a user error as itself
        cause = _user_error(e)
        if cause is not None:
            raise cause from None
        raise
    if result.checkpoint is None:
        raise KdrayError(f"stage {job.spec.name!r} finished without a checkpoint")
    return result.checkpoint.to_directory(tempfile.mkdtemp(prefix="kdray-final-")), result.path


def _user_error(e: BaseException) -> KdrayError | None:
    """The KdrayError raised inside a worker, found through Ray's wrappers (causes, worker failures)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, KdrayError):
            return err
        stack += [err.__cause__, err.__context__, getattr(err, "cause", None)]
        failures = getattr(err, "worker_failures", None)
        if isinstance(failures, dict):
            stack += list(failures.values())
    return None
