"""Where ``fit()``'s start-up goes: from the call to the first training step, for a 1-worker Ray Train run.

    .venv/bin/python bench/startup.py                      # cnn_small, 12,000 Fashion-MNIST images, 1 epoch
    RAY_TRAIN_METRICS_ENABLED=0 .venv/bin/python bench/startup.py --rounds 3   # try a setting

Everything runs in this process, after one embedded ``ray.init`` (timed). In each round it measures:

* **actor**: a fresh 1-CPU Ray actor (a new worker process: Python and Ray's imports) until it answers;
* **Ray Train, empty**: a ``TorchTrainer`` whose train function only records the wall clock when it
  starts, imports kdray's worker side (timed there) and reports once: how long Ray Train itself takes
  from ``fit()`` to the worker's function (controller actor, placement group, worker actor, torch
  process group), and from the function's end to ``fit()`` returning;
* **kdray fit()**: ``kdray.engine.driver.fit`` of a real 1-epoch job: from the call to ``loop_started``
  (the wall clock the loop records just before its first step), and to its return;
* **in-process**: the same job with ``workers: 0`` (the loop in this process), for comparison;
* **data + model**: loading the splits and building the method in this process (what the worker does
  between its imports and its first step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from kdray.contracts.stage import Shard, StageContext, kind_of
from kdray.core.storage import Storage
from kdray.data import datasets as kdata
from kdray.engine.driver import ensure_ray, fit
from kdray.engine.spec import parse_pipeline


def probe(config: dict) -> None:
    """An empty Ray Train function: when it started, how long kdray's worker-side imports take."""
    entered = time.time()
    import ray.train

    import kdray.engine.driver  # noqa: F401  (timed here, in the fresh worker: what a real worker imports)

    with open(config["out"], "w") as f:
        json.dump({"entered": entered, "imports_s": time.time() - entered, "left": time.time()}, f)
    ray.train.report({"done": 1})


def fresh_actor_s() -> float:
    import ray

    @ray.remote(num_cpus=1)
    class Probe:
        def ping(self) -> int:
            return os.getpid()

    t0 = time.perf_counter()
    actor = Probe.remote()  # type: ignore[attr-defined]
    ray.get(actor.ping.remote())
    seconds = time.perf_counter() - t0
    ray.kill(actor)
    return seconds


def empty_train(root: str, name: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = os.path.join(root, f"{name}.json")
    t_call = time.time()
    trainer = TorchTrainer(
        probe,
        train_loop_config={"out": out},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=root),
    )
    t_built = time.time()
    trainer.fit()
    t_back = time.time()
    with open(out) as f:
        inside = json.load(f)
    return {
        "construct_s": t_built - t_call,
        "to_train_fn_s": inside["entered"] - t_call,
        "worker_imports_s": inside["imports_s"],
        "train_fn_end_to_return_s": t_back - inside["left"],
        "fit_s": t_back - t_call,
    }


def kdray_fit(spec, root: Storage, name: str) -> dict:
    ctx = StageContext(spec, spec.stages[0], name, root.child(name), root, {}, lambda m: None)
    job = ctx.job()
    t_call = time.time()
    result = fit(job, root)
    t_back = time.time()
    return {"to_first_step_s": result.history[0]["loop_started"] - t_call, "fit_s": t_back - t_call}


def data_and_model_s(spec) -> float:
    ctx = StageContext(spec, spec.stages[0], "probe", Storage("file:///tmp"), Storage("file:///tmp"), {}, print)
    job = ctx.job()
    kind = kind_of(job.spec)
    t0 = time.perf_counter()
    train_set, _ = kind.data(job)
    x = kdata.normalize(train_set.x, train_set)
    kind.method(job, Shard(train_set, x, torch.arange(len(train_set)), 0, 1))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn_small")
    ap.add_argument("--limit", type=int, default=12000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="kdray-bench-startup-")

    def doc(workers: int) -> dict:
        return {
            "name": "startup",
            "storage": {"uri": f"file://{tmp}"},
            "run": {"workers": workers, "cpus_per_worker": 1, "max_failures": 0},
            "stages": [
                {
                    "name": "fit",
                    "kind": "train",
                    "model": {"name": args.model},
                    "data": {"name": "fashion_mnist", "limit": args.limit, "test_limit": 2000},
                    "optim": {"epochs": 1, "batch_size": 128, "lr": 1e-3},
                }
            ],
        }

    spec, local = parse_pipeline(doc(1)), parse_pipeline(doc(0))
    t0 = time.perf_counter()
    ensure_ray(spec.run)
    figures: dict = {"ray_init_s": time.perf_counter() - t0, "rounds": []}
    for r in range(args.rounds):
        row = {
            "fresh_actor_s": fresh_actor_s(),
            "empty_train": empty_train(tmp, f"empty{r}"),
            "kdray_fit": kdray_fit(spec, Storage(f"file://{tmp}"), f"ray{r}"),
            "in_process_fit": kdray_fit(local, Storage(f"file://{tmp}"), f"local{r}"),
            "data_and_model_s": data_and_model_s(local),
        }
        figures["rounds"].append(row)
        print(json.dumps({"round": r, **row}), flush=True)

    def med(get) -> float:
        return round(statistics.median(get(row) for row in figures["rounds"]), 2)

    figures["median"] = {
        "fresh_actor_s": med(lambda r: r["fresh_actor_s"]),
        "ray_train_to_train_fn_s": med(lambda r: r["empty_train"]["to_train_fn_s"]),
        "worker_imports_s": med(lambda r: r["empty_train"]["worker_imports_s"]),
        "ray_train_teardown_s": med(lambda r: r["empty_train"]["train_fn_end_to_return_s"]),
        "data_and_model_s": med(lambda r: r["data_and_model_s"]),
        "kdray_fit_to_first_step_s": med(lambda r: r["kdray_fit"]["to_first_step_s"]),
        "in_process_fit_to_first_step_s": med(lambda r: r["in_process_fit"]["to_first_step_s"]),
    }
    figures["load_average"] = os.getloadavg()
    figures["cpu_count"] = os.cpu_count()
    figures["ray_env"] = {k: v for k, v in os.environ.items() if k.startswith("RAY_")}
    print(json.dumps(figures["median"] | {"ray_init_s": round(figures["ray_init_s"], 2)}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
