"""``/metrics``: the fleet in Prometheus' text format, through ``prometheus_client``.

Each device's health gauges, request counters and latency histogram come from
``edgeid.runtime.telemetry.exposition`` (the names the box's own ``/metrics`` uses too); the
device's state, events and spool, and the fleet manager's own message counters are added here.
Counters and the histogram add up the reports this fleet manager received since it started, each
counted once (redelivered reports are recognised by their sequence number).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgeid.fleet.devices import DEVICE_STATES, DeviceView, FleetState
from edgeid.runtime.telemetry.exposition import (
    CONTENT_TYPE,
    Families,
    InferenceTotals,
    render,
)

__all__ = ["CONTENT_TYPE", "FleetCollector", "render", "render_fleet"]


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


class FleetCollector(Collector):
    """Reads ``FleetState`` at each scrape."""

    def __init__(self, state: FleetState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        families = Families()
        fleet = _FleetFamilies(families)
        devices = self._state.devices()
        for view in devices:
            _device(families, fleet, view)
        yield from families.collect()
        counters = self._state.counters()
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
        for state in DEVICE_STATES:
            by_state.add_metric([state], sum(1 for v in devices if v.state == state))
        yield by_state


def render_fleet(state: FleetState) -> bytes:
    return render(FleetCollector(state))
