"""Training on Ray Train: one loop, read top to bottom, and ``fit`` that runs it as a TorchTrainer.

``train_loop_per_worker(config)`` runs on every worker: it loads its shard of the data, builds
the model and the stage's method, resumes from Ray's latest checkpoint if there is one, trains,
and every epoch reports metrics from every rank (a barrier) with a checkpoint from rank 0.

``fit(job)`` builds ``TorchTrainer(train_loop_per_worker, ScalingConfig, RunConfig)``. The run
name is deterministic (pipeline, stage, key), so building the trainer again with the same
``RunConfig(name, storage_path)`` resumes the run where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from kdray import data as kdata
from kdray.checkpoint import bytes_to_state, state_to_bytes
from kdray.errors import KdrayError

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



def run_name(pipeline: str, stage: str, key: str) -> str:
    """Ray's run name for a stage: deterministic, so a rerun of the same stage resumes its run."""
    return f"{pipeline}-{stage}-{key}"


@dataclass
class Job:
    """Everything a worker needs, as plain JSON-able values (it crosses process boundaries)."""

    pipeline: str
    stage: dict[str, Any]
    run: dict[str, Any]
    key: str
    parents: dict[str, str] = field(default_factory=dict)  # reference -> artifact URI
    extras: dict[str, Any] = field(default_factory=dict)   # stage-specific inputs (e.g. a teacher cache URI)

    @property
    def run_name(self) -> str:
        return run_name(self.pipeline, self.stage["name"], self.key)

    def to_config(self) -> dict[str, Any]:
        return {"job": json.loads(json.dumps(self.__dict__))}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Job":
        return cls(**config["job"])


# --------------------------------------------------------------------------- pieces of the loop


def stage_spec(job: Job) -> Any:
    from pydantic import TypeAdapter

    from kdray.specs import Stage

    return TypeAdapter(Stage).validate_python(job.stage)


def build_optimizer(spec: Any, groups: list[dict[str, Any]], steps: int):
    """AdamW/Adam/SGD over param groups (a group's ``lr_scale`` multiplies the lr); cosine or constant."""
    groups = [{**g, "lr": spec.lr * g.get("lr_scale", 1.0)} for g in groups]  # the caller's dicts stay as they are
    for g in groups:
        g.pop("lr_scale", None)
    if spec.name == "sgd":
        opt = torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, nesterov=True)
    else:
        cls = torch.optim.AdamW if spec.name == "adamw" else torch.optim.Adam
        opt = cls(groups, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return opt, sched


def shard(n: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous slice of ``n`` examples; every rank gets ``n // world``."""
    per = n // world
    return range(rank * per, (rank + 1) * per)


def batches(indices: torch.Tensor, batch_size: int, epoch: int, seed: int):
    """The shard's indices in a seeded random order, in full batches (the last partial batch too)."""
    order = indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed * 1000 + epoch))]
    for i in range(0, len(order), batch_size):
        yield order[i:i + batch_size]


def autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


class Progress:
    """A one-line progress bar on an interactive terminal; one line per epoch otherwise."""

    def __init__(self, enabled: bool, title: str):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.title = title

    def update(self, epoch: int, epochs: int, done: int, total: int, loss: float, rate: float) -> None:
        if self.tty:
            frac = done / max(total, 1)
            bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
            sys.stderr.write(f"\r{self.title} epoch {epoch + 1}/{epochs} [{bar}] {frac:4.0%} "
                             f"loss {loss:.4f} {rate:,.0f} samples/s ")
            sys.stderr.flush()

    def epoch_done(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r" + " " * 100 + "\r")
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                          if k in ("epoch", "train_loss", "train_acc", "test_acc", "samples_per_s"))
        print(f"[{self.title}] {shown}", file=sys.stderr, flush=True)


@torch.no_grad()
def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                   batch_size: int = 1024) -> tuple[float, float, int]:
    """(summed loss, correct, count) over labelled rows of ``x``; the caller all-reduces across ranks."""
    was_training = model.training
    model.eval()
    loss = correct = count = 0.0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        logits = model(xb).float()
        keep = yb >= 0
        loss += float(nn.functional.cross_entropy(logits[keep], yb[keep], reduction="sum")) if keep.any() else 0.0
        correct += float((logits.argmax(1)[keep] == yb[keep]).sum())
        count += float(keep.sum())
    model.train(was_training)
    return loss, correct, int(count)


def all_reduce(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def save_train_state(folder: str, method: nn.Module, opt, sched, epoch: int, history: list[dict]) -> None:
    with open(os.path.join(folder, "method.safetensors"), "wb") as f:
        f.write(state_to_bytes(method.state_dict()))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch},
               os.path.join(folder, "train_state.pt"))  # read back with weights_only=True
    with open(os.path.join(folder, "history.json"), "w") as f:
        json.dump(history, f)


def load_train_state(folder: str, method: nn.Module, opt, sched) -> tuple[int, list[dict]]:
    with open(os.path.join(folder, "method.safetensors"), "rb") as f:
        method.load_state_dict(bytes_to_state(f.read(), folder))
    state = torch.load(os.path.join(folder, "train_state.pt"), weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    with open(os.path.join(folder, "history.json")) as f:
        history = json.load(f)
    return int(state["epoch"]) + 1, history


def inject_fault(fault: dict[str, Any] | None, epoch: int, step: int, rank: int) -> None:
    """Fail once at (epoch, step) on one rank: how fault-tolerance tests break a run for real.

    ``fault = {"epoch": 1, "step": 3, "rank": 0, "marker": "/tmp/x", "how": "raise" | "kill"}``; the
    marker file makes it fire only on the first attempt. ``kill`` ends the worker process abruptly.
    """
    if not fault or (epoch, step, rank) != (fault["epoch"], fault.get("step", 0), fault.get("rank", 0)):
        return
    if os.path.exists(fault["marker"]):
        return
    open(fault["marker"], "w").close()
    if fault.get("how") == "kill":
        os.kill(os.getpid(), 9)
    raise RuntimeError(f"injected fault at epoch {epoch}, step {step}, rank {rank}")


# --------------------------------------------------------------------------- the loop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: Ray supplies rank, device, checkpoints and reporting."""
    import ray.train
    import ray.train.torch

    job = Job.from_config(config)
    quiet_ray_logs()
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if job.run["use_gpu"] else torch.device("cpu")
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

    if job.extras.get("placement_log"):  # diagnostics: where each rank ran (node, process)
        import ray

        os.makedirs(job.extras["placement_log"], exist_ok=True)
        with open(os.path.join(job.extras["placement_log"], f"rank{ctx.get_world_rank()}.json"), "w") as f:
            json.dump({"rank": ctx.get_world_rank(), "node_id": ray.get_runtime_context().get_node_id(),
                       "pid": os.getpid()}, f)

    train(job, rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=device,
          resume_from=resume_from, report=report, wrap=wrap)


def train(job: Job, *, rank: int = 0, world: int = 1, device: torch.device = torch.device("cpu"),
          resume_from: str | None = None, report: Callable[[dict[str, Any], str | None], None],
          wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> None:
    """The training loop, top to bottom. ``report(metrics, checkpoint_folder)`` is called every
    epoch on every rank (rank 0 passes a folder); ``wrap`` makes the method data-parallel."""
    from kdray.stages import build_method, stage_data  # the stage kind decides what is optimised

    spec, run = stage_spec(job), job.run
    torch.set_num_threads(max(1, int(run["cpus_per_worker"])))
    torch.manual_seed(run["seed"])  # same initial weights on every rank

    # 1. Data: this rank's shard of the training set, the whole test set for monitoring.
    train_set, test = stage_data(job, spec)
    x_train, x_test = kdata.normalize(train_set.x, train_set), kdata.normalize(test.x, test)
    mine = torch.tensor(list(shard(len(train_set), rank, world)))
    per_rank_batch = max(1, spec.optim.batch_size // world)
    steps_per_epoch = math.ceil(len(mine) / per_rank_batch)

    # 2. Model and method (the method holds the trainable model, plus frozen helpers such as a teacher).
    method = build_method(job, spec, train_set, x_train, mine)
    method.to_device(device)
    groups = method.param_groups() if hasattr(method, "param_groups") else [
        {"params": [p for p in method.parameters() if p.requires_grad]}]
    opt, sched = build_optimizer(spec.optim, groups, spec.optim.epochs * steps_per_epoch)
    net = wrap(method) if world > 1 else method
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and run["amp"]
                                  and not torch.cuda.is_bf16_supported())

    # 3. Resume from the latest checkpoint of this run (after a worker failure or a rerun).
    start, history = 0, []
    if resume_from:
        start, history = load_train_state(resume_from, method, opt, sched)
        shutil.rmtree(resume_from, ignore_errors=True)
    resumed = (history[-1]["resumed"] + 1) if history else 0  # how many times this run has resumed

    progress = Progress(rank == 0, f"{job.pipeline}/{spec.name}")
    loop_started = time.time()  # wall clock, so the driver can tell start-up from training
    for epoch in range(start, spec.optim.epochs):
        # 4. One epoch over this rank's shard.
        net.train()
        method.on_epoch_start(epoch, epoch / spec.optim.epochs)
        t0, seen, loss_sum, correct, labelled = time.perf_counter(), 0, 0.0, 0.0, 0
        for step, idx in enumerate(batches(mine, per_rank_batch, epoch, run["seed"])):
            batch = {"x": x_train[idx].to(device, non_blocking=True), "y": train_set.y[idx].to(device),
                     "index": idx, "progress": (epoch + step / steps_per_epoch) / spec.optim.epochs}
            with autocast(device, run["amp"]):
                out = net(batch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(out["loss"]).backward()
            if spec.optim.grad_clip:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(method.parameters(), spec.optim.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            inject_fault(job.extras.get("fault"), epoch, step, rank)
            seen += len(idx)
            loss_sum += float(out["loss"].detach()) * len(idx)
            keep = batch["y"] >= 0
            if "logits" in out:  # methods that score other batches (adaptation) report no train accuracy
                correct += float((out["logits"].detach().argmax(1)[keep] == batch["y"][keep]).sum())
                labelled += int(keep.sum())
            if step % 20 == 0:
                progress.update(epoch, spec.optim.epochs, step + 1, steps_per_epoch, loss_sum / seen,
                                seen * world / (time.perf_counter() - t0))
        train_seconds = time.perf_counter() - t0

        # 5. Metrics, summed over ranks: train loss/accuracy, and test accuracy for monitoring only.
        test_part = shard(len(test), rank, world)
        t_loss, t_correct, t_count = evaluate_model(method.model, x_test[test_part.start:test_part.stop],
                                                    test.y[test_part.start:test_part.stop], device)
        scores = method.epoch_scores(device)  # e.g. unsupervised validators for model selection
        totals = all_reduce([loss_sum, correct, labelled, seen, t_loss, t_correct, t_count, *scores.values()], device)
        metrics = {"epoch": epoch + 1, "resumed": resumed, "train_loss": totals[0] / max(totals[3], 1),
                   "train_acc": totals[1] / max(totals[2], 1) if totals[2] else None,
                   "test_loss": totals[4] / max(totals[6], 1), "test_acc": totals[5] / max(totals[6], 1),
                   "samples_per_s": totals[3] / train_seconds, "epoch_seconds": train_seconds,
                   "lr": sched.get_last_lr()[0], "loop_started": loop_started,
                   **{k: v / world for k, v in zip(scores, totals[7:])}}
        method.on_epoch_end(metrics)  # every rank sees the same all-reduced metrics, so decides alike
        history.append(metrics)
        progress.epoch_done(metrics)

        # 6. Report from every rank; rank 0 hands over a checkpoint folder.
        folder = None
        if rank == 0:
            folder = tempfile.mkdtemp(prefix="kdray-ckpt-")
            save_train_state(folder, method, opt, sched, epoch, history)
        report(metrics, folder)


# --------------------------------------------------------------------------- the driver side


@dataclass
class FitResult:
    model_state: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    run_path: str | None
    seconds: float

    @property
    def metrics(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def ensure_ray(run: dict[str, Any]) -> None:
    """Start embedded Ray (or connect to ``run.address``) once per process, with laptop-friendly settings."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"worker_process_setup_hook": "kdray.train.quiet_ray_logs"}
    if run.get("address"):
        ray.init(address=run["address"], runtime_env=runtime_env)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env=runtime_env,
                 object_store_memory=256 * 1024 ** 2, logging_level="WARNING")


def fit(job: Job, storage: Any) -> FitResult:
    """Run the job's training loop and return the trained weights and the per-epoch history.

    With ``run.workers >= 1`` the loop runs as a Ray Train ``TorchTrainer`` of that many workers,
    which checkpoints to ``<storage>/_ray/<run name>`` and resumes from there if an earlier attempt
    of the same run left a checkpoint. ``run.workers == 0`` runs the same loop in this process
    without Ray (fastest for small jobs, tests and sweep trials; it keeps no checkpoint to resume).
    """
    t0 = time.perf_counter()
    threads = torch.get_num_threads()  # the loop sets its own thread count
    try:
        folder, run_path = (_fit_here(job) if job.run["workers"] == 0 else _fit_on_ray(job, storage))
    finally:
        torch.set_num_threads(threads)
    with open(os.path.join(folder, "method.safetensors"), "rb") as f:
        method_state = bytes_to_state(f.read(), folder)
    with open(os.path.join(folder, "history.json")) as f:
        history = json.load(f)
    shutil.rmtree(folder, ignore_errors=True)
    prefix = job.extras.get("publish_prefix", "model.")  # what the stage publishes (e.g. the selected copy)
    model_state = {k[len(prefix):]: v for k, v in method_state.items() if k.startswith(prefix)}
    return FitResult(model_state, history, run_path, time.perf_counter() - t0)


def _fit_here(job: Job) -> tuple[str, None]:
    """The loop in this process; returns the last checkpoint folder."""
    last: list[str] = []

    def report(metrics: dict[str, Any], folder: str | None) -> None:
        if last:
            shutil.rmtree(last.pop(), ignore_errors=True)
        last.append(folder)

    device = torch.device("cpu")
    if job.run["use_gpu"]:
        if not torch.cuda.is_available():
            raise KdrayError("run.use_gpu is true but this machine has no CUDA device",
                             hint="Set run.use_gpu: false, or run on a machine with a GPU.")
        device = torch.device("cuda")
    train(job, device=device, report=report)
    return last[0], None


def _fit_on_ray(job: Job, storage: Any) -> tuple[str, str]:
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
        scaling_config=ScalingConfig(num_workers=run["workers"], use_gpu=run["use_gpu"],
                                     resources_per_worker={"CPU": run["cpus_per_worker"],
                                                           **({"GPU": 1} if run["use_gpu"] else {})}),
        run_config=RunConfig(name=job.run_name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=run["max_failures"]),
                             checkpoint_config=CheckpointConfig(num_to_keep=run["keep_checkpoints"]),
                             logging_config=LoggingConfig(os.environ.get("KDRAY_RAY_TRAIN_LOG_LEVEL", "WARNING"))),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; surface a user error as itself
        cause = _user_error(e)
        if cause is not None:
            raise cause from None
        raise
    if result.checkpoint is None:
        raise KdrayError(f"stage {job.stage['name']!r} finished without a checkpoint")
    return result.checkpoint.to_directory(tempfile.mkdtemp(prefix="kdray-final-")), result.path


def _user_error(e: BaseException) -> KdrayError | None:
    """Find a KdrayError raised inside a worker, through Ray's wrappers and tracebacks."""
    seen = set()
    stack = [e]
    while stack:
        err = stack.pop()
        if id(err) in seen or err is None:
            continue
        seen.add(id(err))
        if isinstance(err, KdrayError):
            return err
        stack += [err.__cause__, err.__context__]
        stack += [v for v in getattr(err, "worker_failures", {}).values()] if isinstance(
            getattr(err, "worker_failures", None), dict) else []
    text = str(e)
    if "KdrayError" in text or "SpecError" in text or "DataError" in text or "CheckpointMismatch" in text:
        line = next((ln for ln in reversed(text.splitlines()) if "Error:" in ln), text.splitlines()[-1])
        return KdrayError(line.split("Error: ", 1)[-1])
    return None
