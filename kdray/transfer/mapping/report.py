"""The transfer plan and report: what happens to every target tensor, as JSON and as a log table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from kdray.transfer.mapping.keys import shape_str
from kdray.transfer.mapping.specs import TransferSpec

Status = Literal["copied", "adapted", "reinitialised", "kept"]


@dataclass
class Entry:
    """What happens to one target tensor. ``how`` says how it was adapted, ``reason`` why it was not transferred."""

    key: str
    shape: tuple[int, ...]
    status: Status
    source: str | None = None
    source_shape: tuple[int, ...] | None = None
    op: str | None = None
    how: str | None = None
    reason: str | None = None
    rule: str | None = None
    frozen: bool = False
    lr_scale: float | None = None
    reset: bool = False  # re-run the owning module's reset_parameters() (a reinit rule asked for it)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["source_shape"] = list(self.source_shape) if self.source_shape is not None else None
        return d


@dataclass
class TransferReport:
    """Every target tensor exactly once (state-dict order), plus the source tensors left unused."""

    entries: list[Entry]
    unused_source: list[tuple[str, tuple[int, ...]]]
    source_arch: str | None = None
    target_arch: str | None = None
    batchnorm: str = "train"
    notes: list[str] = field(default_factory=list)
    spec: TransferSpec | None = None  # the block the plan was made from (L2-SP reads it)

    def copy(self) -> "TransferReport":
        return TransferReport(
            [Entry(**asdict(e)) for e in self.entries],
            list(self.unused_source),
            self.source_arch,
            self.target_arch,
            self.batchnorm,
            list(self.notes),
            self.spec,
        )

    def summary(self) -> dict[str, int]:
        counts = {s: sum(e.status == s for e in self.entries) for s in ("copied", "adapted", "reinitialised", "kept")}
        counts["frozen"] = sum(e.frozen for e in self.entries)
        counts["lr_scaled"] = sum(e.lr_scale is not None for e in self.entries)
        counts["unused_source"] = len(self.unused_source)
        return counts

    def by_key(self) -> dict[str, Entry]:
        return {e.key: e for e in self.entries}

    def to_json(self) -> dict[str, Any]:
        return {
            "source_arch": self.source_arch,
            "target_arch": self.target_arch,
            "batchnorm": self.batchnorm,
            "summary": self.summary(),
            "tensors": [e.to_json() for e in self.entries],
            "unused_source": [{"key": k, "shape": list(s)} for k, s in self.unused_source],
            "notes": list(self.notes),
        }

    def to_table(self) -> str:
        """A fixed-width table for the log: one line per target tensor, then unused source tensors."""
        rows = [("target tensor", "shape", "status", "from / how / why", "training")]
        for e in self.entries:
            if e.status == "copied":
                detail = f"<- {e.source}"
            elif e.status == "adapted":
                detail = f"<- {e.source}: {e.how}"
            else:
                detail = e.reason or ""
            train = "frozen" if e.frozen else (f"lr x{e.lr_scale:g}" if e.lr_scale is not None else "")
            rows.append((e.key, shape_str(e.shape), e.status, detail, train))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
        lines = [ln.rstrip() for ln in lines]
        lines.insert(1, "-" * max(len(ln) for ln in lines))
        arch = f"{self.source_arch or '?'} -> {self.target_arch or '?'}"
        s = self.summary()
        lines.insert(
            0,
            f"transfer {arch}: {s['copied']} copied, {s['adapted']} adapted, "
            f"{s['reinitialised']} reinitialised, {s['kept']} kept; {s['frozen']} frozen, "
            f"{s['lr_scaled']} lr-scaled; batchnorm {self.batchnorm}",
        )
        if self.unused_source:
            lines.append(
                f"unused source tensors ({len(self.unused_source)}): "
                + ", ".join(f"{k} {shape_str(sh)}" for k, sh in self.unused_source)
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)
