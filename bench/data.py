"""Streaming with Ray Data against the in-memory path, side by side in one run.

    .venv/bin/python bench/data.py                       # defaults below; about 15 minutes on 2 loaded cores
    .venv/bin/python bench/data.py --limit 12000 --rows 2000 --json out.json

(a) **Throughput**: Fashion-MNIST (``--limit`` training rows) imported as Parquet shards into a
    SeaweedFS S3 bucket (tests/helpers/s3server.py, on loopback), then ``cnn_small`` trained for ``--epochs``
    epochs by one Ray Train worker (1 CPU; the other CPU is Ray Data's) on the same shards, once
    loaded into memory and once streamed (``data.stream: true``). Figure: samples/s of each epoch's
    training steps (for the streamed run this includes waiting for the epoch's first batch),
    streamed / in memory.
(b) **Memory**: a synthetic dataset of ``--rows`` 3x32x32 colour images (PNG in Parquet, local
    folder) and one of 10x as many rows (the same shards repeated with new row ids: the same bytes
    to decode, 10x the rows), each streamed for one epoch into one Ray Train worker that trains
    ``mlp_32``. Figure: the worker process's peak RSS (sampled from /proc every 0.2 s, and the
    kernel's high-water mark VmHWM), 10x / 1x. RSS counts the object-store pages the worker maps
    (shared memory, bounded by the 256 MiB store); private memory (RssAnon) is reported too.
(c) **Teacher cache**: the logits of a ``--teacher`` (seeded random weights) for Fashion-MNIST's
    60,000 training rows (``--repeat`` times over) imported as Parquet shards, built by Ray Data batch
    inference (``kdray.engine.inference``: what a streamed distill stage runs; on CPU the actors decode
    their own rows), by the same with decoding in tasks of its own (``ray_data_tiers``: the GPU layout,
    and kdray's CPU layout before issue 29) and by a plain loop (read each shard, decode, normalise, run
    the teacher on all CPUs, write the chunks), alternating for ``--rounds``. Figure: rows/s, Ray Data /
    plain for each layout; and the largest logit difference.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdray.contracts.checkpoint import bytes_to_state
from kdray.contracts.stage import StageContext
from kdray.core.storage import Storage
from kdray.data.files import decode, import_dataset
from kdray.data.stream import plan as stream_plan
from kdray.distill.cache import ChunkWriter, chunk_name
from kdray.engine.driver import ensure_ray, fit
from kdray.engine.inference import stream_inference
from kdray.engine.spec import parse_pipeline
from kdray.models import create_model

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from helpers.s3server import SeaweedS3  # noqa: E402  (the test suite's real S3 server)

FMNIST = "/usr/share/datasets/fashion-mnist"


def quiet(_msg: str) -> None:
    pass


def stage_doc(tmp: str, data: dict, model: str, epochs: int, batch: int) -> dict:
    return {
        "name": "bench",
        "storage": {"uri": f"file://{tmp}/runs"},
        "run": {"workers": 1, "cpus_per_worker": 1, "max_failures": 0},
        "stages": [
            {
                "name": "fit",
                "kind": "train",
                "model": {"name": model},
                "data": data,
                "optim": {"epochs": epochs, "batch_size": batch, "lr": 1e-3},
            }
        ],
    }


class PeakRss(threading.Thread):
    """Samples the Ray Train worker's memory: its pid comes from the run's placement log."""

    def __init__(self, placement: Path):
        super().__init__(daemon=True)
        self.placement, self.stop = placement / "rank0.json", threading.Event()
        self.peak = {"VmRSS": 0, "RssAnon": 0, "VmHWM": 0}

    def run(self) -> None:
        while not self.stop.is_set() and not self.placement.exists():
            time.sleep(0.2)
        if self.stop.is_set():
            return
        pid = json.loads(self.placement.read_text())["pid"]
        while not self.stop.is_set():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        key, _, value = line.partition(":")
                        if key in self.peak:
                            self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)
            except OSError:
                return  # the worker has exited
            time.sleep(0.2)


def run_fit(tmp: str, data: dict, model: str, epochs: int, batch: int, name: str) -> tuple[list[dict], dict]:
    spec = parse_pipeline(stage_doc(tmp, data, model, epochs, batch))
    root = Storage(spec.storage.uri)
    key = f"{name}-{uuid.uuid4().hex[:6]}"
    ctx = StageContext(spec, spec.stages[0], key, root.child(key), root, {}, quiet)
    placement = Path(tmp) / f"placement-{key}"
    sampler = PeakRss(placement)
    sampler.start()
    try:
        result = fit(ctx.job(placement_log=str(placement)), root)
    finally:
        sampler.stop.set()
        sampler.join()
    return result.history, sampler.peak


def throughput(args: argparse.Namespace, tmp: str) -> dict:
    uri = "s3://bench/fmnist"
    t0 = time.perf_counter()
    import_dataset(FMNIST, uri, shard_rows=5000, class_names=[str(i) for i in range(10)], log=quiet)
    import_s = time.perf_counter() - t0
    print(f"(a) Fashion-MNIST imported into {uri} in {import_s:.0f} s", flush=True)
    data = {"name": "parquet", "path": uri, "limit": args.limit}
    rates = {}
    for mode, stream in (("in_memory", False), ("streamed", True)):
        history, _ = run_fit(tmp, {**data, "stream": stream}, "cnn_small", args.epochs, 128, mode)
        rates[mode] = [h["samples_per_s"] for h in history]
        print(f"(a) {mode}: " + ", ".join(f"{r:,.0f}" for r in rates[mode]) + " samples/s per epoch", flush=True)
    return {
        "rows": args.limit,
        "epochs": args.epochs,
        "import_s": import_s,
        "in_memory_samples_per_s": rates["in_memory"],
        "streamed_samples_per_s": rates["streamed"],
        "ratio_streamed_over_in_memory": [s / m for s, m in zip(rates["streamed"], rates["in_memory"])],
    }


def synthetic_shards(folder: Path, rows: int, seed: int = 0) -> Path:
    """``rows`` 3x32x32 images (10 class prototypes plus noise) imported into Parquet shards."""
    rng = np.random.default_rng(seed)
    protos = rng.uniform(0, 255, size=(10, 32, 32, 3))
    y = np.arange(rows) % 10
    x = np.clip(protos[y] + rng.normal(0, 20, size=(rows, 32, 32, 3)), 0, 255).astype(np.uint8)
    npz = folder / "synthetic.npz"
    np.savez(npz, x_train=x, y_train=y, x_test=x[:100], y_test=y[:100])
    import_dataset(str(npz), str(folder / "1x"), shard_rows=10_000, log=quiet)
    npz.unlink()
    return folder / "1x"


def repeated(one: Path, dest: Path, times: int) -> Path:
    """``one``'s training shards ``times`` over, with new row ids: 10x the rows, the same bytes to decode."""
    meta = json.loads((one / "dataset.json").read_text())
    train = meta["splits"]["train"]
    (dest / "train").mkdir(parents=True)
    shards, first = [], 0
    for _ in range(times):
        for rel in train["shards"]:
            table = pq.read_table(one / rel)
            ids = pa.array(np.arange(first, first + len(table)), pa.int64())
            rel_out = f"train/part-{len(shards):05d}.parquet"
            pq.write_table(table.set_column(table.schema.get_field_index("id"), "id", ids), dest / rel_out)
            shards.append(rel_out)
            first += len(table)
    (dest / "test").mkdir()
    for rel in meta["splits"]["test"]["shards"]:
        (dest / rel).write_bytes((one / rel).read_bytes())
    meta["splits"]["train"] = {"rows": first, "counts": [c * times for c in train["counts"]], "shards": shards}
    (dest / "dataset.json").write_text(json.dumps(meta))
    return dest


def memory(args: argparse.Namespace, tmp: str) -> dict:
    t0 = time.perf_counter()
    one = synthetic_shards(Path(tmp), args.rows)
    ten = repeated(one, Path(tmp) / "10x", 10)
    print(f"(b) synthetic shards: {args.rows:,} and {10 * args.rows:,} rows in {time.perf_counter() - t0:.0f} s")
    out = {}
    for label, folder in (("1x", one), ("10x", ten)):
        history, peak = run_fit(tmp, {"name": "parquet", "path": str(folder), "stream": True}, "mlp_32", 1, 256, label)
        out[label] = {"peak": peak, "samples_per_s": history[0]["samples_per_s"]}
        print(
            f"(b) {label}: peak RSS {peak['VmRSS'] / 2**20:.0f} MiB (VmHWM {peak['VmHWM'] / 2**20:.0f} MiB, "
            f"private {peak['RssAnon'] / 2**20:.0f} MiB), {history[0]['samples_per_s']:,.0f} samples/s",
            flush=True,
        )
    return {
        "rows_1x": args.rows,
        "rows_10x": 10 * args.rows,
        **out,
        "ratio_peak_rss_10x_over_1x": out["10x"]["peak"]["VmRSS"] / out["1x"]["peak"]["VmRSS"],
        "ratio_vmhwm_10x_over_1x": out["10x"]["peak"]["VmHWM"] / out["1x"]["peak"]["VmHWM"],
        "ratio_private_10x_over_1x": out["10x"]["peak"]["RssAnon"] / out["1x"]["peak"]["RssAnon"],
    }


def seeded_model(name: str, seed: int) -> torch.nn.Module:
    """The benchmark's teacher: registry model ``name`` with seeded random weights (the same on both sides)."""
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, in_channels=1, image_size=28)


def plain_cache(folder: Path, build, store: Storage, threads: int) -> int:
    """What a user would write: read each shard, decode its PNGs, normalise, run the teacher in batches
    of 1024 on ``threads`` threads (channels_last, as kdray's actors), write the chunks."""
    meta = json.loads((folder / "dataset.json").read_text())
    torch.set_num_threads(threads)
    model = build().eval().to(memory_format=torch.channels_last)
    mean, std = float(meta["mean"][0]), float(meta["std"][0])
    writer = ChunkWriter(store, meta["splits"]["train"]["rows"], Count())
    with torch.no_grad():
        for rel in meta["splits"]["train"]["shards"]:
            table = pq.read_table(folder / rel, columns=["id", "image"])
            ids = table.column("id").to_numpy()
            pixels = np.stack([decode(b, rel, 1) for b in table.column("image").to_pylist()])
            x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
            for i in range(0, len(x), 1024):
                writer(ids[i : i + 1024], model(x[i : i + 1024]).numpy())
    writer.finish({}, 0.0)
    return writer.rows


class Count:
    def update(self, done: int, note: str = "") -> None:
        pass

    def close(self) -> None:
        pass


def teacher_cache(args: argparse.Namespace, tmp: str) -> dict:
    """(c) The teacher cache of Fashion-MNIST's 60,000 training rows: Ray Data batch inference (an actor
    pool beside decoding tasks, kdray.engine.inference) against a plain loop, alternating, in one run."""
    folder = Path(tmp) / "fm-c"
    import_dataset(FMNIST, str(folder), shard_rows=5000, class_names=[str(i) for i in range(10)], log=quiet)
    if args.repeat > 1:  # the same shards --repeat times over, with new row ids: a larger dataset
        folder = repeated(folder, Path(tmp) / f"fm-c-{args.repeat}x", args.repeat)
    spec = parse_pipeline(stage_doc(tmp, {"name": "parquet", "path": str(folder), "stream": True}, "mlp_32", 1, 128))
    root = Storage(spec.storage.uri)
    job = StageContext(spec, spec.stages[0], "c", root.child("c"), root, {}, quiet).job()
    build = functools.partial(seeded_model, args.teacher, 0)
    rates: dict[str, list[float]] = {"plain": [], "ray_data": [], "ray_data_tiers": []}
    for r in range(args.rounds):
        ray_sides = ["ray_data", "ray_data_tiers"][:: 1 if r % 2 == 0 else -1]  # each goes first in turn
        for side in ["plain", *ray_sides]:  # (the process's first Ray Data run also starts Ray Data's actors)
            store = Storage(f"file://{tmp}/cache-{side}-{r}")
            t0 = time.perf_counter()
            if side == "plain":
                rows = plain_cache(folder, build, store, threads=os.cpu_count() or 1)
            else:
                writer = ChunkWriter(store, stream_plan(job.spec.data).rows, Count())
                rows = stream_inference(job, build, writer, fuse_decode=side == "ray_data")
                writer.finish({}, 0.0)
            rates[side].append(rows / (time.perf_counter() - t0))
            print(f"(c) round {r}: {side} {rates[side][-1]:,.0f} rows/s ({rows:,} rows)", flush=True)
    first = chunk_name(0)

    def logits(side: str) -> torch.Tensor:  # the first chunk of round 0's cache
        return bytes_to_state(Storage(f"file://{tmp}/cache-{side}-0").read_bytes(first), side)["logits"]

    diff = max(float((logits(side) - logits("plain")).abs().max()) for side in ("ray_data", "ray_data_tiers"))
    ratios = {side: [d / p for d, p in zip(rates[side], rates["plain"])] for side in ("ray_data", "ray_data_tiers")}
    for side, values in ratios.items():
        print(f"(c) {side} / plain: {', '.join(f'{x:.2f}' for x in values)}", flush=True)
    print(f"(c) max |logit difference| against plain {diff:.2e}", flush=True)
    return {"teacher": args.teacher, "rows_per_s": rates, "ratio_over_plain": ratios, "max_abs_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=60000, help="(a) Fashion-MNIST training rows")
    ap.add_argument("--epochs", type=int, default=2, help="(a) epochs")
    ap.add_argument("--rows", type=int, default=20000, help="(b) rows of the 1x synthetic dataset")
    ap.add_argument("--teacher", default="cnn_large", help="(c) the teacher model (seeded random weights)")
    ap.add_argument("--rounds", type=int, default=2, help="(c) rounds of plain and Ray Data, alternating")
    ap.add_argument("--repeat", type=int, default=1, help="(c) Fashion-MNIST's shards this many times over")
    ap.add_argument("--only", choices=["a", "b", "c"], action="append", help="run only these parts")
    ap.add_argument("--skip", choices=["a", "b", "c"], action="append", default=[], help="leave parts out")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="kdray-bench-data-")
    server = None
    parts = [p for p in (args.only or ["a", "b", "c"]) if p not in args.skip]
    if "a" in parts:  # before Ray starts, so that its processes get the endpoint and keys
        server = SeaweedS3(Path(tmp) / "seaweed", buckets=["bench"]).start()
        os.environ.update(server.env())
    ensure_ray(parse_pipeline(stage_doc(tmp, {"name": "synthetic"}, "mlp_32", 1, 32)).run)
    figures: dict = {"cpu_count": os.cpu_count(), "load_average_start": os.getloadavg()}
    try:
        if "a" in parts:
            figures["throughput"] = throughput(args, tmp)
        if "b" in parts:
            figures["memory"] = memory(args, tmp)
        if "c" in parts:
            figures["teacher_cache"] = teacher_cache(args, tmp)
    finally:
        if server is not None:
            server.stop()
    figures["load_average_end"] = os.getloadavg()
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
