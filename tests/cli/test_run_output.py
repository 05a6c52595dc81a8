"""What a user sees from `kdray run`: a live in-epoch display on a terminal, plain lines in a file.

Both run the real command line in a subprocess (``workers: 0``: the loop runs in the CLI's process),
one under a pseudo-terminal (python's ``pty``), one with its output going to a file.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml
from helpers import synthetic_pipeline
from helpers.terminal import ANSI, KDRAY, env, in_terminal

from kdray.engine.progress import epoch_line, number

EPOCHS = 2


def spec_file(tmp_path: Path) -> Path:
    doc = synthetic_pipeline(
        tmp_path, epochs=EPOCHS, extra_stages=[{"name": "eval", "kind": "evaluate", "models": ["teacher"]}]
    )
    doc["stages"][0]["data"]["options"]["num_samples"] = 1024
    doc["stages"][0]["optim"]["batch_size"] = 8  # ~100 steps an epoch: several progress updates
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_run_in_a_terminal_shows_progress_inside_epochs(tmp_path):
    raw = in_terminal([*KDRAY, "run", str(spec_file(tmp_path)), "--max-concurrent", "1"], tmp_path)
    text = ANSI.sub("", raw)
    assert "\x1b[" in raw, "a terminal gets a live display"
    bars = re.findall(r"synth/teacher epoch (\d)/2 .*? (\d+)/(\d+) steps  loss (\S+)  (\S+) samples/s  ETA", text)
    assert bars, text[-3000:]
    assert any(0 < int(done) < int(total) for _, done, total, _, _ in bars), "a bar part-way through an epoch"
    assert {epoch for epoch, *_ in bars} == {"1", "2"}
    for e in range(1, EPOCHS + 1):
        assert f"[synth/teacher] epoch {e}/{EPOCHS}  train_loss" in text, "one line per finished epoch, too"
    assert "top-1" in text and "report.html" in text and "report.md" in text, "the summary and the report paths"


def test_a_run_into_a_file_has_plain_lines_one_per_epoch(tmp_path):
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        done = subprocess.run(
            [*KDRAY, "run", str(spec_file(tmp_path)), "--max-concurrent", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env(),
            cwd=tmp_path,
            timeout=600,
        )
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\x1b" not in text, "no ANSI codes in a file"
    epochs = [line for line in text.splitlines() if line.startswith("[synth/teacher] epoch")]
    assert len(epochs) == EPOCHS, text
    assert all(
        re.fullmatch(r"\[synth/teacher\] epoch \d/2( +\S+ [0-9.,]+)+ +[0-9.]+ (ms|s)", line) for line in epochs
    ), epochs
    assert "None" not in text and not re.search(r"\de[+-]\d", text), "no None, no exponent notation"
    assert "steps  loss" not in text, "no progress bar in a file"
    assert re.search(r"report\.html +file://\S+/report\.html", text), text[-2000:]


def test_one_number_format_and_no_none():
    assert [number(v) for v in (25250.4, 993.1, 12.345, 0.81254, 3, float("nan"))] == [
        "25,250",
        "993",
        "12.3",
        "0.8125",
        "3",
        "nan",
    ]
    line = epoch_line("p/adapt", {"epoch": 1, "train_loss": 0.5, "train_acc": None, "val_acc": 0.75}, 3)
    assert line == "[p/adapt] epoch 1/3  train_loss 0.5000  val_acc 0.7500"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*KDRAY, *args], capture_output=True, text=True, env=env(), timeout=300)


def test_cli_habits_version_help_and_aligned_listing():
    version = cli("--version")
    assert version.returncode == 0 and re.fullmatch(r"kdray \d+\.\d+\.\d+\S*\n", version.stdout)
    helped = cli("run", "--help")
    assert helped.returncode == 0 and "--force" in helped.stdout and "--max-concurrent" in helped.stdout
    assert not re.search(r"<(bool|str|int|list\[str\])", helped.stdout), helped.stdout
    listed = cli("ls", "losses").stdout.splitlines()
    starts = {re.match(r"\S*\s+", line).end() for line in listed}
    assert len(listed) > 3 and len(starts) == 1, "the descriptions line up, wrapped lines under them"
    assert all(len(line) <= 120 for line in listed), "within $COLUMNS"
    for flags in (("-h",), ("plan", "-h"), ("data", "import", "-h")):
        shown = cli(*flags)
        assert shown.returncode == 0 and "Usage:" in shown.stdout, shown.stderr
        assert not re.search(r"\{[A-Za-z]+\}", shown.stdout), "click's metavars (SPEC), not {spec}"


def test_a_misspelt_field_gets_a_did_you_mean(tmp_path):
    doc = {
        "name": "typo",
        "stages": [
            {"name": "src", "kind": "train", "model": {"name": "cnn_small"}, "data": {"name": "synthetic"}},
            {
                "name": "ad",
                "kind": "adapt",
                "source": "src",
                "method": {"name": "dann"},
                "model": {"name": "cnn_small"},
                "source_domain": {"name": "synthetic"},
                "target_domain": {"name": "synthetic", "shift": []},
            },
        ],
    }
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = cli("validate", str(path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "stages[1] (ad).target_domain.shift: unknown field; did you mean 'shifts'?" in out.stderr, out.stderr


def test_help_and_completion_import_nothing_heavy():
    """`kdray --help` and shell completion answer at once: torch, Ray and pydantic are not imported."""
    probe = (
        "import sys\n"
        "from kdray.cli import main\n"
        "sys.argv = ['kdray', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'ray', 'pydantic', 'numpy') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env(), timeout=120)
    assert "HEAVY []" in done.stdout, done.stdout[-500:] + done.stderr
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "kdray")],  # the installed command: completion goes by its name
        capture_output=True,
        text=True,
        timeout=120,
        env={**env(), "_KDRAY_COMPLETE": "complete_bash", "COMP_WORDS": "kdray ls mo", "COMP_CWORD": "2"},
    )
    assert completed.stdout.split() == ["models"], completed.stdout + completed.stderr


def test_registry_descriptions_are_plain_sentences():
    """`kdray ls` reads to a user: no reStructuredText (``x``, :func:`y`), no internal words, whole sentences."""
    from typer.testing import CliRunner

    from kdray.cli import REGISTRIES, app

    for what in REGISTRIES:
        listed = CliRunner().invoke(app, ["ls", what, "--json"])
        assert listed.exit_code == 0, listed.output
        for entry in json.loads(listed.stdout):
            text = entry["description"]
            assert text and "``" not in text and not re.search(r":[a-z]+:`", text), (what, entry)
            assert "kdray seed" not in text and not re.search(r"\bkdray\.\w", text), (what, entry)
            assert text.endswith((".", ")")), (what, entry)
    fresh = json.loads(cli("ls", "datasets", "--json").stdout)  # a new process: only what `ls` imports
    assert {"parquet", "image_folder", "fashion_mnist"} <= {e["name"] for e in fresh}
