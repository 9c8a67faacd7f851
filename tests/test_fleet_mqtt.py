"""`edgeid fleet serve` against a real broker and real device agents: the dashboard, /metrics
and /api/devices follow devices online, stale and offline; Home Assistant discovery is
published; a device's malformed message is rejected."""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mqtt_broker import WAIT_S, Agent, Broker, Pki, Recorder, client_for, device_home
from test_fleet import key as series_key
from test_fleet import parse_exposition, promtool_check

REPO_ROOT = Path(__file__).resolve().parent.parent
STALE_AFTER_S = 3  # three missed one-second reports


class Fleet:
    """`edgeid fleet serve` as a child process, on a port the OS picks. ``token``: sent as a
    bearer token; ``tls_ca``: the CA an HTTPS dashboard's certificate is checked against."""

    def __init__(
        self,
        broker: Broker,
        pki: Pki,
        log: Path,
        *extra: str,
        token: str | None = None,
        tls_ca: Path | None = None,
    ) -> None:
        self.log = log
        self.token = token
        self.context = ssl.create_default_context(cafile=str(tls_ca)) if tls_ca else None
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "edgeid", "fleet", "serve",
                "--broker-port", str(broker.port), "--ca", str(pki.ca.path),
                "--cert", str(pki.fleet.cert), "--key", str(pki.fleet.key),
                "--listen", "127.0.0.1:0", "--stale-after", str(STALE_AFTER_S), *extra,
            ],
            cwd=REPO_ROOT,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        assert self.process.stderr is not None
        first = self.process.stderr.readline()
        match = re.search(r"(https?)://(127\.0\.0\.1|0\.0\.0\.0):(\d+)/", first)
        assert match, f"no dashboard address in {first!r}"
        self.url = f"{match.group(1)}://127.0.0.1:{match.group(3)}"

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[str, str]:
        sent = dict(headers or {})
        if self.token is not None and headers is None:
            sent["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, headers=sent)
        with urllib.request.urlopen(request, timeout=WAIT_S, context=self.context) as response:
            return response.headers["Content-Type"], response.read().decode("utf-8")

    def devices(self) -> dict[str, dict[str, Any]]:
        _, body = self.get("/api/devices")
        return {f"{d['site']}/{d['device']}": d for d in json.loads(body)["devices"]}

    def wait(self, predicate: Callable[[dict[str, dict[str, Any]]], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not predicate(self.devices()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {self.devices()}")
            time.sleep(0.1)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=WAIT_S)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def started() -> Iterator[list[Agent | Fleet]]:
    children: list[Agent | Fleet] = []
    yield children
    for child in children:
        child.close()


def test_the_dashboard_follows_devices_through_online_stale_and_offline(
    tmp_path: Path, broker: Broker, pki: Pki, started: list[Agent | Fleet]
) -> None:
    observer = Recorder(broker, pki.observer, topics=("homeassistant/#",))
    fleet = Fleet(broker, pki, tmp_path / "fleet.log", "--homeassistant")
    started.append(fleet)
    # box-1's keepalive is long, so its broker does not declare it offline while it is stale.
    box1 = Agent(device_home(tmp_path, pki, broker, "box-1", keepalive_s=60))
    box2 = Agent(device_home(tmp_path, pki, broker, "box-2"))
    started += [box1, box2]

    def reporting(devices: dict[str, dict[str, Any]]) -> bool:
        return all(
            key in devices
            and devices[key]["state"] == "online"
            and len(devices[key]["history"]) >= 2
            for key in ("lab/box-1", "lab/box-2")
        )

    fleet.wait(reporting, "both devices online with two reports")
    one = fleet.devices()["lab/box-1"]
    assert one["health"]["software"]["edgeid"] and one["health"]["cpu"]["cores"] == os.cpu_count()
    assert [e["kind"] for e in one["events"]][:1] == ["started"]

    content_type, page = fleet.get("/")
    assert content_type.startswith("text/html")
    for key in ("lab/box-1", "lab/box-2"):
        assert f'<tr id="{key}">' in page
    assert page.count('<td class="online">online</td>') == 2
    assert "<polyline" in page

    content_type, text = fleet.get("/metrics")
    assert content_type.startswith("text/plain; version=0.0.4")
    promtool_check(text)
    series = parse_exposition(text)
    assert series['edgeid_device_up{device="box-1",site="lab"}'] == 1
    assert series['edgeid_device_up{device="box-2",site="lab"}'] == 1
    assert 0 <= series['edgeid_device_cpu_usage_ratio{device="box-1",site="lab"}'] <= 1
    assert series['edgeid_device_disk_free_bytes{device="box-1",site="lab"}'] > 0
    # Real boxes report their latency buckets: each device has its histogram.
    histogram = "edgeid_device_inference_latency_seconds_bucket"
    assert series_key(histogram, site="lab", device="box-1", le="+Inf") in series

    # Home Assistant discovery: retained configs pointing at each device's own topics.
    configs = observer.wait_for(
        lambda ms: {m.topic.split("/")[2] for m in ms} >= {"edgeid_lab_box-1", "edgeid_lab_box-2"},
        "discovery for both devices",
    )
    cpu = next(m for m in configs if m.topic == "homeassistant/sensor/edgeid_lab_box-1/cpu/config")
    assert json.loads(cpu.payload)["state_topic"] == "edgeid/lab/box-1/health"
    observer.close()
    late = Recorder(broker, pki.observer, topics=("homeassistant/sensor/edgeid_lab_box-1/#",))
    kept = late.wait_for(lambda ms: len(ms) >= 1, "retained discovery for a newcomer")
    assert all(m.retain for m in kept), "Home Assistant finds the configs after a restart"
    late.close()

    # A hung box goes stale first (no report for STALE_AFTER_S), a killed one offline.
    box1.process.send_signal(signal.SIGSTOP)
    box2.process.kill()
    fleet.wait(
        lambda d: d["lab/box-1"]["state"] == "stale" and d["lab/box-2"]["state"] == "offline",
        "box-1 stale and box-2 offline",
    )
    series = parse_exposition(fleet.get("/metrics")[1])
    assert series['edgeid_device_state{device="box-2",site="lab",state="offline"}'] == 1
    assert series['edgeid_device_up{device="box-1",site="lab"}'] == 0
    assert fleet.stop() == 0


def test_a_devices_malformed_message_is_rejected_and_counted(
    tmp_path: Path, broker: Broker, pki: Pki, started: list[Agent | Fleet]
) -> None:
    fleet = Fleet(broker, pki, tmp_path / "fleet.log")
    started.append(fleet)
    fleet.wait(lambda d: True, "the fleet manager to answer")
    deadline = time.monotonic() + WAIT_S
    while json.loads(fleet.get("/healthz")[1])["broker_connected"] is not True:
        assert time.monotonic() < deadline, "the fleet manager never reached the broker"
        time.sleep(0.1)
    # box-3 may write under its own topic (the ACL allows it), but not this.
    box3 = client_for(broker, pki.device("lab", "box-3"), client_id="box-3-raw")
    box3.connect("127.0.0.1", broker.port)
    box3.loop_start()
    try:
        box3.publish("edgeid/lab/box-3/health", b'{"name": "Jane Doe"}', qos=1).wait_for_publish(
            WAIT_S
        )
        box3.publish("edgeid/lab/box-3/status", b"online", qos=1).wait_for_publish(WAIT_S)
    finally:
        box3.disconnect()
        box3.loop_stop()
    fleet.wait(lambda d: "lab/box-3" in d, "box-3's valid status")
    box3_view = fleet.devices()["lab/box-3"]
    assert box3_view["health"] is None
    series = parse_exposition(fleet.get("/metrics")[1])
    assert series["edgeid_fleet_messages_rejected_total"] == 1
    assert series["edgeid_fleet_messages_accepted_total"] == 1
    assert "Jane Doe" not in fleet.get("/")[1]
    assert fleet.stop() == 0
    assert fleet.process.stderr is not None
    assert "Jane Doe" not in fleet.process.stderr.read()


def test_fleet_serve_refuses_a_missing_certificate(tmp_path: Path, pki: Pki) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "edgeid", "fleet", "serve",
            "--ca", str(pki.ca.path), "--cert", str(tmp_path / "absent.crt"),
            "--key", str(pki.fleet.key),
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=WAIT_S,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--cert" in result.stderr
