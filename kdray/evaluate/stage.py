"""The evaluate stage: accuracy, loss, size and speed of trained models, as JSON, Markdown and plots.

For every referenced artifact: top-1 accuracy (top-5 with more than 5 classes) and loss on the test
split, parameter count, weights size on disk, latency per batch on this machine's device (median of
repeats after a warm-up, with the interquartile range: ``kdray.evaluate.latency``); for a distilled
model also agreement with its teacher and the ratios teacher/student of size and latency. Writes ``report.json``,
``report.md``, ``curves.png`` (training curves from the manifests' histories), ``comparison.png``
and ``report.html`` (all of it in one self-contained page, ``kdray.evaluate.html``).
"""

from __future__ import annotations

import io
import json
import time
from typing import Any, Literal

import torch
from pydantic import Field

from kdray.contracts.checkpoint import Artifact, write_artifact
from kdray.contracts.specs import DataSpec, StageBase
from kdray.contracts.stage import StageContext, StageKind, stage_kind
from kdray.core.errors import KdrayError
from kdray.core.metrics import metrics_for, predict
from kdray.data import datasets as kdata
from kdray.data.text import is_token_data
from kdray.evaluate.exported import onnx_scores
from kdray.evaluate.figures import LEGEND, ratio, speed, spread
from kdray.evaluate.html import plot_comparison, render_html
from kdray.evaluate.latency import distinct, model_row
from kdray.evaluate.lm import lm_report


class EvaluateStage(StageBase):
    """Evaluate trained stages on a test split and write ``report.json``, ``report.md`` and plots."""

    kind: Literal["evaluate"] = "evaluate"
    models: list[str] = Field(min_length=1)
    data: DataSpec | None = None
    batch_size: int = Field(512, ge=1)
    latency_batch: int = Field(128, ge=1)
    latency_batches: int = Field(10, ge=1)
    # also evaluate each model's export (made by `kdray export`) beside it; absent from the key when empty
    exported: list[Literal["onnx"]] = Field(default_factory=list, exclude_if=lambda v: not v)

    def references(self) -> list[tuple[str, str]]:
        return [(f"models[{i}]", m) for i, m in enumerate(self.models)]


def data_spec_for(ctx: Any) -> Any:
    """The stage's own data spec, or else the first evaluated model's training data (same selection)."""
    return evaluated_data(ctx.stage, ctx.parents)


def evaluated_data(stage: EvaluateStage, parents: dict[str, Artifact]) -> DataSpec:
    """``data_spec_for`` from the stage spec and its parents' artifacts."""
    if stage.data is not None:
        return stage.data
    first = parents[stage.models[0]]
    spec = first.manifest["spec"]
    # the task the published model is for: a share stage's task B, an adapt stage's target domain
    return DataSpec.model_validate(spec.get("data_b") or spec.get("target_domain") or spec.get("data") or {})


def evaluate_stage(ctx: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    spec = data_spec_for(ctx)
    test = kdata.load(spec, "test")
    if is_token_data(spec):  # causal LMs on a text corpus: perplexity, tokens/s, samples
        return lm_report(ctx, spec, test)
    x = kdata.normalize(test.x, test)
    rows, logits_by_stage = [], {}
    for ref in ctx.stage.models:
        art = ctx.parents[ref]
        check_head(ctx.stage.name, ref, art, test, spec)
        model = art.build_model()
        logits = predict(model, x, ctx.stage.batch_size)
        logits_by_stage[ref] = logits
        row = {
            **model_row(ref, art, model, x, ctx.stage.latency_batch, ctx.stage.latency_batches),
            **metrics_for(logits, test.y),
            "selection": selection_note(art.manifest),
        }
        if "onnx" in ctx.stage.exported:
            stage = ctx.stage
            row |= onnx_scores(
                art,
                x,
                test.y,
                logits,
                batch_size=stage.batch_size,
                latency_batch=stage.latency_batch,
                latency_batches=stage.latency_batches,
            )
        rows.append(row)
        ctx.log(f"[{ctx.stage.name}] {ref}: top-1 {row['top1']:.4f}, {row['parameters']:,} parameters")
    add_relations(rows, ctx, logits_by_stage)
    report = {
        "pipeline": ctx.pipeline.name,
        "data": spec.model_dump(mode="json"),
        "test_examples": len(test),
        "selection": "validation split / training data only; the test split is read once, by this report",
        "models": rows,
    }
    files = {"report.json": json.dumps(report, indent=2).encode(), "report.md": markdown(report).encode()}
    png = plot_curves({ref: ctx.parents[ref].manifest.get("history", []) for ref in ctx.stage.models})
    if png:
        files["curves.png"] = png
    comparison = plot_comparison(rows)
    if comparison:
        files["comparison.png"] = comparison
    images = {"Top-1 against the baselines": comparison, "Training curves": png}
    files["report.html"] = render_html(report, {k: v for k, v in images.items() if v}).encode()
    return report, files


def check_head(stage: str, ref: str, art: Artifact, test: kdata.Split, spec: DataSpec) -> None:
    """A model whose head is narrower than the test data's classes cannot be scored: say so, in one paragraph."""
    width = (art.manifest.get("model") or {}).get("kwargs", {}).get("num_classes")
    labels = int(test.y.max()) + 1 if len(test.y) else 0
    if isinstance(width, int) and max(test.num_classes, labels) > width:
        raise KdrayError(
            f"stage {stage!r}: the model of {ref} ({art.uri}) has a head of {width} classes, but the test data "
            f"({spec.name}{' at ' + spec.path if spec.path else ''}) has {max(test.num_classes, labels)} classes",
            hint="Evaluate it on data with the classes it was trained for (the stage's data, or data.classes "
            f"selecting {width} classes), or retrain it with model.num_classes at least the data's.",
        )


def selection_note(manifest: dict[str, Any]) -> str:
    """What chose this model (its epoch, its source): validation data only, never the test split."""
    spec = manifest.get("spec") or {}
    data = spec.get("data") or spec.get("source_domain") or {}
    val = data.get("val_size") or f"{data.get('val_fraction', 0.1):g} of the training pool"
    parts = []
    adapt = manifest.get("adapt")
    if adapt:
        where = {
            "source_val": f"source-domain validation accuracy (val split: {val})",
            "entropy": "prediction entropy on unlabelled target training data",
            "snd": "soft neighbourhood density on unlabelled target training data",
            "oracle": "target validation labels (oracle: NOT deployable)",
        }.get(adapt.get("selection"), str(adapt.get("selection")))
        parts.append(f"epoch {adapt.get('selected_epoch')} chosen by {where}")
    else:
        parts.append("last epoch (no epoch selection); val_* watched on the validation split")
    ranking = (manifest.get("source") or {}).get("ranking")
    if ranking:
        parts.append("source: auto chosen by transferability on the target training data")
    return "; ".join(parts)


def add_relations(rows: list[dict[str, Any]], ctx: Any, logits: dict[str, torch.Tensor]) -> None:
    """For a model distilled from a teacher that is also evaluated: agreement and compression."""
    by_uri = {ctx.parents[r["stage"]].uri: r for r in rows}
    for row in rows:
        art = ctx.parents[row["stage"]]
        for parent in art.manifest.get("parents", []):
            teacher = by_uri.get(parent["uri"])
            if teacher is None or parent["ref"] != art.manifest["spec"].get("teacher"):
                continue
            row["teacher"] = teacher["stage"]
            row["agreement"] = float(
                (logits[row["stage"]].argmax(1) == logits[teacher["stage"]].argmax(1)).float().mean()
            )
            row["compression_params"] = teacher["parameters"] / row["parameters"]
            row["compression_bytes"] = teacher["bytes"] / row["bytes"]
            row["speedup"] = teacher["latency_ms"] / row["latency_ms"]
            row["speedup_distinct"] = distinct(teacher, row)  # False: the ranges overlap, no difference shown
        # the same architecture trained from labels alone, if evaluated too: what distillation added
        scratch = next(
            (
                r
                for r in rows
                if r["kind"] == "train" and r["model"] == row["model"] and r is not row and row["kind"] != "train"
            ),
            None,
        )
        if scratch is not None:
            row["scratch"] = scratch["stage"]
            row["gain_over_scratch"] = row["top1"] - scratch["top1"]


def markdown(report: dict[str, Any]) -> str:
    rows = report["models"]
    # (column, how to write it from the row, when it is shown)
    cols: list[tuple[str, Any, bool]] = [
        ("stage", lambda r: r["stage"], True),
        ("kind", lambda r: r["kind"], True),
        ("model", lambda r: r["model"], True),
        ("top-1", lambda r: f"{r['top1']:.4f}", True),
        ("top-5", lambda r: f"{r['top5']:.4f}" if "top5" in r else "", any("top5" in r for r in rows)),
        ("loss", lambda r: f"{r['loss']:.4f}", True),
        ("parameters", lambda r: f"{r['parameters']:,}", True),
        ("bytes", lambda r: f"{r['bytes']:,}", True),
        ("latency", spread, True),
        ("teacher", lambda r: r.get("teacher", ""), any("teacher" in r for r in rows)),
        (
            "agreement",
            lambda r: f"{r['agreement']:.4f}" if "agreement" in r else "",
            any("agreement" in r for r in rows),
        ),
        (
            "size",
            lambda r: ratio(r["compression_params"]) if "compression_params" in r else "",
            any("compression_params" in r for r in rows),
        ),
        ("speed", speed, any("speedup" in r for r in rows)),
        (
            "gain",
            lambda r: f"{r['gain_over_scratch']:+.4f} over {r['scratch']}" if "scratch" in r else "",
            any("scratch" in r for r in rows),
        ),
        (
            "onnx top-1",
            lambda r: f"{r['onnx_top1']:.4f}" if "onnx_top1" in r else "",
            any("onnx_top1" in r for r in rows),
        ),
        (
            "onnx agreement",
            lambda r: f"{r['onnx_agreement']:.4f}" if "onnx_agreement" in r else "",
            any("onnx_agreement" in r for r in rows),
        ),
        (
            "onnx max abs diff",
            lambda r: f"{r['onnx_max_abs_diff']:.2e}" if "onnx_max_abs_diff" in r else "",
            any("onnx_max_abs_diff" in r for r in rows),
        ),
        ("onnx latency", lambda r: spread(r, "onnx_"), any("onnx_latency_ms" in r for r in rows)),
        ("selection", lambda r: r.get("selection", ""), True),
    ]
    shown = [(name, cell) for name, cell, show in cols if show]
    batch = max((r.get("latency_batch", 0) for r in rows), default=0)
    lines = [
        f"# Evaluation: {report['pipeline']}",
        "",
        f"Test split of `{report['data']['name']}`: {report['test_examples']:,} examples. "
        "The test split is read here only; every choice (epoch, source, sweep trial) used validation or "
        "training data (column `selection`).",
        "",
        "| " + " | ".join(name for name, _ in shown) + " |",
        "|" + "---|" * len(shown),
    ]
    for r in rows:
        lines.append("| " + " | ".join(str(cell(r)) for _, cell in shown) + " |")
    lines += ["", *legend([name for name, _ in shown], batch, markdown=True)]
    return "\n".join(lines) + "\n"


def legend(columns: list[str], batch: int, markdown: bool = False) -> list[str]:
    """One line per column that needs saying what it measures (``kdray.evaluate.figures.LEGEND``)."""
    out = []
    for name in columns:
        text = LEGEND.get(name)
        if text:
            if name == "latency" and batch:
                text = text.replace("one batch", f"one batch of {batch:,}")
            out.append(f"- `{name}`: {text}." if markdown else f"{name}: {text}.")
    return out


def plot_curves(histories: dict[str, list[dict[str, Any]]]) -> bytes | None:
    """Training loss and validation accuracy per epoch, one line per model; None when nothing to plot."""
    histories = {k: h for k, h in histories.items() if h}
    if not histories:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, hist in histories.items():
        epochs = [h["epoch"] for h in hist]
        ax_loss.plot(epochs, [h["train_loss"] for h in hist], marker="o", label=name)
        ax_acc.plot(epochs, [h.get("val_acc", h.get("test_acc")) for h in hist], marker="o", label=name)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


@stage_kind
class EvaluateKind(StageKind):
    """Evaluate finished stages on a test split: ``report.json``, ``report.md`` and plots."""

    spec = EvaluateStage
    trains = False

    def datasets(self, stage: Any, parents: dict[str, Artifact]) -> dict[str, DataSpec]:
        if stage.data is None and stage.models[0] not in parents:
            return {}  # the evaluated model is gone: nothing to compare (it reruns when it is published again)
        return {"data": evaluated_data(stage, parents)}

    def run(self, ctx: StageContext) -> Artifact:
        t0 = time.perf_counter()
        report, files = evaluate_stage(ctx)
        metrics = {
            "models": {r["stage"]: {k: r[k] for k in ("top1", "top5", "loss") if k in r} for r in report["models"]}
        }
        manifest = ctx.base_manifest() | {
            "metrics": metrics,
            "timings": {"seconds": round(time.perf_counter() - t0, 3)},
        }
        return write_artifact(ctx.store, manifest, None, files)
