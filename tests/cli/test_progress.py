"""What a user sees from long work besides training: the teacher-cache build, `kdray data import`
and the state of a submitted job.

The cache build and the import run the real command line in a subprocess, once under a
pseudo-terminal (a live bar: count of total, rate, ETA) and once into a file (plain lines at the
start and the end, no ANSI codes); ``NO_COLOR`` drops the colours but keeps the live display. A
job's state display follows a Ray job API stand-in through a fixed sequence of states.
"""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from helpers import synthetic_pipeline
from helpers.terminal import ANSI, KDRAY, env, in_terminal

from kdray.core.errors import KdrayError
from kdray.core.meter import LogTask, duration, log_meter, task_line
from kdray.engine import progress
from kdray.engine.progress import ProgressHub, Renderer, StateWatch, replay

SGR = re.compile(r"\x1b\[([0-9;]*)m")


def into_file(args: list[str], cwd: Path) -> str:
    log = cwd / "out.log"
    with open(log, "wb") as out:
        done = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, env=env(), cwd=cwd, timeout=600)
    text = log.read_text()
    assert done.returncode == 0, text
    return text


def colours(raw: str) -> set[str]:
    """The colour parameters (foreground/background) among the SGR codes of ``raw``."""
    found = set()
    for params in SGR.findall(raw):
        for p in params.split(";"):
            if p.isdigit() and (30 <= int(p) <= 49 or 90 <= int(p) <= 107):
                found.add(p)
                break
    return found


# --------------------------------------------------------------------------- the teacher cache


ROWS = 1024
TRAIN_ROWS = 922  # the training split: the rest is the validation split


def cache_spec(tmp_path: Path) -> Path:
    doc = synthetic_pipeline(tmp_path, epochs=1)
    data = doc["stages"][0]["data"]
    data["options"]["num_samples"] = ROWS
    doc["stages"].append(
        {
            "name": "student",
            "kind": "distill",
            "teacher": "teacher",
            "model": {"name": "mlp_64"},
            "data": data,
            "optim": {"epochs": 1, "batch_size": 64, "lr": 3e-3},
            "losses": [{"name": "cross_entropy", "weight": 0.5}, {"name": "hinton_kl", "weight": 0.5}],
            "teacher_cache": "on",
        }
    )
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_teacher_cache_build_shows_a_live_bar_in_a_terminal(tmp_path):
    raw = in_terminal([*KDRAY, "run", str(cache_spec(tmp_path)), "--max-concurrent", "1"], tmp_path)
    text = ANSI.sub("", raw)
    bars = re.findall(r"\[synth/student\] teacher cache .*? (\d+)/(\d+) rows  (\S+) rows/s  .*?ETA", text)
    assert bars and {int(total) for _, total, _ in bars} == {TRAIN_ROWS}, text[-3000:]
    assert re.search(r"\[synth/student\] teacher cache: 922/922 rows done in \d+:\d\d  \S+ rows/s", text), text
    assert "[synth/student] teacher cache: 0/922 rows (0%)" not in text, "no plain start line on a terminal"
    assert colours(raw), "a terminal gets colours"


def test_the_teacher_cache_build_into_a_file_has_a_start_and_an_end_line(tmp_path):
    text = into_file([*KDRAY, "run", str(cache_spec(tmp_path)), "--max-concurrent", "1"], tmp_path)
    assert "\x1b" not in text, "no ANSI codes in a file"
    lines = [line for line in text.splitlines() if line.startswith("[synth/student] teacher cache:")]
    assert lines[0] == "[synth/student] teacher cache: 0/922 rows (0%)", lines
    assert re.fullmatch(r"\[synth/student\] teacher cache: 922/922 rows done in \d+:\d\d  \S+ rows/s  1 chunk\(s\) written", lines[-1]), lines  # fmt: skip
    assert len(lines) <= 3, "a line at the start, at the end, and at most every 10 s"
    assert "rows/s  ETA" not in text, "no live bar in a file"


# --------------------------------------------------------------------------- kdray data import


IMAGES = 3_000


@pytest.fixture
def npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "digits.npz"
    np.savez(path, x=rng.integers(0, 256, (IMAGES, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, IMAGES))
    return path


# The live bar redraws a few times a second: an import must last a few seconds for a bar part-way
# through it to be drawn at all (3,000 images took 0.5 s on CI, all of it before the first redraw).
LIVE_IMAGES = 48_000


@pytest.fixture
def big_npz(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "many.npz"
    x = rng.integers(0, 256, (LIVE_IMAGES, 28, 28), dtype=np.uint8)
    np.savez(path, x=x, y=rng.integers(0, 10, LIVE_IMAGES))
    return path


def import_args(npz: Path, dest: str, shard_rows: int = 500) -> list[str]:
    return [*KDRAY, "data", "import", str(npz), dest, "--shard-rows", str(shard_rows)]


def test_data_import_shows_a_live_bar_in_a_terminal_and_no_colours_with_no_color(tmp_path, npz, big_npz):
    raw = in_terminal(import_args(big_npz, str(tmp_path / "a"), shard_rows=1_600), tmp_path)
    text = ANSI.sub("", raw)
    bars = re.findall(rf"data import .*? (\d+)/{LIVE_IMAGES} images  (\S+) images/s  (\d+) shard\(s\) written  ETA", text)  # fmt: skip
    assert bars, text[-3000:]
    assert any(0 < int(done) < LIVE_IMAGES for done, *_ in bars), "a bar part-way through the import"
    assert any(int(shards) > 0 for *_, shards in bars), "the shards written so far"
    final = r"data import: 48,000/48,000 images done in \d+:\d\d  \S+ images/s  30 shard\(s\) written"
    assert re.search(final, text), text[-2000:]
    assert "train: 38,400 images in 24 shard(s)" in text and "test: 9,600 images in 6 shard(s)" in text
    assert colours(raw), "a terminal gets colours"

    final = r"data import: 3,000/3,000 images done in \d+:\d\d  \S+ images/s  7 shard\(s\) written"
    plain = in_terminal(import_args(npz, str(tmp_path / "b")), tmp_path, {"NO_COLOR": "1"})
    assert "\x1b[" in plain and re.search(final, ANSI.sub("", plain)), "still a live display"
    assert not colours(plain), f"NO_COLOR: no colour codes, found {colours(plain)}"


def test_data_import_into_a_file_has_plain_lines(tmp_path, npz):
    text = into_file(import_args(npz, str(tmp_path / "a")), tmp_path)
    assert "\x1b" not in text, "no ANSI codes in a file"
    lines = [line for line in text.splitlines() if line.startswith("data import:")]
    assert lines[0] == "data import: 0/3,000 images (0%)", lines
    assert re.fullmatch(r"data import: 3,000/3,000 images done in \d+:\d\d  \S+ images/s  7 shard\(s\) written", lines[-1])  # fmt: skip
    for line in lines[1:-1]:  # at most every 10 s while it runs
        assert re.fullmatch(r"data import: [0-9,]+/3,000 images \(\d+%\)  \S+ images/s  ETA \d+:\d\d  .*", line)
    assert "written  ETA" not in text, "no live bar in a file"


def test_no_ansi_codes_from_help_or_usage_errors_into_a_pipe_even_under_ci_settings():
    ci = {**env(), "GITHUB_ACTIONS": "true", "PY_COLORS": "1"}
    helped = subprocess.run([*KDRAY, "data", "import", "--help"], capture_output=True, text=True, env=ci, timeout=300)
    assert helped.returncode == 0 and "--shard-rows" in helped.stdout and "\x1b" not in helped.stdout
    wrong = subprocess.run([*KDRAY, "data", "import"], capture_output=True, text=True, env=ci, timeout=300)
    assert wrong.returncode == 2 and "Missing argument" in wrong.stderr and "\x1b" not in wrong.stderr


# --------------------------------------------------------------------------- plain lines, hub events


def test_plain_task_lines_at_the_start_at_most_every_so_often_and_at_the_end():
    lines: list[str] = []
    task = LogTask(lines.append, "[p/s] teacher cache", 60_000, "rows", every_s=3600)
    for done in range(0, 60_001, 1000):
        task.update(done, "3 chunk(s) written")
    task.close()
    task.close()
    assert lines[0] == "[p/s] teacher cache: 0/60,000 rows (0%)"
    assert re.fullmatch(r"\[p/s\] teacher cache: 60,000/60,000 rows done in 0:\d\d  \S+ rows/s  3 chunk\(s\) written", lines[1])  # fmt: skip
    assert len(lines) == 2, "nothing between the start and the end within every_s"

    often: list[str] = []
    task = log_meter(often.append, every_s=0)("import", 4, "images")
    for done in range(1, 4):
        task.update(done)
    task.close()
    assert [line.split("  ")[0] for line in often] == [
        "import: 0/4 images (0%)",
        "import: 1/4 images (25%)",
        "import: 2/4 images (50%)",
        "import: 3/4 images (75%)",
        "import: 3/4 images stopped in 0:00",
    ], "a task that ends early says so"
    assert task_line("t", 500, 1000, "rows", 10.0) == "t: 500/1,000 rows (50%)  50.0 rows/s  ETA 0:10"
    assert [duration(s) for s in (0, 59.6, 754, 3723)] == ["0:00", "1:00", "12:34", "1:02:03"]


def test_task_events_through_the_hub_reach_the_driver_renderer(monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    hub = ProgressHub()
    hub.push(("task", "[p/s] teacher cache", 0, 100, "rows", 0.0, ""))
    hub.push(("task", "[p/s] teacher cache", 40, 100, "rows", 1.0, "0 chunk(s) written"))
    hub.push(("task", "[p/s] teacher cache", 80, 100, "rows", 2.0, "0 chunk(s) written"))
    hub.push(("task_done", "[p/s] teacher cache", "[p/s] teacher cache: 100/100 rows done in 0:02  50.0 rows/s"))
    events = hub.drain()
    assert [e[2] for e in events[:-1]] == [80], "only the newest count of a task is kept"
    out = io.StringIO()
    replay(Renderer(stream=out, live=False), events)
    assert out.getvalue().splitlines() == [
        "[p/s] teacher cache: 80/100 rows (80%)  40.0 rows/s  ETA 0:00  0 chunk(s) written",
        "[p/s] teacher cache: 100/100 rows done in 0:02  50.0 rows/s",
    ]

    live = io.StringIO()
    renderer = Renderer(stream=live, live=True)
    replay(renderer, events[:-1])
    renderer.close()
    assert re.search(
        r"teacher cache .*80/100 rows  40\.0 rows/s  0 chunk\(s\) written  ETA", ANSI.sub("", live.getvalue())
    )


def test_a_meter_uses_the_display_of_this_process(monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    out = io.StringIO()
    with progress.display(Renderer(stream=out, live=True)):
        task = progress.meter(lambda line: pytest.fail(f"logged {line!r} instead of drawing it"))("cache", 10, "rows")
        task.update(5)
        task.close()
    text = ANSI.sub("", out.getvalue())
    assert re.search(r"cache .*0/10 rows  - rows/s  ETA", text) and "cache: 5/10 rows stopped in 0:00" in text


# --------------------------------------------------------------------------- kdray submit: the job's state


class JobAPI:
    """A Ray Job Submission API stand-in whose job walks through ``states``, one per poll, with a log line each."""

    def __init__(self, states: list[str]):
        self.states, self.polls = states, 0

    def get_job_status(self, job: str):
        from ray.job_submission import JobStatus

        self.polls += 1
        return JobStatus(self.states[min(self.polls, len(self.states)) - 1])

    def get_job_logs(self, job: str) -> str:
        return "".join(f"log line {i}\n" for i in range(1, self.polls + 1))

    def get_job_info(self, job: str):
        return SimpleNamespace(message="the entrypoint exited with 1")


def follow(states: list[str], renderer: Renderer) -> list[str]:
    from kdray.engine.launchers.ray import RayJobLauncher

    lines: list[str] = []
    with progress.display(renderer):
        try:
            RayJobLauncher(poll_s=0)._follow(JobAPI(states), "job-1", lines.append, "[synth] Ray job job-1")
        except KdrayError as e:
            lines.append(f"error: {e}")
    return lines


def test_submit_shows_each_state_change_with_the_time_and_a_spinner_on_a_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    pytest.importorskip("ray.job_submission")
    screen = io.StringIO()
    lines = follow(["PENDING", "PENDING", "RUNNING", "RUNNING", "SUCCEEDED"], Renderer(stream=screen, live=True))
    states = [line for line in lines if line.startswith("[synth] Ray job job-1: ")]
    assert [re.sub(r" after \d+:\d\d$", "", line).rsplit(" ", 1)[1] for line in states] == [
        "PENDING",
        "RUNNING",
        "SUCCEEDED",
    ], lines
    assert all(re.search(r" after \d+:\d\d$", line) for line in states)
    assert lines.index(states[1]) < lines.index("log line 3") < lines.index(states[2]), "the final state comes last"
    assert [line for line in lines if line.startswith("log line")] == [f"log line {i}" for i in range(1, 6)]
    drawn = ANSI.sub("", screen.getvalue())
    for state in ("PENDING", "RUNNING"):
        assert re.search(rf"\[synth\] Ray job job-1 +{state} +\d+:\d\d:\d\d", drawn), drawn
    assert "\x1b[" in screen.getvalue()

    plain = io.StringIO()
    lines = follow(["PENDING", "RUNNING", "FAILED"], Renderer(stream=plain, live=False))
    assert [line.split(": ")[1].split(" ")[0] for line in lines if line.startswith("[synth] Ray job")] == [
        "PENDING",
        "RUNNING",
        "FAILED",
    ]
    assert "ended FAILED: the entrypoint exited with 1" in lines[-1]
    assert plain.getvalue() == "", "no spinner without a terminal: the logged lines say it all"


def test_a_state_watch_logs_each_change_once_and_removes_its_spinner(monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    out = io.StringIO()
    renderer = Renderer(stream=out, live=True)
    lines: list[str] = []
    with StateWatch("[p] RayJob x", lines.append, renderer) as watch:  # the KubeRay launcher's states
        watch.state("Initializing")
        watch.state("Initializing")
        watch.state("Running (job RUNNING)")
    assert [line.rsplit(" after ", 1)[0] for line in lines] == [
        "[p] RayJob x: Initializing",
        "[p] RayJob x: Running (job RUNNING)",
    ]
    assert renderer._tasks == {}, "the spinner line is gone once the wait is over"
    renderer.close()
    assert "Running (job RUNNING)" in ANSI.sub("", out.getvalue())
