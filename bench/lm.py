"""Causal LM distillation on the standard library's source: scratch vs KD, full logits vs a top-k cache.

    .venv/bin/python bench/lm.py                      # about 10 min on 2 CPUs
    .venv/bin/python bench/lm.py --corpus-kb 300 --teacher-epochs 2 --epochs 1    # a quick look

One run, side by side, every number from the same corpus, teacher and seeds:

* the corpus: top-level ``.py`` modules of the running Python's standard library (found with
  ``sysconfig``; ``--corpus-kb`` of them, by name), a BPE of ``--vocab`` ids trained on the training
  modules, rows of ``--seq-len`` tokens, 10% of the modules held out for validation and 10% for test;
* a teacher (kdray's ``lm_tiny`` at width 128, depth 4) trained by a ``train`` stage;
* students of one architecture (width 64, depth 1), the same steps and seed: ``scratch`` (next-token
  cross-entropy), ``kd-full`` (the teacher online, full-logit forward KL), ``kd-top8/32/128`` (the
  same loss from the top-k cache, tail kept as a bucket, fp16 values) and ``kd-top32-int8``;
* held-out test perplexity of each (the evaluate stage), the cache's bytes per token against full
  float32 logits and its build time, and the step time of cached KD over the student alone.

Results go to --out (JSON) and a Markdown table on stdout (docs/benchmarks.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

from kdray.contracts.checkpoint import open_artifact
from kdray.data.text import import_text
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline

KD = [{"name": "cross_entropy", "weight": 0.5}, {"name": "token_kl", "weight": 0.5}]


def stdlib_corpus(folder: Path, kilobytes: int) -> int:
    """Copy top-level stdlib modules (sorted by name) into ``folder`` until ``kilobytes``; returns the count."""
    root = Path(sysconfig.get_paths()["stdlib"])
    folder.mkdir(parents=True)
    total = n = 0
    for path in sorted(root.glob("*.py")):
        if total >= kilobytes * 1024:
            break
        shutil.copy(path, folder / path.name)
        total += path.stat().st_size
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus-kb", type=int, default=800)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-lm.json")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kdray-bench-lm-"))
    modules = stdlib_corpus(tmp / "corpus", args.corpus_kb)
    t0 = time.perf_counter()
    meta = import_text(
        str(tmp / "corpus"), str(tmp / "data"), vocab_size=args.vocab, seq_len=args.seq_len, log=lambda m: None
    )
    import_s = time.perf_counter() - t0
    data = {"name": "parquet", "path": str(tmp / "data")}
    optim = {"epochs": args.epochs, "batch_size": 32, "lr": 3e-3}
    student_model = {"name": "lm_tiny", "dim": 64, "depth": 1}

    def kd(name: str, losses: list, **kw) -> dict:
        return {"name": name, "kind": "distill", "teacher": "teacher", "model": student_model, "data": data,
                "optim": optim, "losses": losses, **kw}  # fmt: skip

    students = [
        {"name": "scratch", "kind": "train", "model": student_model, "data": data, "optim": optim},
        kd("kd-full", KD, teacher_cache="off"),
        *(kd(f"kd-top{k}", KD, teacher_topk={"k": k, "quantize": "fp16"}) for k in (8, 32, 128)),
        kd("kd-top32-int8", KD, teacher_topk={"k": 32, "quantize": "int8"}),
    ]
    doc = {
        "name": "bench-lm",
        "storage": {"uri": f"file://{tmp}/runs"},
        "run": {"workers": 0, "seed": args.seed},
        "stages": [
            {
                "name": "teacher",
                "kind": "train",
                "model": {"name": "lm_tiny", "dim": 128, "depth": 4},
                "data": data,
                "optim": {"epochs": args.teacher_epochs, "batch_size": 32, "lr": 2e-3},
            },
            *students,
            {
                "name": "report",
                "kind": "evaluate",
                "models": ["teacher", *(s["name"] for s in students)],
                "latency_batches": 3,
            },  # fmt: skip
        ],
    }
    logs: list[str] = []
    outcomes = {o.stage: o for o in run_pipeline(parse_pipeline(doc), log=logs.append, max_concurrent=1)}
    report = open_artifact(outcomes["report"].uri).read_json("report.json")
    rows = {r["stage"]: r for r in report["models"]}
    manifests = {name: open_artifact(o.uri).manifest for name, o in outcomes.items() if name != "report"}

    def step_seconds(name: str) -> float:
        history = manifests[name]["history"]
        rows_per_epoch = sum(h["samples_per_s"] * h["epoch_seconds"] for h in history) / len(history)
        steps = rows_per_epoch / optim["batch_size"]
        return sum(h["epoch_seconds"] for h in history) / len(history) / steps

    vocab = meta["num_classes"]
    results = {
        "corpus": {
            "modules": modules,
            "tokens": meta["text"]["tokens"],
            "rows": meta["text"]["rows"],
            "vocab": vocab,
            "seq_len": args.seq_len,
            "import_seconds": round(import_s, 2),
        },  # fmt: skip
        "teacher": {k: rows["teacher"][k] for k in ("perplexity", "parameters")},
        "students": {},
    }
    scratch_ppl = rows["scratch"]["perplexity"]
    for s in students:
        name = s["name"]
        cache = (manifests[name].get("teacher") or {}).get("cache_topk") or {}
        results["students"][name] = {
            "perplexity": rows[name]["perplexity"],
            "vs_scratch": scratch_ppl / rows[name]["perplexity"],
            "step_ms": 1000 * step_seconds(name),
            "cache_bytes_per_token": cache.get("bytes_per_token"),
            "cache_fraction_of_full": cache.get("bytes_per_token", 0) / (4 * vocab) if cache else None,
            "cache_build_seconds": cache.get("build_seconds"),
        }
    scratch_step = results["students"]["scratch"]["step_ms"]
    for r in results["students"].values():
        r["step_vs_scratch"] = r["step_ms"] / scratch_step
    Path(args.out).write_text(json.dumps(results, indent=2))

    c = results["corpus"]
    print(
        f"Corpus: {c['modules']} stdlib modules, {c['tokens']['train']:,} training tokens, BPE of {vocab} ids, "
        f"rows of {args.seq_len}; teacher perplexity {results['teacher']['perplexity']:.2f} "
        f"({results['teacher']['parameters']:,} parameters)\n"
    )
    print(
        "| student | test perplexity | scratch / this | step ms | step / scratch | cache bytes/token | of full logits | cache build s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results["students"].items():
        cache = (
            f"{r['cache_bytes_per_token']:.0f} | {r['cache_fraction_of_full']:.2%} | {r['cache_build_seconds']:.1f}"
            if r["cache_bytes_per_token"]
            else f"- | {'(teacher online)' if name == 'kd-full' else '-'} | -"
        )
        print(
            f"| {name} | {r['perplexity']:.2f} | {r['vs_scratch']:.3f}x | {r['step_ms']:.1f} | "
            f"{r['step_vs_scratch']:.2f} | {cache} |"
        )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
