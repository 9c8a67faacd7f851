"""The fleet's picture of its devices, built from the messages on ``edgeid/+/+/#``.

Every payload is validated against the telemetry schema before it is believed; anything else is
counted as rejected and dropped without being logged (it is not ours to echo). Health reports
may arrive late and twice (a device's spool is delivered after an outage, at least once): the
latest state is the report measured last, and counters skip a ``seq`` already seen.

A device is ``online`` while its retained status says so and it reported within
``stale_after_s``, ``stale`` when it says online but has gone quiet, ``offline`` when its status
(or its last will) says so, and ``unknown`` before any status arrived.
"""

from __future__ import annotations

import bisect
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from edgeid.runtime.telemetry.schema import (
    SLUG_PATTERN,
    TOPIC_ROOT,
    EventReport,
    HealthReport,
    Status,
    TelemetryPayloadError,
    check_payload,
    check_status,
)

DeviceState = Literal["online", "stale", "offline", "unknown"]
DEVICE_STATES: tuple[DeviceState, ...] = ("online", "stale", "offline", "unknown")
SUBSCRIPTION = f"{TOPIC_ROOT}/+/+/#"
# Three missed reports at the default 30 s interval.
DEFAULT_STALE_AFTER_S = 90.0
# One point per report: an hour at the default interval, a few KB per device.
DEFAULT_HISTORY_POINTS = 120
RECENT_EVENTS = 20
# Enough to recognise a redelivered spool (at most a few thousand reports) without growing.
SEEN_SEQS = 4096
_SLUG = re.compile(SLUG_PATTERN)


@dataclass(frozen=True)
class Point:
    """One report's figures for the sparklines."""

    measured_at: float
    cpu_percent: float
    latency_p95_ms: float | None
    max_celsius: float | None


@dataclass
class _Device:
    site: str
    device: str
    status: Status | None = None
    last_seen: float | None = None  # fleet clock, any valid message
    health: HealthReport | None = None
    health_seen: float | None = None
    history: list[Point] = field(default_factory=list)
    events: deque[tuple[float, EventReport]] = field(
        default_factory=lambda: deque(maxlen=RECENT_EVENTS)
    )
    requests_total: int = 0
    errors_total: int = 0
    # The latency histogram summed over the reports received (None until a box sends one).
    latency_buckets: list[int] | None = None
    latency_sum_s: float = 0.0
    event_counts: dict[str, int] = field(default_factory=dict)  # by event kind
    seen: set[int] = field(default_factory=set)
    seen_order: deque[int] = field(default_factory=deque)


@dataclass(frozen=True)
class DeviceView:
    """A consistent copy of one device's state, for the dashboard, /metrics and /api."""

    site: str
    device: str
    state: DeviceState
    last_seen: float | None
    health: HealthReport | None
    history: tuple[Point, ...]
    events: tuple[tuple[float, EventReport], ...]
    requests_total: int
    errors_total: int
    latency_buckets: tuple[int, ...] | None = None
    latency_sum_s: float = 0.0
    event_counts: tuple[tuple[str, int], ...] = ()  # (kind, events received), by kind

    @property
    def key(self) -> str:
        return f"{self.site}/{self.device}"


def parse_topic(topic: str) -> tuple[str, str, str] | None:
    """(site, device, kind) of ``edgeid/<site>/<device>/<kind>``, or None."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != TOPIC_ROOT or parts[3] not in ("status", "health", "events"):
        return None
    if not (_SLUG.match(parts[1]) and _SLUG.match(parts[2])):
        return None
    return parts[1], parts[2], parts[3]


class FleetState:
    """Thread-safe: the MQTT thread ingests while HTTP threads read views."""

    def __init__(
        self,
        *,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        history_points: int = DEFAULT_HISTORY_POINTS,
        clock: Callable[[], float] = time.time,
        on_new_device: Callable[[str, str], None] | None = None,
    ) -> None:
        self.stale_after_s = stale_after_s
        self.history_points = history_points
        self._clock = clock
        self._on_new_device = on_new_device
        self._lock = threading.Lock()
        self._devices: dict[tuple[str, str], _Device] = {}
        self.accepted = 0
        self.rejected = 0
        self.duplicates = 0

    def ingest(self, topic: str, payload: bytes) -> bool:
        """Take one message; False (and counted) when it is not a valid telemetry message."""
        parsed = parse_topic(topic)
        if parsed is None:
            return self._reject()
        site, device, kind = parsed
        try:
            if kind == "status":
                message: Status | HealthReport | EventReport = check_status(payload)
            else:
                message = check_payload("health" if kind == "health" else "events", payload)
        except TelemetryPayloadError:
            return self._reject()
        now = self._clock()
        new = False
        with self._lock:
            record = self._devices.get((site, device))
            if record is None:
                record = self._devices[(site, device)] = _Device(site, device)
                new = True
            record.last_seen = now
            self.accepted += 1
            if isinstance(message, HealthReport):
                self._take_health(record, message, now)
            elif isinstance(message, EventReport):
                if self._first_time(record, message.seq):
                    record.events.append((now, message))
                    kind = message.kind.value
                    record.event_counts[kind] = record.event_counts.get(kind, 0) + 1
            else:
                record.status = message
        if new and self._on_new_device is not None:
            self._on_new_device(site, device)
        return True

    def _reject(self) -> bool:
        with self._lock:
            self.rejected += 1
        return False

    def _first_time(self, record: _Device, seq: int) -> bool:
        if seq in record.seen:
            self.duplicates += 1
            return False
        record.seen.add(seq)
        record.seen_order.append(seq)
        if len(record.seen_order) > SEEN_SEQS:
            record.seen.discard(record.seen_order.popleft())
        return True

    def _take_health(self, record: _Device, report: HealthReport, now: float) -> None:
        if not self._first_time(record, report.seq):
            return
        record.requests_total += report.inference.requests
        record.errors_total += report.inference.errors
        buckets = report.inference.latency_buckets
        if buckets is not None:
            held = record.latency_buckets or [0] * len(buckets)
            record.latency_buckets = [a + b for a, b in zip(held, buckets, strict=True)]
            record.latency_sum_s += report.inference.latency_sum_s or 0.0
        if record.health is None or report.measured_at >= record.health.measured_at:
            record.health = report
            record.health_seen = now
        temps = [t.celsius for t in report.temperatures]
        point = Point(
            measured_at=report.measured_at,
            cpu_percent=report.cpu.percent,
            latency_p95_ms=report.inference.latency_p95_ms,
            max_celsius=max(temps) if temps else None,
        )
        # Late (spooled) reports land in time order, not arrival order.
        bisect.insort(record.history, point, key=lambda p: p.measured_at)
        del record.history[: max(0, len(record.history) - self.history_points)]

    def _state_of(self, record: _Device, now: float) -> DeviceState:
        if record.status == "offline":
            return "offline"
        fresh = record.health_seen is not None and now - record.health_seen <= self.stale_after_s
        if record.status == "online":
            # Just connected and not yet reported counts as online for one stale period.
            recent = record.last_seen is not None and now - record.last_seen <= self.stale_after_s
            return "online" if fresh or (record.health is None and recent) else "stale"
        if record.health is not None:
            return "online" if fresh else "stale"
        return "unknown"

    def devices(self) -> list[DeviceView]:
        now = self._clock()
        with self._lock:
            return [
                DeviceView(
                    site=r.site,
                    device=r.device,
                    state=self._state_of(r, now),
                    last_seen=r.last_seen,
                    health=r.health,
                    history=tuple(r.history),
                    events=tuple(r.events),
                    requests_total=r.requests_total,
                    errors_total=r.errors_total,
                    latency_buckets=(
                        tuple(r.latency_buckets) if r.latency_buckets is not None else None
                    ),
                    latency_sum_s=r.latency_sum_s,
                    event_counts=tuple(sorted(r.event_counts.items())),
                )
                for _, r in sorted(self._devices.items())
            ]

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {
                "accepted": self.accepted,
                "rejected": self.rejected,
                "duplicates": self.duplicates,
            }
