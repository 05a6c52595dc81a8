"""Progress of long work that is not a training loop (a teacher cache, a data import), counted by the
work and shown where its caller decides.

    task = meter("teacher cache", 60_000, "rows")   # a Meter: (title, total, unit) -> Task
    task.update(16_384, "1 chunk written")          # as often as convenient (every batch)
    task.close()                                    # the final line

``log_meter(log)`` writes plain lines through ``log``: one when the work starts, at most one every
``every_s`` seconds while it runs, and one at the end (for logs: CI, Prefect, Kubernetes). The engine
hands out meters that draw a live display on a terminal, or send the counts through Ray to the
terminal of the process that runs ``kdray`` (``kdray.engine.progress.meter``). Every number has
one format (``number``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol

Log = Callable[[str], None]


def number(v: Any) -> str:
    """The one number format of kdray's logs: ``12,345`` for counts and large values, ``0.8125`` for
    fractions and losses, ``993`` rather than ``993.1`` beside ``25,250`` (no exponent notation)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if v != v or v in (float("inf"), float("-inf")):
        return str(v)
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.4f}"


def duration(seconds: float) -> str:
    """``0:07``, ``12:05``, ``1:02:03``: minutes and seconds, hours when needed."""
    s = max(int(round(seconds)), 0)
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``1 stage``, ``3 stages``, ``0 classes`` (``plural`` when adding an s is not it)."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def article(word: str) -> str:
    """``a`` or ``an`` before ``word``: ``an evaluate stage``, ``a train stage``."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def short_time(s: float) -> str:
    """A short time as people write it: ``0.4 ms``, ``340 ms``, ``3.2 s``, ``42 s``, then ``2:05``."""
    if s < 0.001:
        return f"{s * 1000:.2f} ms"
    if s < 0.01:
        return f"{s * 1000:.1f} ms"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    return duration(s)


def task_line(title: str, done: int, total: int, unit: str, seconds: float, note: str = "", final: bool = False) -> str:
    """``teacher cache: 16,384/60,000 rows (27%)  1,234 rows/s  ETA 0:35  1 chunk written``; the final
    line: ``teacher cache: 60,000/60,000 rows done in 0:49  1,224 rows/s``."""
    rate = done / seconds if seconds > 0 else 0.0
    head = f"{title}: {number(done)}/{number(total)} {unit}"
    if final:
        parts = [f"{head} {'done' if done >= total else 'stopped'} in {duration(seconds)}", f"{number(rate)} {unit}/s"]
    else:
        parts = [head + (f" ({done / total:.0%})" if total else "")]
        if done and seconds > 0:
            parts += [f"{number(rate)} {unit}/s", f"ETA {duration(max(total - done, 0) / rate)}"]
    return "  ".join([*parts, *([note] if note else [])])


class Task(Protocol):
    def update(self, done: int, note: str = "") -> None:
        """``done`` of the task's total are done (``note``: e.g. shards written so far)."""

    def close(self) -> None:
        """The work ended (finished or not): the final line, and a live display let go."""


Meter = Callable[[str, int, str], Task]  # (title, total, unit) -> Task


class LogTask:
    """Plain lines through ``log``: at the start, at most every ``every_s`` seconds, and at the end."""

    def __init__(self, log: Log, title: str, total: int, unit: str, every_s: float = 10.0):
        self.log, self.title, self.total, self.unit, self.every_s = log, title, total, unit, every_s
        self.done, self.note, self.closed = 0, "", False
        self.t0 = self.last = time.monotonic()
        log(task_line(title, 0, total, unit, 0.0))

    def update(self, done: int, note: str = "") -> None:
        self.done, self.note = done, note or self.note
        now = time.monotonic()
        if now - self.last >= self.every_s and not self.closed:
            self.last = now
            self.log(task_line(self.title, done, self.total, self.unit, now - self.t0, self.note))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            seconds = time.monotonic() - self.t0
            self.log(task_line(self.title, self.done, self.total, self.unit, seconds, self.note, final=True))


def log_meter(log: Log, every_s: float = 10.0) -> Meter:
    """A meter writing plain lines through ``log`` (see ``LogTask``)."""

    def make(title: str, total: int, unit: str) -> Task:
        return LogTask(log, title, total, unit, every_s)

    return make
