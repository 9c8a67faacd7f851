"""Durations and sizes in words a person reads at a glance ("2 days 3 hours", "1.4 GB"),
for the progress, health and other pages; never raw seconds or bytes."""

from __future__ import annotations

MINUTE = 60
HOUR = 60 * MINUTE
DAY = 24 * HOUR


def _count(value: int, unit: str) -> str:
    return f"{value} {unit}" + ("" if value == 1 else "s")


def duration(seconds: float) -> str:
    """An elapsed time, to its two largest units: "45 seconds", "3 minutes 5 seconds",
    "2 hours 10 minutes", "4 days 1 hour"."""
    whole = max(0, round(seconds))
    if whole < MINUTE:
        return _count(whole, "second")
    parts = (
        (whole // DAY, "day"),
        (whole % DAY // HOUR, "hour"),
        (whole % HOUR // MINUTE, "minute"),
        (whole % MINUTE, "second"),
    )
    first = next(i for i, (value, _) in enumerate(parts) if value)
    shown = [_count(v, u) for v, u in parts[first : first + 2] if v]
    return " ".join(shown)


def time_left(seconds: float) -> str:
    """An estimate, rounded as an estimate deserves: "less than a minute", "about 4 minutes",
    "about 2 hours 10 minutes"."""
    if seconds < MINUTE:
        return "less than a minute"
    rounded = round(seconds / MINUTE) * MINUTE
    return "about " + duration(rounded)


def size(value: float) -> str:
    """Bytes in decimal units, as disks and memory are sold: "512 MB", "1.4 GB"."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            shown = value / scale
            return f"{shown:.1f} {unit}" if shown < 100 else f"{shown:.0f} {unit}"
    return f"{int(value)} bytes"
