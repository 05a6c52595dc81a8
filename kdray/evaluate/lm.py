"""The evaluate stage on a text dataset: held-out perplexity, tokens/s and a generated sample per model.

The test split holds the rows of the held-out documents (``kdray.data.text``). For each causal LM:
perplexity ``exp(mean NLL)`` over the real next tokens of every test row, next-token top-1/top-5,
tokens/s of a forward pass over the test rows on this machine, and a sample: the first ``prompt``
tokens of the first test row, then ``sample_tokens`` tokens drawn at temperature 0.8 (seeded), decoded
with the dataset's own tokenizer (checked against dataset.json's sha256). A distilled model is
compared with its teacher (agreement of next-token argmax) and with the same architecture trained
without a teacher (``perplexity_gain``: scratch perplexity / this one; ``gain_over_scratch``: scratch
perplexity minus this one, which ``kdray run``'s table shows).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import torch

from kdray.data.files import read_meta
from kdray.data.text import dataset_tokenizer
from kdray.evaluate.latency import model_row
from kdray.models import lm

PROMPT = 32
SAMPLE_TOKENS = 48


@torch.no_grad()
def score_model(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> tuple[dict[str, float], torch.Tensor]:
    """Perplexity, token top-1/top-5, loss and tokens/s over ``x``; and the argmax next tokens (agreement)."""
    model.eval()
    nll = top1 = top5 = 0.0
    count = 0
    argmax = []
    t0 = time.perf_counter()
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        logits = model(xb)
        a, b, c, n = lm.score(logits, xb)
        nll, top1, top5, count = nll + a, top1 + b, top5 + c, count + n
        argmax.append(logits[:, :-1].argmax(-1))
    seconds = time.perf_counter() - t0
    loss = nll / max(count, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "top1": top1 / max(count, 1),
        "top5": top5 / max(count, 1),
        "tokens": count,
        "tokens_per_s": x.numel() / seconds,
    }, torch.cat(argmax)


def lm_report(ctx: Any, spec: Any, test: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The report of an evaluate stage whose data is a text corpus (``report.json``, ``report.md``)."""
    store, meta = read_meta(spec.path)
    tokenizer = dataset_tokenizer(store, meta)
    x = test.x
    mask = lm.token_mask(x)
    real_targets = mask.flatten()
    prompt = [int(i) for i in x[0, :PROMPT] if int(i) >= 0]
    rows, argmax = [], {}
    for ref in ctx.stage.models:
        art = ctx.parents[ref]
        model = art.build_model()
        scores, argmax[ref] = score_model(model, x, ctx.stage.batch_size)
        sample = lm.generate(model, prompt, SAMPLE_TOKENS, max_len=x.shape[1], seed=ctx.run.seed)
        rows.append(
            {
                **model_row(ref, art, model, x, ctx.stage.latency_batch, ctx.stage.latency_batches),
                **scores,
                "sample": tokenizer.decode(sample),
                "cache_topk": (art.manifest.get("teacher") or {}).get("cache_topk"),
            }
        )
        ctx.log(
            f"[{ctx.stage.name}] {ref}: perplexity {scores['perplexity']:.2f}, {scores['tokens_per_s']:,.0f} tokens/s"
        )
    by_uri = {ctx.parents[r["stage"]].uri: r for r in rows}
    for row in rows:
        art = ctx.parents[row["stage"]]
        teacher_ref = art.manifest["spec"].get("teacher")
        teacher = next((by_uri.get(p["uri"]) for p in art.manifest.get("parents", []) if p["ref"] == teacher_ref), None)
        if teacher is not None:
            same = (argmax[row["stage"]] == argmax[teacher["stage"]]).flatten()[real_targets]
            row.update(
                teacher=teacher["stage"],
                agreement=float(same.float().mean()),
                compression_params=teacher["parameters"] / row["parameters"],
            )
        scratch = next(
            (
                r
                for r in rows
                if r["kind"] == "train"
                and (r["model"], r["parameters"]) == (row["model"], row["parameters"])
                and r is not row
            ),
            None,
        )
        if scratch is not None and row["kind"] != "train":  # the same architecture trained without a teacher
            row.update(
                scratch=scratch["stage"],
                perplexity_gain=scratch["perplexity"] / row["perplexity"],
                gain_over_scratch=scratch["perplexity"] - row["perplexity"],  # perplexity points (higher: better)
            )
    report = {
        "pipeline": ctx.pipeline.name,
        "data": spec.model_dump(mode="json"),
        "test_examples": len(test),
        "test_tokens": int(mask.sum()),
        "tokenizer": meta["text"]["tokenizer"],
        "prompt": tokenizer.decode(prompt),
        "selection": "validation documents / training data only; the test documents are read once, by this report",
        "models": rows,
    }
    return report, {"report.json": json.dumps(report, indent=2).encode(), "report.md": markdown(report).encode()}


def markdown(report: dict[str, Any]) -> str:
    cols = [
        ("stage", "{}"),
        ("kind", "{}"),
        ("model", "{}"),
        ("perplexity", "{:.2f}"),
        ("loss", "{:.4f}"),
        ("top1", "{:.4f}"),
        ("top5", "{:.4f}"),
        ("tokens_per_s", "{:,.0f}"),
        ("latency_ms", "{:.2f}"),
        ("parameters", "{:,}"),
        ("teacher", "{}"),
        ("agreement", "{:.4f}"),
        ("scratch", "{}"),
        ("perplexity_gain", "{:.3f}x"),
    ]
    cols = [c for c in cols if any(c[0] in r for r in report["models"])]
    lines = [
        f"# Evaluation: {report['pipeline']}",
        "",
        f"Held-out test documents of `{report['data'].get('path')}`: {report['test_examples']:,} rows, "
        f"{report['test_tokens']:,} next tokens scored (padding excluded). Tokenizer: "
        f"{report['tokenizer']['kind']} ({report['tokenizer']['vocab_size']:,} ids, sha256 "
        f"`{report['tokenizer']['sha256'][:16]}`). Perplexity is exp(mean next-token NLL); tokens/s is a forward "
        "pass over the test rows on this machine.",
        "",
        "| " + " | ".join(c for c, _ in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in report["models"]:
        lines.append("| " + " | ".join(fmt.format(r[c]) if r.get(c) is not None else "" for c, fmt in cols) + " |")
    lines += [
        "",
        "## Samples",
        "",
        "Prompt (the first tokens of the first test row):",
        "",
        "```",
        report["prompt"],
        "```",
    ]
    for r in report["models"]:
        lines += ["", f"**{r['stage']}** continues:", "", "```", r["sample"], "```"]
    return "\n".join(lines) + "\n"
