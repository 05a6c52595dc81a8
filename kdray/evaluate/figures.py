"""How the evaluate report writes its figures, the same in report.md, report.html and the terminal.

Ratios read the way round a person says them (``95x larger``, not ``0.01x``), latency shows its
spread, and every column of the summary has a line saying what it measures (``LEGEND``).
"""

from __future__ import annotations

from typing import Any

LEGEND = {
    "top-1": "share of the test split classified right",
    "top-5": "share of the test split whose label is among the 5 highest scores (only with more than 5 classes)",
    "params": "number of parameters",
    "size": "parameters of the student against its teacher's",
    "latency": "median forward time of one batch on this machine after a warm-up; the 25th to 75th percentile in brackets",
    "speed": "teacher's latency against the student's; '~' when their ranges overlap",
    "agreement": "share of test examples where the student predicts the same class as its teacher",
    "gain": "top-1 minus that of the same model trained from labels alone (the baseline named below)",
}


def ms(v: float) -> str:
    """Milliseconds with the digits that mean something: ``0.112``, ``1.42``, ``11.2``, ``112``."""
    if v < 1:
        return f"{v:.3f}"
    if v < 10:
        return f"{v:.2f}"
    if v < 100:
        return f"{v:.1f}"
    return f"{v:,.0f}"


def spread(row: dict[str, Any], prefix: str = "") -> str:
    """``0.112 ms (0.104-0.131)``: the median and the interquartile range, in milliseconds."""
    median = row.get(f"{prefix}latency_ms")
    if median is None:
        return ""
    low, high = row.get(f"{prefix}latency_p25_ms"), row.get(f"{prefix}latency_p75_ms")
    return f"{ms(median)} ms" + (f" ({ms(low)}-{ms(high)})" if low is not None and high is not None else "")


def ratio(r: float, small: str = "smaller", large: str = "larger") -> str:
    """A size ratio teacher/student in words: ``3.2x smaller``, ``95x larger``, ``same``."""
    if r <= 0 or r != r:
        return "?"
    if 0.995 <= r <= 1.005:
        return "same"
    factor, word = (r, small) if r > 1 else (1 / r, large)
    return f"{factor:.1f}x {word}" if factor < 10 else f"{factor:,.0f}x {word}"


def speed(row: dict[str, Any]) -> str:
    """The student's speed against its teacher: ``4.2x faster``, ``2.0x slower``, ``~`` within the spread."""
    if "speedup" not in row:
        return ""
    if not row.get("speedup_distinct", True):
        return "~ (within the spread)"
    return ratio(row["speedup"], "faster", "slower")
