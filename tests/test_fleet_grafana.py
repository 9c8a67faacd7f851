"""firmware/grafana/edgeid-fleet.json: every query of the dashboard names metrics (and labels)
that a running fleet manager, fed real reports over the real broker, exposes on /metrics, and
every query is PromQL that ``promtool`` parses."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mqtt_broker import WAIT_S, Agent, Broker, Pki, client_for, device_home
from prometheus_client.parser import text_string_to_metric_families
from test_fleet import PROMTOOL, VECTORS
from test_fleet_mqtt import REPO_ROOT, Fleet

from edgeid.runtime.telemetry.schema import EventKind, EventReport, encode

DASHBOARD = REPO_ROOT / "firmware" / "grafana" / "edgeid-fleet.json"
METRIC = re.compile(r"\bedgeid_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b(edgeid_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
# Grafana's variables, as Prometheus would see them once Grafana has filled them in.
VARIABLES = {
    "$__rate_interval": "2m",
    "$__range": "6h",
    "$__interval": "30s",
    "$site": ".*",
    "$device": ".*",
}


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and annotation, and the variables' selectors."""
    found = [
        (f"panel {p['title']!r}", t["expr"])
        for p in panels(dashboard)
        for t in p.get("targets", [])
    ]
    found += [(f"annotation {a['name']!r}", a["expr"]) for a in dashboard["annotations"]["list"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.+),\s*[a-z_]+\)", variable["query"]["query"])
            assert inner, f"variable {variable['name']}: expected label_values(selector, label)"
            found.append((f"variable {variable['name']!r}", inner.group(1)))
    return found


def promql(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def test_the_dashboard_is_well_formed_and_covers_what_the_admins_watch() -> None:
    dashboard = load()
    assert dashboard["uid"] == "edgeid-fleet" and dashboard["title"] == "edgeid fleet"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    by_type: dict[str, list[str]] = {}
    for panel in panels(dashboard):
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert METRIC.search(target["expr"]), f"{panel['title']!r}: no edgeid metric"
        by_type.setdefault(panel["type"], []).extend(t["expr"] for t in panel["targets"])
    everything = " ".join(expr for _, expr in queries(dashboard))
    assert any("edgeid_device_up" in e for e in by_type["state-timeline"]), "status map"
    assert any(
        "edgeid_device_inference_latency_seconds_bucket" in e and "by (le)" in e
        for e in by_type["heatmap"]
    ), "latency heatmap from the histogram's buckets"
    for shown in (
        "edgeid_device_cpu_usage_ratio",
        "edgeid_device_memory_available_bytes",
        "edgeid_device_disk_free_bytes",
        "edgeid_device_temperature_celsius",
        "edgeid_device_backend_degraded",
        'edgeid_device_events_total{site=~"$site",device=~"$device",kind=~"update_applied|update_rolled_back"}',
    ):
        assert shown in everything, shown


@pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (Debian package prometheus)")
def test_every_query_is_promql_that_promtool_parses(tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "edgeid-fleet-dashboard",
                "rules": [
                    {"record": f"edgeid:dashboard_query_{i}", "expr": promql(expr)}
                    for i, (_, expr) in enumerate(queries(load()))
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_metric_and_label_queried_is_on_a_running_fleets_metrics(
    tmp_path: Path, broker: Broker, pki: Pki
) -> None:
    fleet = Fleet(broker, pki, tmp_path / "fleet.log")
    agent = Agent(device_home(tmp_path, pki, broker, "box-1"))
    try:
        deadline = time.monotonic() + WAIT_S
        while json.loads(fleet.get("/healthz")[1])["broker_connected"] is not True:
            assert time.monotonic() < deadline, "the fleet manager never reached the broker"
            time.sleep(0.1)
        # A second box over the same broker with the figures a CPU-only test host lacks
        # (GPU, temperatures, an integrity scrub) and the events an update produces.
        box = client_for(broker, pki.device("lab", "box-9"), client_id="box-9-vectors")
        box.connect("127.0.0.1", broker.port)
        box.loop_start()
        try:
            messages = [
                ("status", b"online"),
                ("health", (VECTORS / "valid" / "health-latency-histogram.json").read_bytes()),
                ("health", (VECTORS / "valid" / "health-after-a-scrub.json").read_bytes()),
            ]
            for seq, kind in enumerate(
                (EventKind.UPDATE_APPLIED, EventKind.UPDATE_ROLLED_BACK, EventKind.DEGRADED),
                start=1000,
            ):
                report = EventReport(seq=seq, at=1.0, kind=kind, software="0.1.0")
                messages.append(("events", encode(report)))
            for topic, payload in messages:
                box.publish(f"edgeid/lab/box-9/{topic}", payload, qos=1).wait_for_publish(WAIT_S)
        finally:
            box.disconnect()
            box.loop_stop()
        fleet.wait(
            lambda d: (
                all(
                    k in d and d[k]["health"] is not None and len(d[k]["history"]) >= 2
                    for k in ("lab/box-1", "lab/box-9")
                )
                and len(d["lab/box-9"]["events"]) >= 3
            ),
            "both boxes' reports and box-9's events",
        )
        text = fleet.get("/metrics")[1]
    finally:
        agent.close()
        fleet.close()

    labels_of: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels_of.setdefault(sample.name, set()).update(sample.labels)
    missing, unknown_labels = [], []
    for where, expr in queries(load()):
        for name in METRIC.findall(expr):
            if name not in labels_of:
                missing.append(f"{where}: {name}")
        for name, matchers in SELECTOR.findall(expr):
            for label in MATCHER.findall(matchers):
                if name in labels_of and label not in labels_of[name]:
                    unknown_labels.append(f"{where}: {name} has no label {label}")
    problems = [f"not exposed: {m}" for m in missing] + unknown_labels
    assert not problems, "\n".join(problems)
