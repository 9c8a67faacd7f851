"""The dashboard page: one table row per device and an inline SVG sparkline of its recent CPU
use and p95 latency. Server-rendered from ``templates/dashboard.html`` with Jinja2's
autoescape on, no JavaScript, no external CSS; it reloads itself.

Everything taken from a message is escaped by the template, although the schema already limits
it to numbers, enums and strict identifiers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2

from edgeid.fleet.devices import DEVICE_STATES, DeviceView, Point
from edgeid.runtime.compat import UTC

REFRESH_S = 10
SPARK_W, SPARK_H = 160, 32
GIB = 1024**3
TEMPLATES = Path(__file__).resolve().parent / "templates"

_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=True,  # every template, whatever its name
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}{unit}"


@dataclass(frozen=True)
class Ago:
    text: str  # "12 s ago", "never"
    stamp: str  # the UTC time, for the tooltip ("" for never)


def ago(then: float | None, now: float) -> Ago:
    if then is None:
        return Ago("never", "")
    seconds = max(0, int(now - then))
    if seconds < 120:
        text = f"{seconds} s ago"
    elif seconds < 7200:
        text = f"{seconds // 60} min ago"
    else:
        text = f"{seconds // 3600} h ago"
    return Ago(text, dt.datetime.fromtimestamp(then, UTC).strftime("%Y-%m-%d %H:%M:%S UTC"))


def _points(values: Sequence[float | None], top: float) -> str:
    """SVG polyline points of ``values`` scaled to ``top``; "" when there is nothing to draw."""
    points = [(i, v) for i, v in enumerate(values) if v is not None]
    if len(points) < 2 or top <= 0:
        return ""
    step = SPARK_W / max(1, len(values) - 1)
    return " ".join(
        f"{i * step:.1f},{SPARK_H - 1 - (min(v, top) / top) * (SPARK_H - 2):.1f}" for i, v in points
    )


@dataclass(frozen=True)
class Sparkline:
    """CPU % (0-100, blue) and p95 latency (scaled to its maximum, orange), oldest left."""

    cpu: str
    latency: str
    reports: int


def sparkline(history: Sequence[Point]) -> Sparkline:
    latency = [p.latency_p95_ms for p in history]
    top_latency = max((v for v in latency if v is not None), default=0.0)
    return Sparkline(
        cpu=_points([p.cpu_percent for p in history], 100.0),
        latency=_points(latency, top_latency),
        reports=len(history),
    )


@dataclass(frozen=True)
class Row:
    """One device's cells, formatted; the template escapes them."""

    key: str
    state: str
    cpu: str
    load: str
    memory: str
    disk_free: str
    max_temp: str
    latency: str
    requests: str
    backend: str
    version: str
    models: tuple[str, ...]
    last_seen: Ago
    spark: Sparkline


def row(view: DeviceView, now: float) -> Row:
    h = view.health
    temps = [t.celsius for t in h.temperatures] if h else []
    return Row(
        key=view.key,
        state=view.state,
        cpu=_fmt(h.cpu.percent if h else None, " %"),
        load=_fmt(h.cpu.load1 if h else None, "", 2),
        memory=_fmt(h.memory.used_percent if h else None, " %"),
        disk_free=_fmt(h.disk.free_bytes / GIB if h else None, " GiB"),
        max_temp=_fmt(max(temps) if temps else None, " °C"),
        latency=(
            f"{_fmt(h.inference.latency_p50_ms if h else None, ' ms')} / "
            f"{_fmt(h.inference.latency_p95_ms if h else None, ' ms')}"
        ),
        requests=f"{view.requests_total} / {view.errors_total}",
        backend=(h.inference.backend or "–") if h else "–",
        version=h.software.edgeid if h else "–",
        models=tuple(h.software.models) if h else (),
        last_seen=ago(view.last_seen, now),
        spark=sparkline(view.history),
    )


def render(devices: Sequence[DeviceView], now: float) -> str:
    counts = {state: sum(1 for d in devices if d.state == state) for state in DEVICE_STATES}
    summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n) or "no devices yet"
    return _ENVIRONMENT.get_template("dashboard.html").render(
        refresh_s=REFRESH_S,
        device_count=len(devices),
        summary=summary,
        rows=[row(d, now) for d in devices],
        spark_w=SPARK_W,
        spark_h=SPARK_H,
    )
