"""``report.html``: the evaluate stage's report as one self-contained page (tables and inlined plots).

Everything is in the one file (styles inline, images as ``data:image/png;base64`` URIs, no script,
nothing fetched), so it reads the same from a local folder, a bucket's web view or an e-mail.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Callable

from kdray.evaluate.figures import LEGEND, ratio, speed, spread

Format = str | Callable[[dict[str, Any]], str]  # a format string for the value, or the cell's text from the row

# (key, header, format) of the models table; optional columns appear when any row has them
COLUMNS: list[tuple[str, str, Format]] = [
    ("stage", "stage", "{}"),
    ("kind", "kind", "{}"),
    ("model", "model", "{}"),
    ("top1", "top-1", "{:.4f}"),
]
OPTIONAL_TOP5: list[tuple[str, str, Format]] = [("top5", "top-5", "{:.4f}")]
SIZES: list[tuple[str, str, Format]] = [
    ("loss", "test loss", "{:.4f}"),
    ("parameters", "parameters", "{:,}"),
    ("bytes", "bytes", "{:,}"),
    ("latency_ms", "latency", spread),
]
RELATIONS: list[tuple[str, str, Format]] = [
    ("teacher", "teacher", "{}"),
    ("agreement", "agreement", "{:.4f}"),
    ("compression_params", "size", lambda r: ratio(r["compression_params"])),
    ("speedup", "speed", speed),
    ("scratch", "baseline", "{}"),
    ("gain_over_scratch", "gain", "{:+.4f}"),
]

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 96rem;
       padding: 0 1rem; color: #1b1f24; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
p.note { color: #57606a; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .85rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .45rem; text-align: right; }
th { background: #f6f8fa; } td.text, th.text { text-align: left; }
td.gain-pos { color: #1a7f37; font-weight: 600; } td.gain-neg { color: #cf222e; font-weight: 600; }
img { max-width: 100%; border: 1px solid #d0d7de; margin: .5rem 0; }
code { background: #f6f8fa; padding: 0 .2rem; }
div.wide { overflow-x: auto; }
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _cell(row: dict[str, Any], key: str, fmt: Format) -> str:
    if key not in row or row[key] is None:
        return "<td></td>"
    value = row[key]
    text = html.escape(fmt(row) if callable(fmt) else fmt.format(value))
    if isinstance(value, str):
        return f'<td class="text">{text}</td>'
    if key == "gain_over_scratch":
        return f'<td class="{"gain-pos" if value >= 0 else "gain-neg"}">{text}</td>'
    return f"<td>{text}</td>"


def models_table(rows: list[dict[str, Any]]) -> str:
    cols = COLUMNS + [c for c in OPTIONAL_TOP5 + SIZES + RELATIONS if any(c[0] in r for r in rows)]
    head = "".join(
        f'<th class="text">{html.escape(h)}</th>' if f == "{}" else f"<th>{html.escape(h)}</th>" for _, h, f in cols
    )
    body = "".join("<tr>" + "".join(_cell(r, k, f) for k, _, f in cols) + "</tr>" for r in rows)
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def selection_table(rows: list[dict[str, Any]]) -> str:
    body = "".join(
        f'<tr><td class="text">{html.escape(r["stage"])}</td><td class="text">{html.escape(r.get("selection", ""))}</td>'
        f'<td class="text"><code>{html.escape(r.get("uri", ""))}</code></td></tr>'
        for r in rows
    )
    return (
        '<table><thead><tr><th class="text">stage</th><th class="text">what chose the model</th>'
        f'<th class="text">artifact</th></tr></thead><tbody>{body}</tbody></table>'
    )


def plot_comparison(rows: list[dict[str, Any]]) -> bytes | None:
    """Top-1 accuracy per evaluated model, with each model's gain over its baseline written on its bar."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["stage"] for r in rows]
    top1 = [r["top1"] for r in rows]
    colours = ["#8c959f" if r["kind"] == "train" else "#0969da" for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(rows) + 2), 3.6))
    bars = ax.bar(names, top1, color=colours)
    for bar, r in zip(bars, rows):
        label = f"{r['top1']:.3f}"
        if "gain_over_scratch" in r:
            label += f"\n{r['gain_over_scratch']:+.3f} vs {r['scratch']}"
        ax.annotate(
            label,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set(ylabel="top-1 accuracy (test split)", title="Models against their baselines", ylim=(0, 1.15))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def legend(rows: list[dict[str, Any]]) -> str:
    """What the columns measure, for the columns the table shows."""
    shown = {"top-1", "latency"} | {h for k, h, _ in OPTIONAL_TOP5 + RELATIONS if any(k in r for r in rows)}
    return "<br>".join(f"{html.escape(h)}: {html.escape(t)}" for h, t in LEGEND.items() if h in shown)


def render_html(report: dict[str, Any], images: dict[str, bytes]) -> str:
    """The page: summary, models table, comparison and training-curve plots, and what chose each model.

    ``images`` maps a caption to PNG bytes (e.g. ``{"Training curves": curves_png}``), inlined in order."""
    rows = report["models"]
    title = f"Evaluation: {report['pipeline']}"
    figures = "".join(
        f'<figure><img alt="{html.escape(caption, quote=True)}" src="{data_uri(png)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, png in images.items()
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="note">Test split of <code>{html.escape(str(report["data"].get("name")))}</code>:
{report["test_examples"]:,} examples, read here only; every choice (epoch, source, sweep trial) used validation
or training data.</p>
<h2>Models</h2>
{models_table(rows)}
<p class="note">{legend(rows)}</p>
<h2>Plots</h2>
{figures or '<p class="note">No plots (no training history).</p>'}
<h2>Model selection</h2>
{selection_table(rows)}
</body></html>
"""
