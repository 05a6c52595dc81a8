"""Where the training loop's batches come from: in-memory tensors (the default) or a Ray Data shard.

The loop asks a :class:`BatchSource` for four things: the ``Shard`` its method is built from, the
steps of an epoch, the epoch's batches (``x`` normalised, ``y``, ``index``: row ids), and the
validation batches. :func:`batch_source` picks one:

* :class:`MemoryBatches`: the stage kind's ``data(job)`` splits, loaded into memory; each rank takes
  a contiguous ``n // world`` rows and shuffles them every epoch with a seeded permutation.
* :class:`StreamedBatches` (``data.stream: true``, Ray Train workers only): this rank's share of the
  ``train`` and ``val`` Ray Data datasets that :func:`stream_datasets` built on the driver and
  ``fit`` handed to the ``TorchTrainer`` (``ray.train.get_dataset_shard``). Ray Train splits each
  with ``streaming_split(world, equal=True)``, so the ranks get disjoint rows, ``n // world`` each,
  as in memory; the rows and labels come from the same selection (:mod:`kdray.data.stream`).

:func:`stream_datasets` and :func:`stream_cpus` are the driver's side: the Ray Data pipeline
(``read_parquet`` of the shards, then ``map_batches`` that keeps the part's rows, sets their
labels and decodes the PNG bytes with Pillow, on CPU), and the CPU left to Ray Data beside the
training workers (with none left, Ray Data never runs and ``fit`` hangs silently).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Protocol

import torch

from kdray.contracts.stage import Job, Shard, StageKind, labelled_only
from kdray.core.errors import KdrayError
from kdray.core.meter import article
from kdray.data import arrays as array_shards
from kdray.data import datasets as kdata
from kdray.data import stream, transforms
from kdray.engine.raypolicy import find_user_error

DATA_CPUS = 1.0  # what streaming leaves to Ray Data beside the training workers
DATA_TASK_CPUS = 0.5  # what one read or decode task asks for: two run at once in DATA_CPUS, or one beside a
# training worker that took part of a node's CPUs
DECODE_BATCH = 1024  # rows per map_batches call


class BatchSource(Protocol):
    shard: Shard  # what the stage kind's method is built from
    steps_per_epoch: int

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's training batches for ``epoch``: ``x`` (normalised), ``y`` (-1: withheld), ``index``."""
        ...

    def validation(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the validation split, as (x normalised, y) batches."""
        ...


def shard(n: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous slice of ``n`` examples; every rank gets ``n // world``."""
    per = n // world
    return range(rank * per, (rank + 1) * per)


def batches(indices: torch.Tensor, batch_size: int, epoch: int, seed: int):
    """The shard's indices in a seeded random order, in full batches (the last partial batch too)."""
    order = indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed * 1000 + epoch))]
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def batch_source(job: Job, kind: StageKind, rank: int, world: int, batch_size: int) -> BatchSource:
    """Ray Data's shard for a streamed dataset, else the kind's splits in memory."""
    if getattr(getattr(job.spec, "data", None), "stream", False):
        return StreamedBatches(job, rank, world, batch_size)
    return MemoryBatches(job, kind, rank, world, batch_size)


class MemoryBatches:
    """The kind's (training, validation) splits as tensors; this rank's contiguous slice of each."""

    def __init__(self, job: Job, kind: StageKind, rank: int, world: int, batch_size: int):
        train_set, self.val = kind.data(job)
        self.train, self.augment = train_set, train_set.augment  # data.transforms left for each batch (random)
        view = transforms.apply(train_set.x, self.augment) if self.augment else train_set.x  # deterministic view
        self.x, self.x_val = kdata.normalize(view, train_set), kdata.normalize(self.val.x, self.val)
        self.y, self.rows = train_set.y, torch.tensor(list(shard(len(train_set), rank, world)))
        self.rank, self.world, self.batch_size, self.seed = rank, world, batch_size, job.run.seed
        self.shard = Shard(train_set, self.x, self.rows, rank, world)
        self.steps_per_epoch = math.ceil(len(self.rows) / batch_size)

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        for idx in batches(self.rows, self.batch_size, epoch, self.seed):
            if self.augment:  # on this CPU batch, before the loop moves it: seeded by (run seed, epoch, row id)
                x = transforms.apply(self.train.x[idx], self.augment, train=True, rows=idx, seed=self.seed, epoch=epoch)
                yield {"x": kdata.normalize(x, self.train), "y": self.y[idx], "index": idx}
            else:
                yield {"x": self.x[idx], "y": self.y[idx], "index": idx}

    def validation(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        part = shard(len(self.val), self.rank, self.world)
        for i in range(part.start, part.stop, 1024):
            j = min(i + 1024, part.stop)
            yield self.x_val[i:j], self.val.y[i:j]


class StreamedBatches:
    """This Ray Train worker's share of the ``train`` and ``val`` Ray Data datasets."""

    def __init__(self, job: Job, rank: int, world: int, batch_size: int):
        facts = job.extras.get("stream")
        if not facts:
            raise KdrayError(
                f"stage {job.spec.name!r}: data.stream: true needs Ray Train workers (run.workers >= 1)",
                hint="Set run.workers to 1 or more, or drop data.stream to load the data into memory.",
            )
        self.batch_size = batch_size
        self.steps_per_epoch = math.ceil((facts["train_rows"] // world) / batch_size)
        sample = stream.example_split(facts)  # a few decoded rows: enough for a method to size itself
        x = kdata.normalize(sample.x, sample)
        self.shard = Shard(sample, x, torch.arange(len(x)), rank, world)

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        import ray.train

        rows = ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=self.batch_size,
            device="cpu",  # the loop moves a batch to its device, as for in-memory batches
        )  # shuffled by the pipeline: the shards' order per epoch, the rows within each decoded batch
        yield from user_errors(rows)  # x, y, index, and what the kind's stream_columns added

    def validation(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import ray.train

        for b in user_errors(ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=1024, device="cpu")):
            yield b["x"], b["y"]


def user_errors(batches: Iterable[Any]) -> Iterator[Any]:
    """``batches``, raising a KdrayError from a Ray Data task (a corrupt image) as itself: Ray Data wraps
    it in a UserCodeException whose cause would not survive the trip to the driver."""
    try:
        yield from batches
    except Exception as e:
        err = find_user_error(e)
        if err is None:
            raise
        raise err from None


# --------------------------------------------------------------------------- the driver's side


def streams(job: Job, kind: StageKind) -> bool:
    """Whether ``job`` streams its data; refuses what streaming cannot do, naming the field."""
    data = getattr(job.spec, "data", None)
    if not getattr(data, "stream", False):
        return False
    where = f"stages.{job.spec.name}.data.stream"
    if not type(kind).streams:
        raise KdrayError(
            f"{where}: {article(job.spec.kind)} {job.spec.kind} stage cannot stream its data (it needs its rows in memory)",
            hint="Drop data.stream for this stage; train, distill and transfer stages can stream (docs/data.md).",
        )
    if job.run.workers < 1:
        raise KdrayError(
            f"{where}: true needs Ray Train workers, but run.workers is 0 (the loop in this process reads memory)",
            hint="Set run.workers to 1 or more, or drop data.stream to load the data into memory.",
        )
    return True


def data_context() -> Any:
    """Ray Data's context as streaming sets it: no progress bars (the loop shows progress), one read task
    and block per shard (Ray 2.60's Parquet V2 reader packs small shards into one task, so an epoch was
    read, then decoded, then trained), and a DataError from decode_batch raised as itself."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.use_datasource_v2 = False
    context.raise_original_map_exception = True
    return context


def decoded(
    job: Job,
    plan: stream.StreamPlan,
    lookup: Any,
    view: dict[str, Any],
    *,
    augment: bool = False,
    shuffle: bool = True,
    decode_cpus: float = DATA_TASK_CPUS,
) -> Any:
    """The rows of ``plan``'s shards that ``lookup`` keeps, decoded and normalised in Ray Data tasks (with
    ``view``'s transforms), shard by shard; the shards' order reshuffled each execution unless not ``shuffle``.
    ``decode_cpus``: each decoding task's reservation (the next map's lets Ray Data fuse decoding into it)."""
    import ray.data
    from ray.data import FileShuffleConfig

    store, meta = plan.store, plan.meta
    rows = ray.data.read_parquet(
        [store.path(rel) for rel in plan.shards],
        filesystem=store.fs,
        columns=["id", array_shards.x_column(meta)],  # "image" (PNG bytes) or "array" (raw bytes)
        include_paths=True,
        shuffle=FileShuffleConfig(seed=job.run.seed, reseed_after_execution=True) if shuffle else None,
        num_cpus=DATA_TASK_CPUS,
        override_num_blocks=len(plan.shards),
    )
    return rows.map_batches(
        decode_epoch if view else stream.decode_batch,  # type: ignore[arg-type]  # options through fn_kwargs
        batch_format="numpy",
        batch_size=DECODE_BATCH,
        num_cpus=decode_cpus,
        fn_kwargs={
            "lookup": lookup,
            **stream.decode_options(meta),  # channels, size, mean, std; layout for array shards
            "prefix": "s3://" if store.scheme == "s3" else "",
            "seed": job.run.seed,
            **view,  # transforms, and their mean/std
            **({"augment": augment} if view else {}),
        },
    )


def stream_datasets(job: Job, kind: StageKind) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``train`` and ``val`` Ray Data datasets of a streamed stage, and the facts its workers need."""
    plan = stream.plan(job.spec.data)
    train = plan.train if kind.uses_unlabelled else labelled_only(plan.train, job)
    data_context()
    view = stream.transform_options(plan.meta, job.spec.data.transforms)  # data.transforms: run in decode_batch
    facts = {**plan.facts(), "train_rows": len(train), **view}
    train_rows = decoded(job, plan, plan.lookup(train), view, augment=True)
    columns = kind.stream_columns(job)  # e.g. a distill stage's cached teacher logits, per batch
    if columns is not None:
        train_rows = train_rows.map_batches(columns, batch_format="numpy", num_cpus=DATA_TASK_CPUS)
    return {"train": train_rows, "val": decoded(job, plan, plan.lookup(plan.val), view)}, facts


def decode_epoch(batch: dict[str, Any], **options: Any) -> dict[str, Any]:
    """``stream.decode_batch`` told the epoch, for seeded augmentation: the count of the dataset's finished
    executions (one per epoch), which Ray Data keeps in the task's DataContext and reads for its own
    reseeded randomness (``FileShuffleConfig(reseed_after_execution=True)``)."""
    import ray.data

    epoch = int(getattr(ray.data.DataContext.get_current(), "_execution_idx", 0))
    return stream.decode_batch(batch, epoch=epoch, **options)


def stream_cpus(workers: int, cpus_per_worker: float, cluster_cpus: float) -> tuple[float, str | None]:
    """CPU per training worker that leaves ``DATA_CPUS`` to Ray Data, and a note when it had to shrink."""
    room = cluster_cpus - DATA_CPUS
    if room <= 0:
        raise KdrayError(
            f"data.stream: the Ray cluster has {cluster_cpus:g} CPU; streaming needs {DATA_CPUS:g} for Ray Data "
            "beside the training workers",
            hint="Give the cluster more CPUs, or drop data.stream to load the data into memory.",
        )
    if workers * cpus_per_worker <= room:
        return cpus_per_worker, None
    per = room / workers
    return per, (
        f"data.stream: each of the {workers} training workers reserves {per:g} CPU instead of "
        f"run.cpus_per_worker={cpus_per_worker:g}, leaving {DATA_CPUS:g} of the cluster's {cluster_cpus:g} "
        "to Ray Data (with none, Ray Data never runs and training hangs)"
    )
