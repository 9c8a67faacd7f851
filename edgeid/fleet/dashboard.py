"""The dashboard page: one table row per device and an inline SVG sparkline of its recent CPU
use and p95 latency. Server-rendered, no JavaScript, no external CSS; it reloads itself.

Everything taken from a message is escaped, although the schema already limits it to numbers,
enums and strict identifiers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from html import escape

from edgeid.fleet.devices import DeviceView, Point
from edgeid.runtime.compat import UTC

REFRESH_S = 10
SPARK_W, SPARK_H = 160, 32
GIB = 1024**3

_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5rem;color:#222}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:.35rem .5rem;text-align:left;vertical-align:middle}
th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.online{color:#176f2c;font-weight:600}.stale{color:#a86a00;font-weight:600}
.offline{color:#b3261e;font-weight:600}.unknown{color:#666}
.legend{color:#666;font-size:12px}
"""


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}{unit}"


def _ago(then: float | None, now: float) -> str:
    if then is None:
        return "never"
    seconds = max(0, int(now - then))
    if seconds < 120:
        text = f"{seconds} s ago"
    elif seconds < 7200:
        text = f"{seconds // 60} min ago"
    else:
        text = f"{seconds // 3600} h ago"
    stamp = dt.datetime.fromtimestamp(then, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f'<span title="{stamp}">{text}</span>'


def _polyline(values: Sequence[float | None], top: float, colour: str) -> str:
    points = [(i, v) for i, v in enumerate(values) if v is not None]
    if len(points) < 2 or top <= 0:
        return ""
    step = SPARK_W / max(1, len(values) - 1)
    coords = " ".join(
        f"{i * step:.1f},{SPARK_H - 1 - (min(v, top) / top) * (SPARK_H - 2):.1f}" for i, v in points
    )
    return f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>'


def sparkline(history: Sequence[Point]) -> str:
    """CPU % (0-100, blue) and p95 latency (scaled to its maximum, orange), oldest left."""
    cpu = [p.cpu_percent for p in history]
    latency = [p.latency_p95_ms for p in history]
    top_latency = max((v for v in latency if v is not None), default=0.0)
    lines = _polyline(cpu, 100.0, "#1f6feb") + _polyline(latency, top_latency, "#d9822b")
    label = f"CPU and p95 latency, last {len(history)} reports"
    return (
        f'<svg width="{SPARK_W}" height="{SPARK_H}" viewBox="0 0 {SPARK_W} {SPARK_H}" '
        f'role="img" aria-label="{escape(label)}"><rect width="100%" height="100%" '
        f'fill="#fafafa"/>{lines}</svg>'
    )


def _row(view: DeviceView, now: float) -> str:
    h = view.health
    temps = [t.celsius for t in h.temperatures] if h else []
    cells = [
        f"<td>{escape(view.site)}/{escape(view.device)}</td>",
        f'<td class="{view.state}">{view.state}</td>',
        f'<td class="num">{_fmt(h.cpu.percent if h else None, " %")}</td>',
        f'<td class="num">{_fmt(h.cpu.load1 if h else None, "", 2)}</td>',
        f'<td class="num">{_fmt(h.memory.used_percent if h else None, " %")}</td>',
        f'<td class="num">{_fmt(h.disk.free_bytes / GIB if h else None, " GiB")}</td>',
        f'<td class="num">{_fmt(max(temps) if temps else None, " °C")}</td>',
        f'<td class="num">{_fmt(h.inference.latency_p50_ms if h else None, " ms")} / '
        f"{_fmt(h.inference.latency_p95_ms if h else None, ' ms')}</td>",
        f'<td class="num">{view.requests_total} / {view.errors_total}</td>',
        f"<td>{escape(h.inference.backend or '–') if h else '–'}</td>",
        f"<td>{escape(h.software.edgeid) if h else '–'}"
        f"{_models(h.software.models) if h else ''}</td>",
        f"<td>{_ago(view.last_seen, now)}</td>",
        f"<td>{sparkline(view.history)}</td>",
    ]
    return f'<tr id="{escape(view.key)}">{"".join(cells)}</tr>'


def _models(models: Iterable[str]) -> str:
    names = ", ".join(escape(m) for m in models)
    return f'<br><span class="legend">{names}</span>' if names else ""


def render(devices: Sequence[DeviceView], now: float) -> str:
    counts = {
        state: sum(1 for d in devices if d.state == state)
        for state in ("online", "stale", "offline", "unknown")
    }
    summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n) or "no devices yet"
    rows = "".join(_row(d, now) for d in devices) or (
        '<tr><td colspan="13">No device has reported yet.</td></tr>'
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}">
<title>edgeid fleet</title><style>{_STYLE}</style></head>
<body><h1>edgeid fleet</h1>
<p>{len(devices)} device(s): {summary}. Health only: no names, faces, cases or searches.</p>
<table><thead><tr><th>Device</th><th>Status</th><th>CPU</th><th>Load</th><th>Memory</th>
<th>Disk free</th><th>Max temp.</th><th>Latency p50 / p95</th><th>Requests / errors</th>
<th>Backend</th><th>Version</th><th>Last seen</th><th>Recent</th></tr></thead>
<tbody>{rows}</tbody></table>
<p class="legend">Recent: CPU % (blue, 0-100) and p95 latency (orange, scaled to its peak).
Metrics for Prometheus at <a href="/metrics">/metrics</a>; JSON at
<a href="/api/devices">/api/devices</a>.</p>
</body></html>
"""
