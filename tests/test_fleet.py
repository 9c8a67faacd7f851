"""The fleet manager's picture of its devices, its /metrics, dashboard and Home Assistant
discovery, fed with real telemetry payloads (the test vectors) and a controllable clock."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeid.fleet import dashboard
from edgeid.fleet.devices import DEVICE_STATES, DeviceView, FleetState, Point, parse_topic
from edgeid.fleet.homeassistant import SENSORS, discovery_messages
from edgeid.fleet.prometheus import FleetCollector, FleetExposition, render_fleet
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.telemetry.exposition import render_reference
from edgeid.runtime.telemetry.schema import (
    EventKind,
    EventReport,
    HealthReport,
    check_payload,
    encode,
)

VECTORS = Path(__file__).parent / "data" / "telemetry"
BOX1 = {"site": "lab", "device": "box-1"}
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

PROMTOOL = shutil.which("promtool")


def parse_exposition(text: str | bytes) -> dict[str, float]:
    """Series (labels in name order) -> value, read by prometheus_client's own parser and, where
    installed (Debian's ``prometheus`` package), checked by ``promtool check metrics``."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    assert text.endswith("\n")
    series: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            assert key not in series, f"duplicate series {key}"
            series[key] = sample.value
    return series


def key(name: str, **labels: str) -> str:
    """A series as ``parse_exposition`` names it."""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}" if inner else name


def promtool_check(text: str | bytes) -> None:
    """``promtool check metrics``: the text format and the naming conventions (units, _total)."""
    assert PROMTOOL, "promtool missing: install Debian's prometheus package (make system-packages)"
    data = text.encode() if isinstance(text, str) else text
    checked = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=data, capture_output=True, timeout=30
    )
    problems = (checked.stdout + checked.stderr).decode()
    assert checked.returncode == 0 and not problems.strip(), problems


def health_with_histogram(seq: int, measured_at: float, buckets: list[int], sum_s: float) -> bytes:
    report = BASE.model_copy(
        update={
            "seq": seq,
            "measured_at": measured_at,
            "inference": BASE.inference.model_copy(
                update={
                    "requests": sum(buckets) + 1,
                    "errors": 1,
                    "latency_buckets": buckets,
                    "latency_sum_s": sum_s,
                }
            ),
        }
    )
    return encode(report)


def test_metrics_are_valid_exposition_text_with_the_device_figures() -> None:
    clock = Clock()
    state = FleetState(stale_after_s=90, clock=clock)
    state.ingest("edgeid/lab/box-1/status", b"online")
    state.ingest("edgeid/lab/box-1/health", health(1, clock.now, cpu=37.5, requests=120))
    state.ingest("edgeid/lab/box-1/events", event(2, EventKind.UPDATE_APPLIED))
    state.ingest("edgeid/lab/box-1/events", event(2, EventKind.UPDATE_APPLIED))  # redelivered
    state.ingest("edgeid/lab/box-2/status", b"offline")
    state.ingest("edgeid/lab/box-3/health", b"not json")
    text = render_fleet(state)
    assert text == render_reference(FleetCollector(state)), "prometheus_client's own writer"
    promtool_check(text)
    series = parse_exposition(text)
    one = 'device="box-1",site="lab"'
    assert series[f"edgeid_device_up{{{one}}}"] == 1
    assert series[f'edgeid_device_state{{{one},state="online"}}'] == 1
    assert series[f'edgeid_device_state{{{one},state="stale"}}'] == 0
    assert series['edgeid_device_up{device="box-2",site="lab"}'] == 0
    assert series['edgeid_device_state{device="box-2",site="lab",state="offline"}'] == 1
    assert series[f"edgeid_device_cpu_usage_ratio{{{one}}}"] == 0.375
    assert series[f"edgeid_device_inference_requests_total{{{one}}}"] == 120
    assert series[key("edgeid_device_temperature_celsius", **BOX1, sensor="cpu-therm")] == 48.5
    assert series['edgeid_device_gpu_load_ratio{device="box-1",gpu="0",site="lab"}'] == 0.63
    assert series[f'edgeid_device_info{{backend="tensorrt",{one},version="0.1.0"}}'] == 1
    assert series[f"edgeid_device_backend_degraded{{{one}}}"] == 0
    assert series[f"edgeid_device_spool_dropped_reports_total{{{one}}}"] == 4
    assert series[key("edgeid_device_events_total", **BOX1, kind="update_applied")] == 1
    assert series["edgeid_fleet_messages_rejected_total"] == 1
    assert series['edgeid_fleet_devices{state="online"}'] == 1
    assert not any("box-3" in key for key in series)
    assert not any("percent" in key or "p95" in key for key in series)
    # A box that sends no histogram (older schema) has none, rather than an empty one.
    assert not any(key.startswith("edgeid_device_inference_latency_seconds") for key in series)


def test_latency_histograms_add_up_the_reports_each_counted_once() -> None:
    clock = Clock()
    state = FleetState(clock=clock)
    first = [0, 0, 1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    second = [0, 0, 0, 1, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    state.ingest("edgeid/lab/box-1/health", health_with_histogram(1, clock.now, first, 30.25))
    state.ingest("edgeid/lab/box-1/health", health_with_histogram(2, clock.now, second, 0.2))
    state.ingest("edgeid/lab/box-1/health", health_with_histogram(2, clock.now, second, 0.2))
    text = render_fleet(state)
    promtool_check(text)
    series = parse_exposition(text)
    bucket = 'edgeid_device_inference_latency_seconds_bucket{device="box-1",le="%s",site="lab"}'
    assert series[bucket % "0.01"] == 0
    assert series[bucket % "0.025"] == 1
    assert series[bucket % "0.05"] == 6
    assert series[bucket % "0.075"] == 9
    assert series[bucket % "10.0"] == 9
    assert series[bucket % "+Inf"] == 11
    one = '{device="box-1",site="lab"}'
    assert series[f"edgeid_device_inference_latency_seconds_count{one}"] == 11
    assert series[f"edgeid_device_inference_latency_seconds_sum{one}"] == pytest.approx(30.45)
    assert series[f"edgeid_device_inference_requests_total{one}"] == 13


def test_the_kept_lines_follow_the_fleet_and_match_the_librarys_writer() -> None:
    """``FleetExposition`` keeps each device's lines between scrapes; whatever changed (a
    message, a device going stale on the clock alone) is written again."""
    clock = Clock()
    state = FleetState(stale_after_s=90, clock=clock)
    exposition = FleetExposition(state)

    def same() -> dict[str, float]:
        text = exposition.render()
        assert text == render_reference(FleetCollector(state))
        return parse_exposition(text)

    same()
    state.ingest("edgeid/lab/box-1/status", b"online")
    state.ingest("edgeid/lab/box-1/health", health_with_histogram(1, clock.now, [1] * 15, 1.5))
    state.ingest("edgeid/lab/box-2/health", health(1, clock.now))
    assert same()[key("edgeid_device_up", **BOX1)] == 1
    clock.now += 91  # no message: both go stale
    series = same()
    assert series[key("edgeid_device_up", **BOX1)] == 0
    assert series[key("edgeid_device_state", **BOX1, state="stale")] == 1
    state.ingest("edgeid/lab/box-2/health", health(2, clock.now, requests=7))
    state.ingest("edgeid/lab/box-3/events", event(1, EventKind.STARTED))
    series = same()
    assert series[key("edgeid_device_up", site="lab", device="box-2")] == 1
    assert series[key("edgeid_device_inference_requests_total", site="lab", device="box-2")] == 12
    assert series[key("edgeid_device_events_total", site="lab", device="box-3", kind="started")]


def test_metrics_of_an_empty_fleet_are_still_valid() -> None:
    text = render_fleet(FleetState())
    promtool_check(text)
    assert parse_exposition(text) == {
        "edgeid_fleet_messages_accepted_total": 0,
        "edgeid_fleet_messages_rejected_total": 0,
        "edgeid_fleet_messages_duplicate_total": 0,
        **{f'edgeid_fleet_devices{{state="{s}"}}': 0 for s in DEVICE_STATES},
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


def test_dashboard_lists_those_needing_attention_first_in_pages_and_by_view() -> None:
    clock = Clock()
    state = FleetState(clock=clock)
    for i in range(dashboard.PAGE_ROWS + 30):
        site = "lab" if i % 2 else "north"
        state.ingest(
            f"edgeid/{site}/box-{i:03d}/status", b"offline" if i in (7, 120) else b"online"
        )
        state.ingest(f"edgeid/{site}/box-{i:03d}/health", health(1, clock.now))
    devices = state.devices()
    page = dashboard.render(devices, clock.now)
    keys = re.findall(r'<tr id="([^"]+)">', page)
    assert keys[:2] == ["lab/box-007", "north/box-120"], "offline devices come first"
    assert len(keys) == dashboard.PAGE_ROWS and "Devices 1-100 of 130" in page
    assert 'href="/?page=2"' in page and "Previous page" not in page

    second = dashboard.render(devices, clock.now, dashboard.View(page=2))
    assert len(re.findall(r'<tr id="', second)) == 30 and 'href="/"' in second
    assert not set(keys) & set(re.findall(r'<tr id="([^"]+)">', second)), "no device twice"

    view = dashboard.View.parse({"state": "offline", "site": "lab"})
    only_lab = dashboard.render(devices, clock.now, view)
    assert re.findall(r'<tr id="([^"]+)">', only_lab) == ["lab/box-007"]
    assert '<option value="lab" selected>' in only_lab
    tiles = {t.label: t.count for t in dashboard.tiles(devices, view)}
    assert tiles == {
        "Devices": 65,
        "Online": 64,
        "Stale": 0,
        "Offline": 1,
        "Unknown": 0,
        "Degraded": 0,
    }


@pytest.mark.parametrize(
    "query", [{"state": "gone"}, {"site": "<b>"}, {"page": "0"}, {"page": "-1"}, {"page": "x"}]
)
def test_dashboard_view_refuses_what_it_cannot_show(query: dict[str, str]) -> None:
    with pytest.raises(BadInputError):
        dashboard.View.parse(query)
