"""A sweep's report: the ranked trials as markdown and as a bar chart."""

from __future__ import annotations

import io
from typing import Any

from kdray.sweeps import pareto


def _status(r: dict[str, Any]) -> str:
    return f"stopped early at epoch {r.get('epoch')}" if r.get("status") == "stopped" else str(r.get("status"))


def markdown(report: dict[str, Any]) -> str:
    keys = list(report["grid"])
    asha = report.get("scheduler") or {}
    lines = [
        f"# Sweep of {report['pipeline']}/{report['stage']} ({len(report['trials'])} trials, "
        f"{report['seconds']} s, {report['max_concurrent']} at a time)",
        "",
        f"Ranked by {report['metric']} ({report['mode']}) on the validation split; the test split is not read. "
        + (
            f"ASHA (grace period {asha['grace_period']}, reduction factor {asha['reduction_factor']:g}) stopped "
            f"{report.get('stopped', 0)} trial(s) early: they published nothing and rank after the finished ones."
            if asha
            else "No early stopping."
        ),
        "",
        "| rank | trial | " + " | ".join(keys) + f" | {report['metric']} | status |",
        "|---|---|" + "---|" * len(keys) + "---|---|",
    ]
    for r in report["trials"]:
        value = r[report["metric"]]
        shown = f"{value:.4f}" if value is not None else "–"
        lines.append(
            f"| {r['rank']} | {r['trial']} | "
            + " | ".join(str(r["settings"][k]) for k in keys)
            + f" | {shown} | {_status(r)} |"
        )
    text = "\n".join(lines) + "\n"
    if report.get("pareto") is not None:
        latency = report.get("latency") or {}
        text += "\n" + pareto.markdown(
            report["pareto"], report["metric"], latency.get("batch", 64), latency.get("runs", 20)
        )
    chosen = report.get("chosen")
    if chosen:
        text += f"\n## Chosen student\n\nRule: {chosen['rule']}. {chosen['note'].rstrip('.')}.\n"
        if chosen.get("uri"):
            text += (
                f"\nPublished at `{chosen['uri']}` (a later stage can reference it: `teacher:`, `model.weights:`).\n"
            )
        export = chosen.get("export") or {}
        if export.get("error"):
            text += f"\nExport to {export['format']} failed: {export['error']}\n"
        elif export:
            lat = export["latency"]
            text += (
                f"\nExported to {export['format']}: `{export['uri']}`; max abs difference vs PyTorch "
                f"{export['max_abs_diff']:.2e} (tolerance {export['tolerance']:g}), argmax agreement "
                f"{export['argmax_agreement']:.4f}; latency at batch {lat['batch']}: {lat['exported_ms']:.3f} ms "
                f"exported, {lat['torch_ms']:.3f} ms PyTorch ({lat['threads']} threads).\n"
            )
    return text


def plot(report: dict[str, Any]) -> bytes | None:
    rows = [r for r in report["trials"] if r[report["metric"]] is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [", ".join(f"{k.split('.')[-1]}={v}" for k, v in r["settings"].items()) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.5))
    ax.barh(range(len(rows))[::-1], [r[report["metric"]] for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows))[::-1], labels)
    values = [r[report["metric"]] for r in rows]
    ax.set_xlim(min(values) - 0.02, max(values) + 0.01)
    ax.set_xlabel(report["metric"])
    ax.set_title(f"{report['pipeline']}/{report['stage']}: trials ranked")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
