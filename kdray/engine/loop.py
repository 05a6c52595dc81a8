"""The training loop, read top to bottom: data, method, optimiser, resume, epochs, metrics, report.

``train(job, ...)`` is the same loop whether it runs in this process (``workers: 0``) or on each
Ray Train worker (``kdray.engine.driver``, which supplies rank, device, DDP wrapping, checkpoints
and reporting). What is optimised comes from the stage kind's plug-in: ``kind.data(job)`` gives
the splits and ``kind.method(job, shard)`` the ``Method``, whose hooks (``param_groups``,
``on_epoch_start``, ``epoch_scores``, ``on_epoch_end``) are all the loop knows of distillation,
transfer or adaptation.
"""

from __future__ import annotations

import json
import math
import os
import pickle  # only for its error type: torch.load(weights_only=True) raises UnpicklingError
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from kdray.contracts.checkpoint import bytes_to_state, state_to_bytes
from kdray.contracts.method import Method
from kdray.contracts.specs import OptimSpec
from kdray.contracts.stage import Job, kind_of
from kdray.core.errors import KdrayError
from kdray.engine import kinds  # noqa: F401  (the stage kinds this loop can run, also in a Ray worker process)
from kdray.engine.datasets import batch_source, batches, shard  # noqa: F401  (bench scripts import these two here)
from kdray.engine.progress import Progress
from kdray.models import lm

Report = Callable[[dict[str, Any], "str | None"], None]


# --------------------------------------------------------------------------- pieces of the loop


def build_optimizer(spec: OptimSpec, groups: list[dict[str, Any]], steps: int):
    """AdamW/Adam/SGD over param groups (a group's ``lr_scale`` multiplies the lr); cosine or constant."""
    groups = [{**g, "lr": spec.lr * g.get("lr_scale", 1.0)} for g in groups]  # the caller's dicts stay as they are
    for g in groups:
        g.pop("lr_scale", None)
    opt: torch.optim.Optimizer
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


def autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def evaluate_model(
    model: nn.Module, val_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> tuple[float, float, int]:
    """(summed loss, correct, count) over the labelled rows of (x, y) batches; the caller all-reduces across ranks.
    A causal LM's (logits ``[N, T, V]``) are summed over its real next tokens (``val_loss``: mean NLL per token)."""
    was_training = model.training
    model.eval()
    loss = correct = count = 0.0
    for xb, yb in val_batches:
        xb, yb = xb.to(device), yb.to(device)
        logits = model(xb).float()
        if lm.is_sequence(logits):
            nll, top1, _, n = lm.score(logits, xb)
            loss, correct, count = loss + nll, correct + top1, count + n
            continue
        keep = yb >= 0
        loss += float(nn.functional.cross_entropy(logits[keep], yb[keep], reduction="sum")) if keep.any() else 0.0
        correct += float((logits.argmax(1)[keep] == yb[keep]).sum())
        count += float(keep.sum())
    model.train(was_training)
    return loss, correct, int(count)


def channels_last(method: Method, sample: torch.Tensor) -> list[str]:
    """Put the method's convolutional networks in channels_last memory layout, where a trial forward on
    ``sample`` (a few input rows, on the device) works; return the names of those converted.

    Convolutions train 1.2-1.7x faster on CPU in this layout (docs/benchmarks.md), and it is what GPU
    tensor cores want. Nothing else changes: weights are published contiguous (``state_to_bytes``). A
    network that cannot run in it (one that calls ``.view`` on a convolution's output) keeps the default
    layout, with a line on stderr saying why.
    """
    if sample.dim() != 4:
        return []
    done = []
    for name, net in method.networks().items():
        if not any(isinstance(m, nn.Conv2d) for m in net.modules()):
            continue
        was_training = net.training
        net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch: the stub lacks it
        try:
            with torch.no_grad():
                net.eval()(sample)
            done.append(name)
        except RuntimeError as e:
            net.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
            why = str(e).strip().splitlines()[0][:160]
            print(f"run.channels_last: the {name} keeps the default memory layout ({why})", file=sys.stderr)
        finally:
            net.train(was_training)
    return done


def all_reduce(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum each named number over the ranks (the numbers themselves without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return dict(values)
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def save_train_state(folder: str, method: nn.Module, opt, sched, epoch: int, history: list[dict]) -> None:
    with open(os.path.join(folder, "method.safetensors"), "wb") as f:
        f.write(state_to_bytes(method.state_dict()))
    torch.save(
        {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch},
        os.path.join(folder, "train_state.pt"),
    )  # read back with weights_only=True
    with open(os.path.join(folder, "history.json"), "w") as f:
        json.dump(history, f)


def load_train_state(folder: str, method: nn.Module, opt, sched) -> tuple[int, list[dict]]:
    """Resume state from a run checkpoint; an unreadable one is a user error whose fix is ``--force``."""
    try:
        with open(os.path.join(folder, "method.safetensors"), "rb") as f:
            method.load_state_dict(bytes_to_state(f.read(), folder))
        state = torch.load(os.path.join(folder, "train_state.pt"), weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        with open(os.path.join(folder, "history.json")) as f:
            history = json.load(f)
        return int(state["epoch"]) + 1, history
    except (KdrayError, OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
        why = str(e).strip().splitlines()[0][:200] if isinstance(e, (KdrayError, OSError)) else type(e).__name__
        raise KdrayError(  # not torch's own text: it suggests weights_only=False, which would unpickle
            f"the run checkpoint to resume from ({folder}) is corrupt or unreadable ({why})",
            hint="Rerun the stage with --force to start it over (the run's old checkpoints are then deleted).",
        ) from None


# --------------------------------------------------------------------------- the loop


def check_finite(job: Job, epoch: int, loss: float, model: nn.Module) -> None:
    """Stop the stage when its loss or weights stop being finite: nothing NaN is checkpointed or published."""
    bad = [] if math.isfinite(loss) else [f"the training loss is {loss}"]
    bad += [
        f"weight {n} holds NaN/inf"
        for n, p in model.state_dict().items()
        if p.is_floating_point() and not torch.isfinite(p).all()
    ][:3]
    if bad:
        raise KdrayError(
            f"stage {job.spec.name!r} diverged in epoch {epoch + 1}: {'; '.join(bad)}",
            hint=f"Likely causes: optim.lr ({job.spec.optim.lr}) or optim.weight_decay "
            f"({job.spec.optim.weight_decay}) too large, or non-finite inputs (data or teacher outputs). "
            "Lower them (or set optim.grad_clip) and rerun the stage with --force.",
        )


def train(
    job: Job,
    *,
    rank: int = 0,
    world: int = 1,
    device: torch.device = torch.device("cpu"),
    resume_from: str | None = None,
    report: Report,
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    instrument: Callable[[nn.Module], None] = lambda m: None,
    progress: Progress | None = None,
) -> None:
    """The training loop. ``report(metrics, checkpoint_folder)`` is called every epoch on every rank
    (rank 0 passes a folder); ``wrap`` makes the method data-parallel; ``instrument`` sees the method
    once before training (diagnostics such as injected faults); ``progress`` shows steps and epochs
    (``kdray.engine.progress``: to this process's terminal, or through Ray to the driver's)."""
    spec, run, kind = job.spec, job.run, kind_of(job.spec)
    torch.set_num_threads(max(1, int(run.cpus_per_worker)))
    torch.manual_seed(run.seed)  # same initial weights on every rank

    # 1. Data: this rank's batches of the training set and its share of the validation split (never
    # the test split), from memory or, with data.stream, from Ray Data (kdray.engine.datasets).
    per_rank_batch = max(1, spec.optim.batch_size // world)
    data = batch_source(job, kind, rank, world, per_rank_batch)
    steps_per_epoch = data.steps_per_epoch

    # 2. Model and method (the method holds the trainable model, plus frozen helpers such as a teacher).
    method = kind.method(job, data.shard)
    method.to_device(device)
    if run.channels_last:
        channels_last(method, data.shard.x[:2].to(device))
    instrument(method)
    opt, sched = build_optimizer(spec.optim, method.param_groups(), spec.optim.epochs * steps_per_epoch)
    net = wrap(method) if world > 1 else method
    scaler = torch.amp.GradScaler(
        "cuda", enabled=device.type == "cuda" and run.amp and not torch.cuda.is_bf16_supported()
    )

    # 3. Resume from the latest checkpoint of this run (after a worker failure or a rerun).
    start, history = 0, list[dict[str, Any]]()
    if resume_from:
        start, history = load_train_state(resume_from, method, opt, sched)
        shutil.rmtree(resume_from, ignore_errors=True)
    resumed = (history[-1]["resumed"] + 1) if history else 0  # how many times this run has resumed

    progress = progress or Progress(rank == 0, f"{job.pipeline}/{spec.name}")
    loop_started = time.time()  # wall clock, so the driver can tell start-up from training
    for epoch in range(start, spec.optim.epochs):
        # 4. One epoch over this rank's shard.
        net.train()
        method.on_epoch_start(epoch, epoch / spec.optim.epochs)
        t0, seen, loss_sum, correct, labelled = time.perf_counter(), 0, 0.0, 0.0, 0
        lr = sched.get_last_lr()[0]  # the lr this epoch's steps use (the last one is recorded, not the next)
        for step, rows in enumerate(data.epoch(epoch)):
            idx = rows["index"]
            batch = {
                "x": rows["x"].to(device, non_blocking=True),
                "y": rows["y"].to(device),
                "index": idx,
                **{k: v.to(device) for k, v in rows.items() if k not in ("x", "y", "index")},  # e.g. teacher_logits
                "progress": (epoch + step / steps_per_epoch) / spec.optim.epochs,
            }
            with autocast(device, run.amp):
                out = net(batch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(out["loss"]).backward()
            if spec.optim.grad_clip:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(method.parameters(), spec.optim.grad_clip)
            scaler.step(opt)
            scaler.update()
            lr = sched.get_last_lr()[0]
            sched.step()
            seen += len(idx)
            loss_sum += float(out["loss"].detach()) * len(idx)
            keep = batch["y"] >= 0
            if "logits" in out:  # methods that score other batches (adaptation) report no train accuracy
                correct += float((out["logits"].detach().argmax(1)[keep] == batch["y"][keep]).sum())
                labelled += int(keep.sum())
            if step % 20 == 0:
                progress.update(
                    epoch,
                    spec.optim.epochs,
                    step + 1,
                    steps_per_epoch,
                    loss_sum / seen,
                    seen * world / (time.perf_counter() - t0),
                )
        train_seconds = time.perf_counter() - t0

        # 5. Metrics, summed over ranks by name: train loss/accuracy, and the validation split's loss/accuracy.
        v_loss, v_correct, v_count = evaluate_model(method.model, data.validation(), device)
        scores = method.epoch_scores(device)  # e.g. unsupervised validators for model selection
        sums = all_reduce(
            {
                "loss": loss_sum,
                "correct": correct,
                "labelled": labelled,
                "seen": seen,
                "val_loss": v_loss,
                "val_correct": v_correct,
                "val_count": v_count,
                **{f"score:{k}": v for k, v in scores.items()},
            },
            device,
        )
        check_finite(job, epoch, sums["loss"] / max(sums["seen"], 1), method.model)  # same on every rank
        metrics = {
            "epoch": epoch + 1,
            "resumed": resumed,
            "train_loss": sums["loss"] / max(sums["seen"], 1),
            "train_acc": sums["correct"] / sums["labelled"] if sums["labelled"] else None,
            "val_loss": sums["val_loss"] / sums["val_count"] if sums["val_count"] else None,
            "val_acc": sums["val_correct"] / sums["val_count"] if sums["val_count"] else None,
            "samples_per_s": sums["seen"] / train_seconds,
            "epoch_seconds": train_seconds,
            "lr": lr,  # the last step's, so a cosine schedule's last epoch is not recorded as 0.0
            "loop_started": loop_started,
            **{k: sums[f"score:{k}"] / world for k in scores},
        }
        method.on_epoch_end(metrics)  # every rank sees the same all-reduced metrics, so decides alike
        history.append(metrics)
        progress.epoch_done(metrics)

        # 6. Report from every rank; rank 0 hands over a checkpoint folder.
        folder = None
        if rank == 0:
            folder = tempfile.mkdtemp(prefix="kdray-ckpt-")
            save_train_state(folder, method, opt, sched, epoch, history)
        report(metrics, folder)
