"""The dashboard page: tiles counting the fleet by state, then one table row per device with
an inline SVG sparkline of its recent CPU use and p95 latency. Devices that need an admin
(offline, stale, degraded backend) come first; a view can be narrowed to one state or site
and is paged, so a fleet of thousands is a short page. Server-rendered from
``templates/dashboard.html`` with Jinja2's autoescape on, no JavaScript, no external CSS; it
reloads itself.

Everything taken from a message is escaped by the template, although the schema already limits
it to numbers, enums and strict identifiers.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlencode

import jinja2

from edgeid.fleet.devices import DEVICE_STATES, DeviceView, Point
from edgeid.runtime.compat import UTC
from edgeid.runtime.errors import BadInputError

REFRESH_S = 10
PAGE_ROWS = 100
DEGRADED = "degraded"  # a view of the devices whose backend fell back to the CPU
# Offline first, then stale, then what has not said anything, then the healthy.
ATTENTION = {"offline": 0, "stale": 1, "unknown": 3, "online": 4}
_SITE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
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


@dataclass(frozen=True)
class View:
    """Which devices the page lists: a state (or "degraded"), a site, a page of them."""

    state: str | None = None
    site: str | None = None
    page: int = 1

    @classmethod
    def parse(cls, query: dict[str, str]) -> View:
        state, site, page = query.get("state") or None, query.get("site") or None, query.get("page")
        if state is not None and state not in (*DEVICE_STATES, DEGRADED):
            raise BadInputError(f"state must be one of {', '.join((*DEVICE_STATES, DEGRADED))}")
        if site is not None and not _SITE.fullmatch(site):
            raise BadInputError("site must be a site id such as lab-a")
        if page is not None and not (page.isdigit() and 0 < int(page) < 10**6):
            raise BadInputError("page must be a whole number from 1")
        return cls(state, site, int(page) if page else 1)

    def href(self, **changes: object) -> str:
        view = replace(self, **changes)  # type: ignore[arg-type]
        query = {k: v for k, v in (("state", view.state), ("site", view.site)) if v}
        if view.page > 1:
            query["page"] = str(view.page)
        return "/" + (f"?{urlencode(query)}" if query else "")

    def admits(self, device: DeviceView) -> bool:
        if self.site is not None and device.site != self.site:
            return False
        if self.state == DEGRADED:
            return _degraded(device)
        return self.state is None or device.state == self.state


@dataclass(frozen=True)
class Tile:
    label: str
    count: int
    href: str
    tone: str  # the CSS class: online, stale, offline, unknown or plain
    current: bool


def _degraded(device: DeviceView) -> bool:
    return device.health is not None and device.health.inference.backend == DEGRADED


def _attention(device: DeviceView) -> tuple[int, str]:
    rank = ATTENTION.get(device.state, 3)
    if rank == ATTENTION["online"] and _degraded(device):
        rank = 2
    return rank, device.key


def tiles(devices: Sequence[DeviceView], view: View) -> list[Tile]:
    """The fleet (or the chosen site) counted by state; each tile opens that state's view."""
    here = [d for d in devices if View(site=view.site).admits(d)]
    found = [Tile("Devices", len(here), view.href(state=None, page=1), "plain", view.state is None)]
    for state in (*DEVICE_STATES, DEGRADED):
        count = sum(1 for d in here if View(state=state).admits(d))
        tone = "offline" if state == DEGRADED else state
        found.append(
            Tile(
                state.capitalize(), count, view.href(state=state, page=1), tone, view.state == state
            )
        )
    return found


def render(devices: Sequence[DeviceView], now: float, view: View = View()) -> str:
    counts = {state: sum(1 for d in devices if d.state == state) for state in DEVICE_STATES}
    summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n) or "no devices yet"
    chosen = sorted((d for d in devices if view.admits(d)), key=_attention)
    pages = max(1, math.ceil(len(chosen) / PAGE_ROWS))
    page = min(view.page, pages)
    first = (page - 1) * PAGE_ROWS
    shown = chosen[first : first + PAGE_ROWS]
    return _ENVIRONMENT.get_template("dashboard.html").render(
        refresh_s=REFRESH_S,
        device_count=len(devices),
        summary=summary,
        tiles=tiles(devices, view),
        sites=sorted({d.site for d in devices}),
        view=view,
        listed=len(chosen),
        first=first + 1,
        last=first + len(shown),
        previous=view.href(page=page - 1) if page > 1 else None,
        next=view.href(page=page + 1) if page < pages else None,
        rows=[row(d, now) for d in shown],
        spark_w=SPARK_W,
        spark_h=SPARK_H,
    )
