"""The fleet manager's picture of its devices, its /metrics, dashboard and Home Assistant
discovery, fed with real telemetry payloads (the test vectors) and a controllable clock."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edgeid.fleet import dashboard, prometheus
from edgeid.fleet.devices import DeviceView, FleetState, Point, parse_topic
from edgeid.fleet.homeassistant import SENSORS, discovery_messages
from edgeid.runtime.telemetry.schema import (
    EventKind,
    EventReport,
    HealthReport,
    check_payload,
    encode,
)

VECTORS = Path(__file__).parent / "data" / "telemetry"
BASE = check_payload("health", (VECTORS / "valid" / "health-full.json").read_bytes())
assert isinstance(BASE, HealthReport)


class Clock:
    def __init__(self, now: float = 1_767_225_600.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def health(seq: int, measured_at: float, *, cpu: float = 10.0, requests: int = 5) -> bytes:
    report = BASE.model_copy(
        update={
            "seq": seq,
            "measured_at": measured_at,
            "cpu": BASE.cpu.model_copy(update={"percent": cpu}),
            "inference": BASE.inference.model_copy(update={"requests": requests, "errors": 1}),
        }
    )
    return encode(report)


def event(seq: int, kind: EventKind) -> bytes:
    return encode(EventReport(seq=seq, at=1.0, kind=kind, software="0.1.0"))


def only(state: FleetState) -> DeviceView:
    (view,) = state.devices()
    return view


def test_topics_are_parsed_strictly() -> None:
    assert parse_topic("edgeid/lab/box-1/health") == ("lab", "box-1", "health")
    for bad in (
        "edgeid/lab/box-1/health/extra",
        "edgeid/lab/box-1/logs",
        "edgeid/Lab/box-1/health",
        "edgeid/lab/Jane Doe/health",
        "other/lab/box-1/health",
        "edgeid/lab/health",
    ):
        assert parse_topic(bad) is None, bad


def test_status_drives_online_stale_and_offline() -> None:
    clock = Clock()
    state = FleetState(stale_after_s=90, clock=clock)
    state.ingest("edgeid/lab/box-1/status", b"online")
    assert only(state).state == "online"  # just connected: one stale period to report
    clock.now += 91
    assert only(state).state == "stale"
    state.ingest("edgeid/lab/box-1/health", health(1, clock.now))
    assert only(state).state == "online"
    clock.now += 60
    assert only(state).state == "online"
    clock.now += 31
    assert only(state).state == "stale"
    state.ingest("edgeid/lab/box-1/status", b"offline")
    assert only(state).state == "offline"
    state.ingest("edgeid/lab/box-1/status", b"online")
    state.ingest("edgeid/lab/box-1/health", health(2, clock.now))
    assert only(state).state == "online"


def test_health_without_status_is_online_until_it_goes_quiet() -> None:
    clock = Clock()
    state = FleetState(stale_after_s=90, clock=clock)
    state.ingest("edgeid/lab/box-1/events", event(0, EventKind.STARTED))
    assert only(state).state == "unknown"
    state.ingest("edgeid/lab/box-1/health", health(1, clock.now))
    assert only(state).state == "online"
    clock.now += 120
    assert only(state).state == "stale"


def test_late_and_repeated_reports_are_placed_and_counted_once() -> None:
    clock = Clock()
    state = FleetState(clock=clock)
    t = clock.now
    state.ingest("edgeid/lab/box-1/health", health(5, t, cpu=50.0))
    # The spool delivers older reports after the newest live one, and one of them twice.
    state.ingest("edgeid/lab/box-1/health", health(3, t - 60, cpu=30.0))
    state.ingest("edgeid/lab/box-1/health", health(4, t - 30, cpu=40.0))
    state.ingest("edgeid/lab/box-1/health", health(4, t - 30, cpu=40.0))
    view = only(state)
    assert view.health is not None and view.health.seq == 5, "latest is the newest measured"
    assert [p.cpu_percent for p in view.history] == [30.0, 40.0, 50.0]
    assert (view.requests_total, view.errors_total) == (15, 3)
    assert state.counters() == {"accepted": 4, "rejected": 0, "duplicates": 1}


def test_history_is_bounded() -> None:
    clock = Clock()
    state = FleetState(history_points=5, clock=clock)
    for seq in range(12):
        state.ingest("edgeid/lab/box-1/health", health(seq, clock.now + seq, cpu=float(seq)))
    assert [p.cpu_percent for p in only(state).history] == [7.0, 8.0, 9.0, 10.0, 11.0]


@pytest.mark.parametrize("path", sorted((VECTORS / "invalid").glob("*.json")), ids=str)
def test_invalid_payloads_are_rejected_and_leave_no_device(path: Path) -> None:
    state = FleetState()
    kind = "health" if path.name.startswith("health-") else "events"
    assert state.ingest(f"edgeid/lab/box-1/{kind}", path.read_bytes()) is False
    assert state.devices() == []
    assert state.counters()["rejected"] == 1


def test_a_bad_status_or_topic_is_rejected() -> None:
    state = FleetState()
    assert state.ingest("edgeid/lab/box-1/status", b"Jane Doe") is False
    assert state.ingest("edgeid/lab/box-1/names", b"{}") is False
    assert state.devices() == []
    assert state.counters()["rejected"] == 2


def test_new_devices_are_announced_once() -> None:
    seen: list[tuple[str, str]] = []
    state = FleetState(on_new_device=lambda site, device: seen.append((site, device)))
    state.ingest("edgeid/lab/box-1/status", b"online")
    state.ingest("edgeid/lab/box-1/health", health(1, 1.0))
    state.ingest("edgeid/north/box-1/status", b"online")
    assert seen == [("lab", "box-1"), ("north", "box-1")]


# -- /metrics ------------------------------------------------------------------------------------

SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
    r'(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*)\})? (?P<value>-?[0-9.]+(e[+-]?[0-9]+)?)$'
)


def parse_exposition(text: str) -> dict[str, float]:
    """Series -> value, checking the text format as Prometheus would read it."""
    assert text.endswith("\n")
    typed: set[str] = set()
    series: dict[str, float] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("# HELP "):
            current = line.split()[2]
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name == current and kind in ("gauge", "counter")
            assert name not in typed, f"{name} declared twice"
            typed.add(name)
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        assert match["name"] == current, f"{line!r} outside its family"
        key = line.rsplit(" ", 1)[0]
        assert key not in series, f"duplicate series {key}"
        series[key] = float(match["value"])
    return series


def test_metrics_are_valid_exposition_text_with_the_device_figures() -> None:
    clock = Clock()
    state = FleetState(stale_after_s=90, clock=clock)
    state.ingest("edgeid/lab/box-1/status", b"online")
    state.ingest("edgeid/lab/box-1/health", health(1, clock.now, cpu=37.5, requests=120))
    state.ingest("edgeid/lab/box-2/status", b"offline")
    state.ingest("edgeid/lab/box-3/health", b"not json")
    series = parse_exposition(prometheus.render(state.devices(), state.counters()))
    one = 'site="lab",device="box-1"'
    assert series[f"edgeid_device_up{{{one}}}"] == 1
    assert series[f'edgeid_device_state{{{one},state="online"}}'] == 1
    assert series[f'edgeid_device_state{{{one},state="stale"}}'] == 0
    assert series['edgeid_device_up{site="lab",device="box-2"}'] == 0
    assert series['edgeid_device_state{site="lab",device="box-2",state="offline"}'] == 1
    assert series[f"edgeid_device_cpu_percent{{{one}}}"] == 37.5
    assert series[f"edgeid_device_inference_requests_total{{{one}}}"] == 120
    assert series[f"edgeid_device_inference_latency_p95_seconds{{{one}}}"] == 0.0885
    assert series[f'edgeid_device_temperature_celsius{{{one},sensor="cpu-therm"}}'] == 48.5
    assert series[f'edgeid_device_gpu_load_percent{{{one},gpu="0"}}'] == 63.0
    assert series[f'edgeid_device_info{{{one},version="0.1.0",backend="tensorrt"}}'] == 1
    assert series[f"edgeid_device_spool_dropped_total{{{one}}}"] == 4
    assert series["edgeid_fleet_messages_rejected_total"] == 1
    assert not any("box-3" in key for key in series)


def test_metrics_of_an_empty_fleet_are_still_valid() -> None:
    series = parse_exposition(
        prometheus.render([], {"accepted": 0, "rejected": 0, "duplicates": 0})
    )
    assert series == {
        "edgeid_fleet_messages_accepted_total": 0,
        "edgeid_fleet_messages_rejected_total": 0,
        "edgeid_fleet_messages_duplicate_total": 0,
    }


# -- the dashboard ---------------------------------------------------------------------------------


def test_dashboard_row_per_device_with_figures_and_a_sparkline() -> None:
    clock = Clock()
    state = FleetState(clock=clock)
    state.ingest("edgeid/lab/box-1/status", b"online")
    for seq, cpu in enumerate((10.0, 80.0, 40.0)):
        state.ingest("edgeid/lab/box-1/health", health(seq, clock.now + seq, cpu=cpu))
    state.ingest("edgeid/lab/box-2/status", b"offline")
    clock.now += 5
    page = dashboard.render(state.devices(), clock.now)
    assert '<tr id="lab/box-1">' in page and '<tr id="lab/box-2">' in page
    assert '<td class="online">online</td>' in page
    assert '<td class="offline">offline</td>' in page
    assert '<td class="num">37.9 %</td>' in page, "memory used, rounded"
    assert '<td class="num">51.0 °C</td>' in page, "the hottest of the three sensors"
    assert "41.2 ms / 88.5 ms" in page
    assert "0.1.0" in page and "dlib_resnet_v1@0475723f0c37" in page
    polyline = re.search(r'<polyline fill="none" stroke="#1f6feb"[^>]* points="([^"]+)"', page)
    assert polyline, "a CPU sparkline for the device with history"
    ys = [float(pair.split(",")[1]) for pair in polyline.group(1).split()]
    assert ys[1] < ys[2] < ys[0], "80 % drawn highest, 10 % lowest"
    assert "<script" not in page and "http://" not in page and "https://" not in page


def test_dashboard_escapes_what_it_shows() -> None:
    view = DeviceView(
        site="<b>lab",
        device='box"1',
        state="unknown",
        last_seen=None,
        health=None,
        history=(Point(1.0, 5.0, None, None),),
        events=(),
        requests_total=0,
        errors_total=0,
    )
    page = dashboard.render([view], 0.0)
    assert "<b>lab" not in page and "&lt;b&gt;lab" in page
    assert 'box"1' not in page


def test_dashboard_of_an_empty_fleet() -> None:
    assert "No device has reported yet." in dashboard.render([], 0.0)


# -- Home Assistant ------------------------------------------------------------------------------


def test_discovery_points_home_assistant_at_the_devices_own_topics() -> None:
    messages = discovery_messages("lab", "box-1", "homeassistant")
    assert len(messages) == len(SENSORS)
    ids = set()
    for topic, payload in messages:
        assert re.fullmatch(r"homeassistant/sensor/edgeid_lab_box-1/[a-z0-9_]+/config", topic)
        config = json.loads(payload)
        assert config["state_topic"] == "edgeid/lab/box-1/health"
        assert config["availability"] == [
            {
                "topic": "edgeid/lab/box-1/status",
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ]
        assert config["value_template"].startswith("{{ value_json.")
        assert config["device"]["identifiers"] == ["edgeid_lab_box-1"]
        ids.add(config["unique_id"])
    assert len(ids) == len(SENSORS)
