"""Batch inference over a streamed dataset with Ray Data: how a streamed distill stage's teacher cache is built.

``stream_inference(job, build, sink)`` runs a model over every row of the training shards of the
job's ``data.stream`` dataset and hands each output batch (row ids, outputs) to ``sink`` on the
driver, which writes them (``kdray.distill.cache``: the cache's chunks, keyed as for in-memory data).
The pipeline is Ray Data's batch inference pattern: ``read_parquet`` of the shards, ``map_batches``
that decodes and normalises the rows (as the training pipeline does, without its shuffling), then
``map_batches`` over an **actor pool** that holds the model once per actor: one actor per GPU when
the run has GPUs, else actors of ``ACTOR_CPUS`` CPU each (one torch thread) beside the read tasks.

Where decoding runs depends on the device. On CPU it is fused into the inference actors (the decode
map asks for the actors' CPUs, so Ray Data runs both maps in one actor): the decoded float rows never
cross the object store and no tier of decoding processes has to start, which took the cache from 0.82–0.86
to 0.95–0.97 of a plain loop's rate once Ray Data is up (0.83–0.84 on a process's first run; docs/benchmarks.md). With GPUs, decoding stays in CPU tasks of its own
so that the GPU actors only run the model. Batches come back in shard order (``preserve_order``), so the
sink sees row ids rise and can write each chunk as soon as it is complete: the driver holds a chunk or two,
never the dataset.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from kdray.contracts.stage import Job
from kdray.data import stream
from kdray.engine.datasets import DATA_TASK_CPUS, data_context, decoded, user_errors
from kdray.engine.driver import ensure_ray

ACTOR_CPUS = 0.75  # one inference actor's CPU reservation (two fit beside a read task on 2 CPUs)
INFER_BATCH = 1024


class BatchOutputs:
    """A Ray Data actor: the model, built once, run on each batch of decoded rows."""

    def __init__(self, build: Callable[[], nn.Module], device: str, threads: int):
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = build().eval().to(self.device)
        if any(isinstance(m, nn.Conv2d) for m in self.model.modules()):
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch stub

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(batch["x"])).to(self.device)
            out = self.model(x).float().cpu().numpy()
        return {"index": batch["index"], "outputs": out}


def actor_pool(use_gpu: bool, cluster: dict[str, float]) -> tuple[int, float, float]:
    """(actors, CPUs and GPUs of each): one per GPU, else as many ``ACTOR_CPUS`` actors as fit beside a read task."""
    if use_gpu and cluster.get("GPU", 0) >= 1:
        return int(cluster["GPU"]), 1.0, 1.0
    cpus = cluster.get("CPU", 1.0)
    return max(1, math.floor((cpus - DATA_TASK_CPUS) / ACTOR_CPUS)), ACTOR_CPUS, 0.0


def stream_inference(
    job: Job,
    build: Callable[[], nn.Module],
    sink: Callable[[np.ndarray, np.ndarray], None],
    *,
    fuse_decode: bool | None = None,
) -> int:
    """Run ``build()``'s model over every training-shard row of ``job``'s streamed data; ``sink(ids, outputs)``
    gets each output batch on the driver, in row-id order across shards. Returns the rows done.

    ``fuse_decode``: decode inside the inference actors; by default on CPU and not with GPUs (bench/data.py
    sets it to compare the two layouts side by side)."""
    import ray
    import ray.data

    ensure_ray(job.run)
    plan = stream.plan(job.spec.data)
    actors, actor_cpus, actor_gpus = actor_pool(job.run.use_gpu, ray.cluster_resources())
    fuse = not actor_gpus if fuse_decode is None else fuse_decode
    context = data_context()
    ordered = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # shards in order: the sink writes each chunk once complete
    try:
        done = 0
        outputs = pipeline(job, plan, build, actors, actor_cpus, actor_gpus, fuse)
        for batch in user_errors(outputs.iter_batches(batch_format="numpy", batch_size=None)):
            order = np.argsort(batch["index"], kind="stable")  # decoding permutes the rows of each batch
            sink(batch["index"][order], batch["outputs"][order])
            done += len(order)
        return done
    finally:
        context.execution_options.preserve_order = ordered  # later datasets (training) need no order


def pipeline(
    job: Job,
    plan: stream.StreamPlan,
    build: Callable[[], nn.Module],
    actors: int,
    cpus: float,
    gpus: float,
    fuse: bool,
) -> Any:
    """Read, decode, run the model in an actor pool (decoding inside the actors if ``fuse``): the Ray Data
    dataset of the output batches (``index``, ``outputs``)."""
    import ray.data

    every = np.zeros(plan.rows, dtype=np.int16)  # every row of the shards (label unused), in shard order
    view = stream.transform_options(plan.meta, job.spec.data.transforms)  # their deterministic view
    rows = decoded(job, plan, every, view, shuffle=False, decode_cpus=cpus if fuse else DATA_TASK_CPUS)
    return rows.map_batches(
        BatchOutputs,  # type: ignore[arg-type]  # a callable class: Ray Data runs it in an actor pool
        fn_constructor_kwargs={"build": build, "device": "cuda" if gpus else "cpu", "threads": max(1, round(cpus))},
        batch_format="numpy",
        batch_size=INFER_BATCH,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=gpus or None,
    )
