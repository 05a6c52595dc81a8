"""Progress of a training loop: a one-line bar on an interactive terminal, one line per epoch otherwise."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """A one-line progress bar on an interactive terminal; one line per epoch otherwise."""

    def __init__(self, enabled: bool, title: str):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.title = title

    def update(self, epoch: int, epochs: int, done: int, total: int, loss: float, rate: float) -> None:
        if self.tty:
            frac = done / max(total, 1)
            bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
            sys.stderr.write(
                f"\r{self.title} epoch {epoch + 1}/{epochs} [{bar}] {frac:4.0%} loss {loss:.4f} {rate:,.0f} samples/s "
            )
            sys.stderr.flush()

    def epoch_done(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r" + " " * 100 + "\r")
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in metrics.items()
            if k in ("epoch", "train_loss", "train_acc", "test_acc", "samples_per_s")
        )
        print(f"[{self.title}] {shown}", file=sys.stderr, flush=True)
