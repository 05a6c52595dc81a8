"""How small can the student be: a sweep's finished trials as accuracy against size and speed.

For every finished trial (an early-stopped one has no artifact and trained fewer epochs, so it is
left out): validation accuracy, parameter count, size of the weights on disk and latency measured
here (median of ``runs`` forward passes on a batch of ``batch`` seeded inputs, one CPU thread, after
warm-up), and test accuracy only if the stage's own metrics hold one (report only: nothing here
chooses by it). The Pareto front is the set of trials no other trial beats on every objective at
once (higher accuracy, fewer parameters, fewer bytes, lower latency). ``choose`` picks the trial with
the best validation metric among those within a budget (``ChooseSpec``).
"""

from __future__ import annotations

import io
import math
from typing import Any, Literal, Sequence

import torch
from pydantic import Field, model_validator

from kdray.contracts.checkpoint import Artifact, open_artifact, write_artifact
from kdray.contracts.specs import Spec
from kdray.core.storage import Storage
from kdray.evaluate.latency import model_latency

MAXIMIZE = ("val_acc",)
MINIMIZE = ("parameters", "size_bytes", "latency_ms")
# manifest fields a copy of an artifact does not carry over: write_artifact sets them for the copy
_OWN_FIELDS = ("files", "weights", "version", "schema_version", "versions", "git_commit", "created_at")


class ChooseSpec(Spec):
    """The rule that picks the sweep's student: the best validation metric within every budget given.

    ``export`` converts the chosen student (checked against PyTorch); ``none`` skips it.
    """

    max_latency_ms: float | None = Field(None, gt=0)
    max_params: int | None = Field(None, ge=1)
    max_size_mb: float | None = Field(None, gt=0)
    export: Literal["onnx", "torchscript", "none"] = "onnx"

    @model_validator(mode="after")
    def _a_budget(self) -> "ChooseSpec":
        if self.max_latency_ms is None and self.max_params is None and self.max_size_mb is None:
            raise ValueError("give a budget: max_latency_ms, max_params and/or max_size_mb")
        return self

    def budgets(self) -> dict[str, float]:
        """Row field -> the largest value allowed."""
        out: dict[str, float] = {}
        if self.max_latency_ms is not None:
            out["latency_ms"] = self.max_latency_ms
        if self.max_params is not None:
            out["parameters"] = self.max_params
        if self.max_size_mb is not None:
            out["size_bytes"] = self.max_size_mb * 1e6
        return out

    def describe(self) -> str:
        parts = []
        if self.max_latency_ms is not None:
            parts.append(f"latency <= {self.max_latency_ms:g} ms")
        if self.max_params is not None:
            parts.append(f"parameters <= {self.max_params:,}")
        if self.max_size_mb is not None:
            parts.append(f"size <= {self.max_size_mb:g} MB")
        return " and ".join(parts)


# --------------------------------------------------------------------------- the front


def dominates(a: dict[str, Any], b: dict[str, Any], maximize: Sequence[str], minimize: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` on every objective and better on one."""
    pairs = [(a[k], b[k]) for k in maximize] + [(-a[k], -b[k]) for k in minimize]
    return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)


def pareto_front(
    rows: Sequence[dict[str, Any]], maximize: Sequence[str] = MAXIMIZE, minimize: Sequence[str] = MINIMIZE
) -> list[int]:
    """Indices of the rows no other row dominates (rows missing an objective are never on it)."""

    def usable(r: dict[str, Any]) -> bool:
        return all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for k in (*maximize, *minimize))

    ok = [i for i, r in enumerate(rows) if usable(r)]
    return [i for i in ok if not any(dominates(rows[j], rows[i], maximize, minimize) for j in ok if j != i)]


# --------------------------------------------------------------------------- measuring the trials


@torch.no_grad()
def measure_latency(art: Artifact, batch: int, runs: int, seed: int = 0) -> float:
    """Median forward time (ms) of the artifact's model on ``batch`` seeded inputs, one CPU thread."""
    kwargs = art.manifest["model"]["kwargs"]
    shape = (int(kwargs["in_channels"]), int(kwargs["image_size"]), int(kwargs["image_size"]))
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
    model = art.build_model().float().eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return model_latency(model, x, batch, runs)["median_ms"]  # after a warm-up, the median of repeats
    finally:
        torch.set_num_threads(threads)


def trial_rows(trials: list[dict[str, Any]], metric: str, *, batch: int = 64, runs: int = 20) -> list[dict[str, Any]]:
    """One row per finished trial (those with an artifact): its figures, and ``pareto`` marking the front."""
    rows = []
    for t in trials:
        if not t.get("uri") or t.get("status") == "stopped":
            continue
        art = open_artifact(t["uri"])
        if not art.manifest.get("model") or not art.manifest.get("weights"):
            continue  # a stage kind that publishes no model
        metrics = art.manifest.get("metrics") or {}
        rows.append(
            {
                "trial": t["trial"],
                "settings": t["settings"],
                "uri": t["uri"],
                "model": art.manifest["model"]["name"],
                metric: metrics.get(metric),
                "val_acc": metrics.get("val_acc"),
                "test_acc": metrics.get("test_acc"),  # report only: no stage kind computes it today
                "parameters": int(art.manifest["model"]["parameters"]),
                "size_bytes": int(art.manifest["weights"]["bytes"]),
                "latency_ms": measure_latency(art, batch, runs),
            }
        )
    front = set(pareto_front(rows))
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    return rows


def choose(
    rows: list[dict[str, Any]], rule: ChooseSpec, metric: str = "val_acc", mode: str = "max"
) -> tuple[dict[str, Any] | None, str]:
    """The row with the best ``metric`` within the rule's budgets, and a sentence saying what was chosen."""
    budgets = rule.budgets()
    fits = [
        r
        for r in rows
        if r.get(metric) is not None and all(r[k] is not None and r[k] <= limit for k, limit in budgets.items())
    ]
    if not fits:
        smallest = {k: min((r[k] for r in rows if r.get(k) is not None), default=None) for k in budgets}
        shown = ", ".join(f"{k} {_fmt(k, v)}" for k, v in smallest.items())
        return None, (
            f"No finished trial fits the budget ({rule.describe()}); the smallest figures were {shown or 'none'}. "
            "Loosen the budget or sweep smaller students."
        )
    best = (max if mode == "max" else min)(fits, key=lambda r: r[metric])
    return best, (
        f"Chosen: {best['trial']} ({best['model']}), the best {metric} ({best[metric]:.4f}) of the "
        f"{len(fits)} finished trial{'s' if len(fits) > 1 else ''} within {rule.describe()}"
    )


def publish_chosen(store: Storage, row: dict[str, Any], extra: dict[str, Any]) -> Artifact:
    """A copy of the chosen trial's artifact (weights, history, manifest) at ``store``, a stable address a
    later stage can reference (``teacher: <uri>``, ``model.weights: <uri>``, an evaluate stage's models)."""
    art = open_artifact(row["uri"])
    manifest = {k: v for k, v in art.manifest.items() if k not in _OWN_FIELDS}
    manifest["chosen"] = {"trial": row["trial"], "from": art.uri, "from_version": art.pinned_uri, **extra}
    files = {name: art.read_bytes(name) for name in (art.manifest.get("files") or {}) if name.endswith(".json")}
    return write_artifact(store, manifest, art.state_dict(), files)


# --------------------------------------------------------------------------- the report


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return "–"
    if key == "size_bytes":
        return f"{v / 1e3:,.1f} kB"
    if key == "parameters":
        return f"{int(v):,}"
    if key == "latency_ms":
        return f"{v:.3f} ms"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict[str, Any]], metric: str, batch: int, runs: int) -> str:
    """The Pareto table (front marked ★), finished trials by accuracy."""
    if not rows:
        return "## Pareto report\n\nNo finished trial.\n"
    cols = ["val_acc", *([metric] if metric != "val_acc" else []), "parameters", "size_bytes", "latency_ms"]
    test = any(r.get("test_acc") is not None for r in rows)
    head = ["front", "trial", "model", *cols, *(["test_acc (report only)"] if test else [])]
    lines = [
        "## Pareto report",
        "",
        f"Finished trials: validation accuracy against parameters, weights on disk and latency (median of {runs} "
        f"forward passes on a batch of {batch}, 1 CPU thread, on the machine that ran the sweep). ★ marks the "
        "Pareto front: no other trial is at least as accurate and at least as small and fast on every count.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in sorted(rows, key=lambda r: (-(r["val_acc"] or 0), r["parameters"])):
        cells = ["★" if r["pareto"] else "", r["trial"], r["model"], *(_fmt(k, r.get(k)) for k in cols)]
        if test:
            cells.append(_fmt("test_acc", r.get("test_acc")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], title: str) -> bytes | None:
    """Validation accuracy against parameters (log scale), the Pareto front highlighted."""
    rows = [r for r in rows if r.get("val_acc") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rest = [r for r in rows if not r["pareto"]]
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["parameters"])
    ax.scatter([r["parameters"] for r in rest], [r["val_acc"] for r in rest], color="tab:gray", label="trial")
    ax.scatter(
        [r["parameters"] for r in front],
        [r["val_acc"] for r in front],
        color="tab:red",
        s=60,
        zorder=3,
        label="Pareto front (accuracy, parameters, size, latency)",
    )
    staircase: list[dict[str, Any]] = []  # the accuracy-vs-parameters front alone, as a line
    for r in sorted(rows, key=lambda r: (r["parameters"], -r["val_acc"])):
        if not staircase or r["val_acc"] > staircase[-1]["val_acc"]:
            staircase.append(r)
    ax.step(
        [r["parameters"] for r in staircase],
        [r["val_acc"] for r in staircase],
        where="post",
        color="tab:red",
        alpha=0.5,
    )
    for r in rows:
        label = r["trial"].rsplit("-", 1)[-1]
        ax.annotate(label, (r["parameters"], r["val_acc"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
