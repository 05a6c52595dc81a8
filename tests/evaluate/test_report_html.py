"""report.html: written by the evaluate stage, self-contained, and rendered by a real browser (headless Chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import synthetic_pipeline
from PIL import Image

from kdray.contracts.checkpoint import open_artifact
from kdray.engine.pipeline import run_pipeline
from kdray.engine.spec import parse_pipeline

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DATA = {"name": "synthetic", "options": {"num_samples": 256, "image_size": 8, "num_classes": 4}}
OPTIM = {"epochs": 2, "batch_size": 32, "lr": 3e-3}
STAGES = [
    {"name": "scratch", "kind": "train", "model": {"name": "mlp_64"}, "data": DATA, "optim": OPTIM},
    {
        "name": "student",
        "kind": "distill",
        "teacher": "teacher",
        "model": {"name": "mlp_64"},
        "data": DATA,
        "optim": OPTIM,
        "losses": [{"name": "cross_entropy", "weight": 0.5}, {"name": "hinton_kl", "weight": 0.5, "temperature": 4}],
    },
    {"name": "eval", "kind": "evaluate", "models": ["teacher", "scratch", "student"]},
]
# appended to a copy of the page only: writes what the browser loaded into the DOM that --dump-dom prints
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images", imgs.length + "/" + ok);
});
</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("html")
    spec = parse_pipeline(synthetic_pipeline(tmp, extra_stages=STAGES))
    outcomes = run_pipeline(spec, log=lambda m: None, max_concurrent=1)  # one at a time, in this process
    return open_artifact(outcomes[-1].uri), tmp


def test_report_html_is_self_contained(report):
    art, _ = report
    page = art.read_bytes("report.html").decode()
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    assert re.findall(r"""(?:src|href)=["'](?!data:)""", page) == [], "nothing fetched: every image is a data URI"
    assert page.count("data:image/png;base64,") == 2, "the comparison and the training curves, inlined"
    for stage in ("teacher", "scratch", "student"):
        assert f">{stage}<" in page
    assert ">gain<" in page and ">agreement<" in page and ">baseline<" in page
    assert art.exists("comparison.png") and art.exists("report.md"), "the markdown report stays"


@pytest.mark.skipif(
    CHROMIUM is None, reason="needs the chromium binary (Debian package `chromium`, installed by .ci/setup)"
)
def test_report_html_renders_in_headless_chromium(report):
    art, tmp = report
    page = Path(tmp) / "report.html"
    page.write_bytes(art.read_bytes("report.html"))
    probe = Path(tmp) / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    shot = Path(tmp) / "report.png"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp}/c"]
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1280,1600", page.as_uri()],
        check=True,
        capture_output=True,
        timeout=120,
    )
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert 'data-images="2/2"' in dom, "both inlined plots decoded in the browser"
    text = re.sub(r"<[^>]+>", " ", dom)
    for words in ("Evaluation: synth", "teacher", "scratch", "student", "top-1", "Training curves"):
        assert words in text
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 1600)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "a rendered page with plots, not a blank screen"
    if (out := Path("/tmp/kdray-report-screenshot.png")).parent.exists():  # for a person to look at
        shutil.copy(shot, out)
