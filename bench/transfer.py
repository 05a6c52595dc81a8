"""Cross-network transfer on Fashion-MNIST classes 0-4 -> 5-9: kdray against a plain PyTorch loop.

    .venv/bin/python bench/transfer.py                          # all parts (about 35 min on the 2-core machine)
    .venv/bin/python bench/transfer.py --parts strategies --seeds 0 1 2
    .venv/bin/python bench/transfer.py --parts relevance ranking
    .venv/bin/python bench/transfer.py --summary-only           # tables from <root>/results.jsonl

Parts:
  strategies  a cnn_small source trained by kdray on classes 0-4 (all labels, 3 epochs, lr 2e-3,
              run.workers: 1) initialises a cnn_small for classes 5-9 with (a) 1% of the labels
              (300 images) or (b) 10 labelled images per class (50 images); only the labelled images
              are kept. Strategies: scratch (a train stage), init (fine-tune all), freeze
              (features.* frozen, their BatchNorm in eval), probe (features.* and head.* frozen: only
              the new classifier trains, a linear probe of the source's embedding), lr_scale
              (features.* at 0.1x the lr), lr_scale_body (features.* and head.* at 0.1x), l2sp
              (alpha 0.01, beta 0; alpha 0.1 and 0.001 as two more rows). Every transfer gives the
              target a fresh classifier (a {match: explicit, op: skip} rule, see below). Each kdray
              run (in-process, run.workers: 0) is followed by a plain PyTorch loop of the same recipe.
              Each 10-per-class run also records which share of its test errors confuse one footwear
              class for another (sandal, sneaker, ankle boot), the shapes a source on tops never saw.
  relevance   the 10-per-class target again, with init, probe and lr_scale_body, from two sources that
              know the target's classes: classes 0-9 with all labels (includes the target classes),
              and classes 5-9 in another domain (rotated 30 degrees, Gaussian noise 0.2). It tells
              whether a small gain from the 0-4 source is kdray's transfer or the source's knowledge.
  architecture  scratch and init at 10 per class with resnet_small (global average pooling, 0.08M
              parameters) as both source (classes 0-4) and target: a data-hungrier network.
  ranking     six candidate sources of clearly different quality for classes 5-9 (classes 0-9;
              classes 0-4 for 3 epochs; classes 0-4 on 1,000 images for 1 epoch; classes 0-1 only;
              classes 5-9 rotated and noisy; 10 steps at lr 1e-6, near random). LogME and LEEP of each
              on the target training data (10 images per class, per seed), then each fine-tuned with
              ``init`` (3 seeds); Kendall tau between the score and the mean fine-tuned accuracy.

The budget is the same for every strategy of a setting: AdamW, lr 2e-3, cosine schedule, batch 32,
epochs chosen so that a run takes ``--steps`` (300) optimisation steps: 30 epochs x 10 steps at 1%,
150 epochs x 2 steps at 10 per class. One torch thread per run (two threads thrash on this shared
2-core machine). Test accuracy is measured on the full classes 5-9 test split (5,000 images) by the
same function for kdray's published weights and the plain model; kdray's per-epoch monitoring reads
the validation split (``data.val_fraction`` of the training pool), never the test split.

Why the explicit classifier rule: the source (5 classes) and the target (5 classes) have classifier
tensors of the same names and shapes, so ``{match: name}`` alone would copy the source's classifier
(T-shirt, Trouser, ... as Sandal, Shirt, ...) into the target and L2-SP would pull it back there.

Results are appended to --out (JSON lines) as they come, so an interrupted run keeps what it measured;
finished kdray stages are cached under --root, so a rerun only repeats the plain loops.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdray.contracts.checkpoint import open_artifact
from kdray.contracts.specs import DataSpec
from kdray.data import datasets as kdata
from kdray.engine.loop import batches
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline
from kdray.models import create_model
from kdray.transfer.mapping import TransferSpec, apply_transfer, plan_transfer
from kdray.transfer.scoring import score_sources
from kdray.transfer.transferability import kendall_tau

TARGET_CLASSES = [5, 6, 7, 8, 9]
LR, BATCH = 2e-3, 32
SETTINGS = {  # the target's labelled training data, selected with data.seed = run seed
    "1pct": {"label_fraction": 0.01, "drop_unlabelled": True},
    "10pc": {"labels_per_class": 10, "drop_unlabelled": True},
}
SETTING_TEXT = {"1pct": "1% of the labels (300 images)", "10pc": "10 labelled images per class (50 images)"}
# A fresh classifier for the target (its 5 classes are not the source's 5), then every other tensor by name.
NEW_HEAD = [{"match": "explicit", "pairs": {"classifier.*": None}, "op": "skip"}, {"match": "name"}]
FEATURES = "features.*"  # the conv stages; cnn_small's ``head`` (3136 -> 128, 95% of its weights) is not in it
BODY = [FEATURES, "head.*"]  # everything but the classifier


def _rules(globs: list[str], action: str, **extra) -> list[dict]:
    return [{"select": g, "action": action, **extra} for g in globs]


STRATEGIES = {  # name -> the transfer block (None: a scratch train stage)
    "scratch": None,
    "init": {"mapping": NEW_HEAD},
    "freeze": {"mapping": NEW_HEAD, "layers": _rules([FEATURES], "freeze")},
    "probe": {"mapping": NEW_HEAD, "layers": _rules(BODY, "freeze")},  # a linear probe of the source's embedding
    "lr_scale": {"mapping": NEW_HEAD, "layers": _rules([FEATURES], "lr_scale", lr_scale=0.1)},
    "lr_scale_body": {"mapping": NEW_HEAD, "layers": _rules(BODY, "lr_scale", lr_scale=0.1)},
    "l2sp": {"mapping": NEW_HEAD, "l2sp": {"alpha": 0.01, "beta": 0.0}},
    "l2sp_a0.1": {"mapping": NEW_HEAD, "l2sp": {"alpha": 0.1, "beta": 0.0}},
    "l2sp_a0.001": {"mapping": NEW_HEAD, "l2sp": {"alpha": 0.001, "beta": 0.0}},
}

MAIN_SOURCE = "src-0to4"
ARCH_SOURCE = "res-0to4"  # the architecture part: resnet_small source and target
SOURCES = {  # candidate sources on 1x28x28 Fashion-MNIST: cnn_small unless "model" says otherwise
    "src-0to9": {
        "data": {"classes": list(range(10))},
        "optim": {"epochs": 1, "lr": 2e-3},
        "text": "classes 0-9 (includes the target classes), 1 epoch",
    },
    MAIN_SOURCE: {
        "data": {"classes": [0, 1, 2, 3, 4]},
        "optim": {"epochs": 3, "lr": 2e-3},
        "text": "classes 0-4, 3 epochs (the strategies' source)",
    },
    "src-0to4-small": {
        "data": {"classes": [0, 1, 2, 3, 4], "limit": 1000},
        "optim": {"epochs": 1, "lr": 2e-3},
        "text": "classes 0-4, 1,000 images, 1 epoch",
    },
    "src-01": {
        "data": {"classes": [0, 1]},
        "optim": {"epochs": 3, "lr": 2e-3},
        "text": "classes 0-1 only (T-shirt, Trouser), 3 epochs",
    },
    "src-rot-5to9": {
        "data": {
            "classes": TARGET_CLASSES,
            "shifts": [{"name": "rotation", "degrees": 30}, {"name": "gaussian_noise", "sigma": 0.2}],
        },
        "optim": {"epochs": 3, "lr": 2e-3},
        "text": "the target's classes 5-9 in another domain (rotated 30 deg, noise 0.2), 3 epochs",
    },
    ARCH_SOURCE: {
        "data": {"classes": [0, 1, 2, 3, 4]},
        "optim": {"epochs": 3, "lr": 2e-3},
        "model": "resnet_small",
        "text": "resnet_small on classes 0-4, 3 epochs",
    },
    "src-near-random": {
        "data": {"classes": [0, 1, 2, 3, 4], "limit": 640},
        "optim": {"epochs": 1, "lr": 1e-6, "batch_size": 64},
        "text": "classes 0-4, 10 steps at lr 1e-6 (near random)",
    },
}


# The plain loop's own statement of each strategy: parameter-name prefixes frozen / trained at 0.1x the lr.
PLAIN_FROZEN = {"freeze": ("features.",), "probe": ("features.", "head.")}
PLAIN_SCALED = {"lr_scale": ("features.",), "lr_scale_body": ("features.", "head.")}
RELEVANCE_SOURCES = ["src-0to9", "src-rot-5to9"]  # sources that know the target's classes
RELEVANCE_STRATEGIES = ["init", "probe", "lr_scale_body"]
FOOTWEAR = (0, 2, 4)  # sandal, sneaker, ankle boot as target labels 0, 2, 4 (classes 5, 7, 9)


def ranking_sources() -> list[str]:
    """The candidates LogME/LEEP rank: every cnn_small source (the target is a cnn_small)."""
    return [n for n, s in SOURCES.items() if s.get("model", "cnn_small") == "cnn_small"]


def source_stage(name: str) -> dict:
    s = SOURCES[name]
    optim = {"batch_size": 128, **s["optim"]}
    # The strategies' source runs as a Ray Train job (one worker); the other candidates in-process.
    return {
        "name": name,
        "kind": "train",
        "model": {"name": s.get("model", "cnn_small")},
        "data": {"name": "fashion_mnist", **s["data"]},
        "optim": optim,
        "run": {"workers": 1 if name == MAIN_SOURCE else 0},
    }


def target_data(setting: str, seed: int) -> dict:
    return {"name": "fashion_mnist", "classes": TARGET_CLASSES, **SETTINGS[setting], "seed": seed}


def target_optim(setting: str, n_train: int, steps: int) -> dict:
    """Epochs so that the run makes ``steps`` optimisation steps (at least), the same for every strategy."""
    per_epoch = math.ceil(n_train / BATCH)
    return {"epochs": max(1, math.ceil(steps / per_epoch)), "batch_size": BATCH, "lr": LR, "schedule": "cosine"}


def stage_name(setting: str, strategy: str, source: str, seed: int, model: str = "cnn_small") -> str:
    tag = strategy.replace("_", "-").replace(".", "-")
    pre = "t" if model == "cnn_small" else "r"  # resnet_small targets of the architecture part
    name = f"{pre}-{setting}-{tag}-s{seed}" if strategy == "scratch" else f"{pre}-{setting}-{tag}-{source}-s{seed}"
    return name  # a DNS label: starts with a letter, at most 40 characters


def target_stage(setting: str, strategy: str, source: str, seed: int, optim: dict, model: str = "cnn_small") -> dict:
    data = {**target_data(setting, seed), "test_limit": 100}  # accuracy comes from evaluate(), not the loop
    stage = {
        "name": stage_name(setting, strategy, source, seed, model),
        "model": {"name": model},
        "data": data,
        "optim": optim,
        "run": {"seed": seed},
    }
    if strategy == "scratch":
        return {**stage, "kind": "train"}
    return {**stage, "kind": "transfer", "source": source, "transfer": STRATEGIES[strategy]}


def pipeline(root: str, stages: list[dict]) -> dict:
    return {
        "name": "bench-transfer",
        "storage": {"uri": f"file://{root}"},
        "run": {"workers": 0, "cpus_per_worker": 1, "max_failures": 0},
        "stages": stages,
    }


def kdray_run(root: str, stages: list[dict]):
    """Run the stages (finished ones are cached) and return the last one's artifact."""
    out = run_pipeline(parse_pipeline(pipeline(root, stages)), log=lambda m: None)
    return open_artifact(out[-1].uri)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` in eval mode on normalised images ``x`` [N, 1, 28, 28]."""
    return float((predict(model, x) == y).float().mean())


def test_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Top-1 accuracy, and the share of the errors that take one footwear class for another
    (sandal/sneaker/boot), from one pass over the test images."""
    pred = predict(model, x)
    wrong = pred != y
    shoe = torch.tensor([int(v) in FOOTWEAR for v in range(len(TARGET_CLASSES))])
    return float((~wrong).float().mean()), float((wrong & shoe[y] & shoe[pred]).sum()) / max(1, int(wrong.sum()))


def target_test() -> tuple[torch.Tensor, torch.Tensor]:
    test = kdata.load(DataSpec.model_validate(target_data("1pct", 0)), "test")  # the full classes 5-9 test split
    return kdata.normalize(test.x, test), test.y


# --------------------------------------------------------------------------- the plain PyTorch loop


def plain_target(
    source_state: dict[str, torch.Tensor],
    setting: str,
    strategy: str,
    seed: int,
    optim: dict,
    test: tuple[torch.Tensor, torch.Tensor],
) -> dict:
    """The same recipe, written out: init seed, transferred weights, param groups, batch order,
    cosine schedule, cross-entropy, the L2-SP term and the BatchNorm mode of frozen layers."""
    torch.set_num_threads(1)
    train = kdata.load(DataSpec.model_validate(target_data(setting, seed)), "train")
    x, y = kdata.normalize(train.x, train), train.y
    assert bool((y >= 0).all()), "drop_unlabelled should leave labelled rows only"
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = create_model("cnn_small", num_classes=len(TARGET_CLASSES), in_channels=1, image_size=28)
    block = STRATEGIES[strategy]
    refs: dict[str, torch.Tensor] = {}
    if block is not None:
        # Initial weights through kdray's mapping (a plain copy here); what was transferred is decided by
        # hand (same name and shape, classifier excluded) and checked against kdray's plan.
        plan = plan_transfer(
            source_state,
            model,
            TransferSpec.model_validate({"mapping": NEW_HEAD}),
            source_arch="cnn_small",
            target_arch="cnn_small",
        )
        apply_transfer(model, source_state, plan)
        params = dict(model.named_parameters())
        mine = [
            k
            for k, p in params.items()
            if k in source_state and source_state[k].shape == p.shape and not k.startswith("classifier.")
        ]
        theirs = [e.key for e in plan.entries if e.status == "copied" and e.key in params]
        assert mine == theirs, f"transferred parameters differ: by hand {mine}, kdray plan {theirs}"
        refs = {k: source_state[k].detach().clone() for k in mine}
    frozen = PLAIN_FROZEN.get(strategy, ())
    for n, p in model.named_parameters():
        if n.startswith(frozen):
            p.requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scaled = PLAIN_SCALED.get(strategy)
    if scaled:
        groups = [
            {"params": [p for n, p in named if n.startswith(scaled)], "lr": LR * 0.1},
            {"params": [p for n, p in named if not n.startswith(scaled)], "lr": LR},
        ]
    else:
        groups = [{"params": [p for _, p in named], "lr": LR}]
    alpha = (block or {}).get("l2sp", {}).get("alpha", 0.0)
    steps_per_epoch = math.ceil(len(y) / optim["batch_size"])
    total = optim["epochs"] * steps_per_epoch
    opt = torch.optim.AdamW(groups, lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    steps = 0
    for epoch in range(optim["epochs"]):
        model.train()
        if frozen:  # a frozen layer computes the same function throughout: its BatchNorm keeps the source statistics
            for name, m in model.named_modules():
                if isinstance(m, nn.BatchNorm2d) and (name + ".").startswith(frozen):
                    m.eval()
        for idx in batches(torch.arange(len(y)), optim["batch_size"], epoch, seed):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if alpha:
                reg = torch.zeros(())
                for n, p in model.named_parameters():
                    if n in refs:
                        reg = reg + alpha * (p - refs[n]).pow(2).sum()
                loss = loss + reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
    seconds = time.perf_counter() - t0
    return {"test_acc": evaluate(model, *test), "steps": steps, "seconds": seconds}


# --------------------------------------------------------------------------- parts


def train_sources(root: str, names: list[str], emit) -> dict:
    """Train (or find cached) the candidate sources; returns name -> artifact."""
    arts = {}
    for name in names:
        t0 = time.perf_counter()
        art = kdray_run(root, [source_stage(name)])
        arts[name] = art
        hist = art.manifest["history"]
        print(
            f"source {name}: validation accuracy on its own classes {hist[-1]['val_acc']:.4f} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        emit(
            {
                "part": "source",
                "source": name,
                "text": SOURCES[name]["text"],
                "val_acc": hist[-1]["val_acc"],
                "fit_seconds": art.manifest["timings"]["fit_seconds"],
                "workers": source_stage(name)["run"]["workers"],
            }
        )
    return arts


def run_target(
    root: str,
    setting: str,
    strategy: str,
    source: str,
    seed: int,
    steps: int,
    test: tuple[torch.Tensor, torch.Tensor],
    model: str = "cnn_small",
) -> tuple[dict, dict]:
    n_train = len(kdata.load(DataSpec.model_validate(target_data(setting, seed)), "train"))
    optim = target_optim(setting, n_train, steps)
    stages = [] if strategy == "scratch" else [source_stage(source)]
    t0 = time.perf_counter()
    art = kdray_run(root, [*stages, target_stage(setting, strategy, source, seed, optim, model)])
    seconds = time.perf_counter() - t0  # the whole stage: data, plan, loop, publishing (cached: ~0)
    acc, footwear = test_metrics(art.build_model(), *test)
    kd = {
        "test_acc": acc,
        "footwear_error_share": footwear,
        "seconds": seconds,
        "monitor_val_acc": art.manifest["history"][-1]["val_acc"],
        "epochs": optim["epochs"],
    }
    return kd, {"n_train": n_train, "optim": optim, "art": art}


def part_strategies(root: str, arts: dict, seeds: list[int], steps: int, test, emit) -> None:
    source_state = arts[MAIN_SOURCE].state_dict()
    for setting in SETTINGS:
        for strategy in STRATEGIES:
            for seed in seeds:
                kd, info = run_target(root, setting, strategy, MAIN_SOURCE, seed, steps, test)
                p = plain_target(source_state, setting, strategy, seed, info["optim"], test)
                emit(
                    {
                        "part": "strategies",
                        "setting": setting,
                        "strategy": strategy,
                        "seed": seed,
                        "n_train": info["n_train"],
                        "epochs": info["optim"]["epochs"],
                        "steps": p["steps"],
                        "kdray": kd["test_acc"],
                        "plain": p["test_acc"],
                        "kdray_seconds": round(kd["seconds"], 2),
                        "footwear_error_share": round(kd["footwear_error_share"], 4),
                        "plain_seconds": round(p["seconds"], 2),
                        "kdray_monitor_acc_100": kd["monitor_val_acc"],
                    }
                )


def part_ranking(root: str, arts: dict, seeds: list[int], steps: int, setting: str, test, emit) -> None:
    for seed in seeds:
        rows = score_sources(arts, DataSpec.model_validate(target_data(setting, seed)))
        for r in rows:
            emit(
                {
                    "part": "score",
                    "setting": setting,
                    "seed": seed,
                    "source": r["ref"],
                    "logme": r["logme"],
                    "leep": r["leep"],
                }
            )
    for name in arts:
        for seed in seeds:
            kd, info = run_target(root, setting, "init", name, seed, steps, test)
            emit(
                {
                    "part": "ranking",
                    "setting": setting,
                    "source": name,
                    "seed": seed,
                    "kdray": kd["test_acc"],
                    "kdray_seconds": round(kd["seconds"], 2),
                }
            )


def part_relevance(root: str, seeds: list[int], steps: int, test, emit) -> None:
    """The 10-per-class strategies again, from sources that know the target's classes (kdray only)."""
    for name in RELEVANCE_SOURCES:
        for strategy in RELEVANCE_STRATEGIES:
            for seed in seeds:
                kd, _ = run_target(root, "10pc", strategy, name, seed, steps, test)
                emit(
                    {
                        "part": "relevance",
                        "setting": "10pc",
                        "source": name,
                        "strategy": strategy,
                        "seed": seed,
                        "kdray": kd["test_acc"],
                        "footwear_error_share": round(kd["footwear_error_share"], 4),
                    }
                )


def part_architecture(root: str, seeds: list[int], steps: int, test, emit) -> None:
    """Scratch and init at 10 per class with resnet_small (global-average-pooled) as source and target."""
    for strategy in ("scratch", "init"):
        for seed in seeds:
            kd, _ = run_target(root, "10pc", strategy, ARCH_SOURCE, seed, steps, test, model="resnet_small")
            emit(
                {
                    "part": "architecture",
                    "setting": "10pc",
                    "model": "resnet_small",
                    "source": ARCH_SOURCE,
                    "strategy": strategy,
                    "seed": seed,
                    "kdray": kd["test_acc"],
                    "footwear_error_share": round(kd["footwear_error_share"], 4),
                }
            )


# --------------------------------------------------------------------------- summary


def mean_std(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * sd:.{digits}f}"


def points_over(k: list[float], ref: list[float]) -> str:
    """Mean accuracy of k minus that of ref, in points (n/a without ref runs)."""
    return f"{100 * (statistics.mean(k) - statistics.mean(ref)):+.2f}" if ref else "n/a"


def share(rows: list[dict], strategy: str) -> str:
    vals = [r["footwear_error_share"] for r in rows if r["strategy"] == strategy and "footwear_error_share" in r]
    return f"{100 * statistics.mean(vals):.0f}%" if vals else "n/a"


def summarise(rows: list[dict]) -> None:
    src = {r["source"]: r for r in rows if r["part"] == "source"}
    if src:
        print("\nsources: validation accuracy on their own classes")
        print("| source | trained on | val acc (%) | fit s | workers |\n|---|---|---|---|---|")
        for name, r in src.items():
            acc = r.get("val_acc", r.get("test_acc"))  # rows written before the validation split: test_acc
            print(f"| {name} | {r['text']} | {100 * acc:.2f} | {r['fit_seconds']:.0f} | {r['workers']} |")
    sel = [r for r in rows if r["part"] == "strategies"]
    if sel:
        print("\nstrategies: classes 5-9 test accuracy (%, full test split), mean ± std over seeds")
        print(
            "| setting | strategy | seeds | steps | kdray | plain PyTorch | kdray − plain | kdray − scratch "
            "| footwear share of errors |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        best = {}
        for setting in dict.fromkeys(r["setting"] for r in sel):
            rs = [r for r in sel if r["setting"] == setting]
            scratch = [r["kdray"] for r in rs if r["strategy"] == "scratch"]
            for strategy in dict.fromkeys(r["strategy"] for r in rs):
                k = [r["kdray"] for r in rs if r["strategy"] == strategy]
                p = [r["plain"] for r in rs if r["strategy"] == strategy]
                steps = sorted({r["steps"] for r in rs if r["strategy"] == strategy})
                print(
                    f"| {SETTING_TEXT.get(setting, setting)} | {strategy} | {len(k)} | {'/'.join(map(str, steps))} | "
                    f"{mean_std(k)} | {mean_std(p)} | {points_over(k, p)} | {points_over(k, scratch)} | "
                    f"{share(rs, strategy)} |"
                )
                if strategy != "scratch" and scratch:
                    cur = best.get(setting)
                    if cur is None or statistics.mean(k) > cur[1]:
                        best[setting] = (strategy, statistics.mean(k), statistics.mean(k) - statistics.mean(scratch))
        diffs = [abs(r["kdray"] - r["plain"]) for r in sel]
        groups = {(r["setting"], r["strategy"]) for r in sel}
        worst_mean = max(
            abs(statistics.mean([r["kdray"] - r["plain"] for r in sel if (r["setting"], r["strategy"]) == g]))
            for g in groups
        )
        print(
            f"\nkdray vs plain: largest |mean difference| {100 * worst_mean:.2f} points; largest per-run "
            f"|difference| {100 * max(diffs):.2f} points; identical in {sum(d == 0 for d in diffs)}/{len(diffs)} runs "
            f"-> target (within 0.5 point) {'MET' if worst_mean <= 0.005 else 'NOT met'}"
        )
        for setting, (strategy, acc, gain) in best.items():
            verdict = (
                f"-> target (>= +5) {'MET' if gain >= 0.05 else 'NOT met'}" if setting == "10pc" else "(no target)"
            )
            print(
                f"best strategy at {SETTING_TEXT.get(setting, setting)}: {strategy} {100 * acc:.2f}%, "
                f"{100 * gain:+.2f} points over scratch {verdict}"
            )
    rel = [r for r in rows if r["part"] == "relevance"]
    if rel:
        scratch = [r["kdray"] for r in sel if r["setting"] == "10pc" and r["strategy"] == "scratch"]
        print("\nrelevance: the same target (10 labelled images per class) from sources that know its classes")
        print(
            "| source | trained on | strategy | kdray | kdray − scratch | footwear share of errors |\n"
            "|---|---|---|---|---|---|"
        )
        for name in dict.fromkeys(r["source"] for r in rel):
            for strategy in dict.fromkeys(r["strategy"] for r in rel if r["source"] == name):
                rs = [r for r in rel if r["source"] == name and r["strategy"] == strategy]
                k = [r["kdray"] for r in rs]
                print(
                    f"| {name} | {SOURCES[name]['text']} | {strategy} | {mean_std(k)} | {points_over(k, scratch)} | "
                    f"{share(rs, strategy)} |"
                )
    arch = [r for r in rows if r["part"] == "architecture"]
    if arch:
        print("\narchitecture: resnet_small source (classes 0-4) and target, 10 labelled images per class")
        print("| model | strategy | kdray | kdray − scratch | footwear share of errors |\n|---|---|---|---|---|")
        scratch = [r["kdray"] for r in arch if r["strategy"] == "scratch"]
        for strategy in dict.fromkeys(r["strategy"] for r in arch):
            k = [r["kdray"] for r in arch if r["strategy"] == strategy]
            print(
                f"| resnet_small | {strategy} | {mean_std(k)} | {points_over(k, scratch)} | {share(arch, strategy)} |"
            )
    scores = [r for r in rows if r["part"] == "score"]
    ranked = [r for r in rows if r["part"] == "ranking"]
    if scores and ranked:
        setting = ranked[0]["setting"]
        names = list(dict.fromkeys(r["source"] for r in ranked))
        acc = {n: statistics.mean(r["kdray"] for r in ranked if r["source"] == n) for n in names}
        lm = {n: statistics.mean(r["logme"] for r in scores if r["source"] == n) for n in names}
        lp = {n: statistics.mean(r["leep"] for r in scores if r["source"] == n) for n in names}
        print(
            f"\nranking: candidate sources scored on the target training data ({SETTING_TEXT.get(setting, setting)}), "
            "then fine-tuned with init; mean over seeds"
        )
        print("| source | trained on | LogME | LEEP | fine-tuned acc (%) |\n|---|---|---|---|---|")
        for n in sorted(names, key=lambda n: -acc[n]):
            print(
                f"| {n} | {SOURCES.get(n, {}).get('text', '')} | "
                f"{mean_std([r['logme'] for r in scores if r['source'] == n], 1.0, 4)} | "
                f"{mean_std([r['leep'] for r in scores if r['source'] == n], 1.0, 4)} | "
                f"{mean_std([r['kdray'] for r in ranked if r['source'] == n])} |"
            )
        per_seed = {}
        for score in ("logme", "leep"):
            taus = []
            for seed in sorted({r["seed"] for r in scores}):
                s = {r["source"]: r[score] for r in scores if r["seed"] == seed and r["source"] in acc}
                a = {
                    n: statistics.mean(r["kdray"] for r in ranked if r["source"] == n and r["seed"] == seed)
                    for n in s
                    if any(r["source"] == n and r["seed"] == seed for r in ranked)
                }
                if len(a) == len(s) >= 2:
                    taus.append(kendall_tau(s, a))
            per_seed[score] = taus
        print(
            f"\nKendall τ (mean score vs mean fine-tuned accuracy, {len(names)} sources): "
            f"LogME {kendall_tau(lm, acc):+.3f}, LEEP {kendall_tau(lp, acc):+.3f}; per seed: "
            f"LogME {', '.join(f'{t:+.2f}' for t in per_seed['logme'])}; "
            f"LEEP {', '.join(f'{t:+.2f}' for t in per_seed['leep'])}"
        )
    walls = [r for r in rows if r["part"] == "wall"]
    for r in walls:
        print(f"\nwall time of the run (parts {' '.join(r['parts'])}): {r['seconds'] / 60:.1f} min")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = ["strategies", "relevance", "architecture", "ranking"]
    ap.add_argument("--parts", nargs="+", default=parts, choices=parts)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300, help="optimisation steps per target run (epochs are derived)")
    ap.add_argument("--ranking-setting", default="10pc", choices=list(SETTINGS))
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "kdray-bench-transfer"))
    ap.add_argument("--out", default=None, help="JSON-lines file for results (default: <root>/results.jsonl)")
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args()
    out = args.out or os.path.join(args.root, "results.jsonl")
    os.makedirs(args.root, exist_ok=True)
    if not args.summary_only:
        t0 = time.perf_counter()
        torch.set_num_threads(1)

        def emit(row: dict) -> None:
            print(json.dumps(row), flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")

        test = target_test()
        names = ranking_sources() if "ranking" in args.parts else [MAIN_SOURCE]
        names += [ARCH_SOURCE] if "architecture" in args.parts else []
        names += [n for n in RELEVANCE_SOURCES if "relevance" in args.parts and n not in names]
        arts = train_sources(args.root, [MAIN_SOURCE] + [n for n in names if n != MAIN_SOURCE], emit)
        if "strategies" in args.parts:
            part_strategies(args.root, arts, args.seeds, args.steps, test, emit)
        if "relevance" in args.parts:
            part_relevance(args.root, args.seeds, args.steps, test, emit)
        if "architecture" in args.parts:
            part_architecture(args.root, args.seeds, args.steps, test, emit)
        if "ranking" in args.parts:
            part_ranking(
                args.root,
                {n: arts[n] for n in ranking_sources()},
                args.seeds,
                args.steps,
                args.ranking_setting,
                test,
                emit,
            )
        emit(
            {
                "part": "wall",
                "parts": args.parts,
                "seeds": args.seeds,
                "steps": args.steps,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    with open(out) as f:
        summarise([json.loads(line) for line in f if line.strip()])


if __name__ == "__main__":
    main()
