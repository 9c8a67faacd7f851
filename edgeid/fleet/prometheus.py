"""``/metrics``: the fleet in Prometheus' text format, through ``prometheus_client``.

Each device's health gauges, request counters and latency histogram come from
``edgeid.runtime.telemetry.exposition`` (the names the box's own ``/metrics`` uses too); the
device's state, events and spool, and the fleet manager's own message counters are added here.
Counters and the histogram add up the reports this fleet manager received since it started, each
counted once (redelivered reports are recognised by their sequence number).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgeid.fleet.devices import DEVICE_STATES, DeviceView, FleetState
from edgeid.runtime.system.metrics import InferenceTotals
from edgeid.runtime.telemetry.exposition import (
    CONTENT_TYPE,
    Families,
    family_header,
    render,
    sample_line,
)

__all__ = ["CONTENT_TYPE", "FleetCollector", "FleetExposition", "render", "render_fleet"]


def _device(families: Families, fleet: _FleetFamilies, view: DeviceView) -> None:
    labels = (view.site, view.device)
    d = list(labels)
    for state in DEVICE_STATES:
        fleet.state.add_metric([*d, state], float(view.state == state))
    fleet.up.add_metric(d, float(view.state == "online"))
    if view.last_seen is not None:
        fleet.last_seen.add_metric(d, view.last_seen)
    for kind, count in view.event_counts:
        fleet.events.add_metric([*d, kind], count)
    families.inference(
        labels,
        InferenceTotals(
            requests=view.requests_total,
            errors=view.errors_total,
            latency_buckets=view.latency_buckets,
            latency_sum_s=view.latency_sum_s,
        ),
    )
    if view.health is not None:
        families.health(labels, view.health)
        fleet.spool_dropped.add_metric(d, view.health.spool.dropped_total)
        fleet.spool_pending.add_metric(d, view.health.spool.pending)


class _FleetFamilies:
    def __init__(self, families: Families) -> None:
        self.state = families.gauge(
            "edgeid_device_state", "1 for the device's current state, 0 for the others", ("state",)
        )
        self.up = families.gauge("edgeid_device_up", "1 when the device is online and reporting")
        self.last_seen = families.gauge(
            "edgeid_device_last_seen_timestamp_seconds",
            "Unix time the fleet manager last got a valid message from the device",
        )
        self.events = families.counter(
            "edgeid_device_events",
            "Events the device reported (started, degraded, update_applied, ...) since the "
            "fleet manager started",
            ("kind",),
        )
        self.spool_dropped = families.counter(
            "edgeid_device_spool_dropped_reports",
            "Reports the device's spool cap dropped while the broker was unreachable",
        )
        self.spool_pending = families.gauge(
            "edgeid_device_spool_pending_reports", "Reports waiting in the device's spool"
        )


def _fleet_totals(state: FleetState, devices: list[DeviceView]) -> Iterator[Metric]:
    """The fleet manager's own message counters and its devices by state."""
    counters = state.counters()
    for key, name, doc in (
        ("accepted", "edgeid_fleet_messages_accepted", "Valid telemetry messages received"),
        (
            "rejected",
            "edgeid_fleet_messages_rejected",
            "Messages refused: unknown topic, or a payload outside the telemetry schema",
        ),
        (
            "duplicates",
            "edgeid_fleet_messages_duplicate",
            "Messages received again (spool redelivery), counted once",
        ),
    ):
        yield CounterMetricFamily(name, doc, value=counters[key])
    by_state = GaugeMetricFamily(
        "edgeid_fleet_devices", "Devices known to the fleet manager, by state", labels=["state"]
    )
    for device_state in DEVICE_STATES:
        by_state.add_metric([device_state], sum(1 for v in devices if v.state == device_state))
    yield by_state


class FleetCollector(Collector):
    """Reads ``FleetState`` at each scrape: the families as ``prometheus_client`` models them
    (``FleetExposition`` writes the same text, faster)."""

    def __init__(self, state: FleetState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        families = Families()
        fleet = _FleetFamilies(families)
        devices = self._state.devices()
        for view in devices:
            _device(families, fleet, view)
        yield from families.collect()
        yield from _fleet_totals(self._state, devices)


DeviceKey = tuple[str, str]


def _token(view: DeviceView) -> Hashable:
    """Changes whenever anything ``_device`` writes for ``view`` does."""
    health = view.health
    return (
        view.state,
        view.last_seen,
        (health.seq, health.measured_at) if health is not None else None,
        view.requests_total,
        view.errors_total,
        view.latency_buckets,
        view.latency_sum_s,
        view.event_counts,
    )


class _Totals(Collector):
    def __init__(self, state: FleetState, devices: list[DeviceView]) -> None:
        self._state, self._devices = state, devices

    def collect(self) -> Iterator[Metric]:
        return _fleet_totals(self._state, self._devices)


class FleetExposition:
    """``/metrics`` text of the fleet, each device's lines kept until its figures change: a
    scrape formats only the devices heard from (or gone stale) since the previous one. The text
    is byte for byte ``render(FleetCollector(state))`` (tested)."""

    def __init__(self, state: FleetState) -> None:
        self._state = state
        self._lock = threading.Lock()
        self._kept: dict[DeviceKey, tuple[Hashable, dict[str, list[str]]]] = {}
        template = Families()
        _FleetFamilies(template)
        self._headers = [(f.name, family_header(f)) for f in template.every_family()]

    def render(self) -> bytes:
        devices = self._state.devices()
        with self._lock:
            self._refresh(devices)
            out: list[str] = []
            for name, header in self._headers:
                lines = [
                    line
                    for view in devices
                    for line in self._kept[(view.site, view.device)][1].get(name, ())
                ]
                if lines:
                    out.append(header)
                    out.extend(lines)
        text = "".join(out).encode("utf-8")
        return text + render(_Totals(self._state, devices))

    def _refresh(self, devices: list[DeviceView]) -> None:
        tokens = {(v.site, v.device): _token(v) for v in devices}
        changed = [
            v
            for v in devices
            if self._kept.get((v.site, v.device), (None,))[0] != tokens[(v.site, v.device)]
        ]
        if not changed:
            return
        families = Families()
        fleet = _FleetFamilies(families)
        for view in changed:
            _device(families, fleet, view)
        fresh: dict[DeviceKey, dict[str, list[str]]] = {(v.site, v.device): {} for v in changed}
        for family in families.collect():
            for sample in family.samples:
                lines = fresh[(sample.labels["site"], sample.labels["device"])]
                lines.setdefault(family.name, []).append(sample_line(sample))
        for key, lines in fresh.items():
            self._kept[key] = (tokens[key], lines)


def render_fleet(state: FleetState) -> bytes:
    return FleetExposition(state).render()
