"""The ``kdray`` command line run as a user runs it: under a pseudo-terminal (python's ``pty``), with
the environment of a terminal 120 columns wide that allows colours.
"""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

KDRAY = [sys.executable, "-m", "kdray.cli"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def env() -> dict[str, str]:
    """This environment as a colour terminal of 120x40 would have it."""
    e = dict(os.environ, COLUMNS="120", LINES="40", TERM="xterm-256color")
    e.pop("NO_COLOR", None)
    return e


def in_terminal(args: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> str:
    """Run ``args`` with stdin/stdout/stderr on a pseudo-terminal; its whole output (exit code checked)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env={**env(), **(extra_env or {})}, cwd=cwd)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    raw = b"".join(chunks).decode(errors="replace")
    assert proc.wait(timeout=600) == 0, ANSI.sub("", raw)[-3000:]
    return raw
