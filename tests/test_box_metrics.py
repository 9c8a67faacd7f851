"""The box's own ``/metrics``: open on loopback, a technician's token from anywhere else, the
fleet manager's metric names for the same figures, and text ``promtool`` accepts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_fleet import key, parse_exposition, promtool_check
from web_support import Box, build_box, client, free_port, serving, tls_settings

from edgeid.runtime.accounts.roles import ROLE_PERMISSIONS, Role
from edgeid.runtime.accounts.tokens import TokenStore
from edgeid.runtime.system.metrics import SERVICE_METRICS
from edgeid.runtime.telemetry.exposition import CONTENT_TYPE

DEVICE = {"site": "lab", "device": "dev-box"}  # the settings' defaults


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, lfw_dir: Path, models_dir: Path) -> Iterator[Box]:
    home = tmp_path_factory.mktemp("metrics-box")
    built = build_box(home, lfw_dir, models_dir, tls_settings(home))
    yield built
    built.close()


def token_of(box: Box, role: Role) -> str:
    held = ROLE_PERMISSIONS[role]
    _, secret = TokenStore(box.home, box.accounts).create(
        box.users[role], f"metrics {role.value}", held, allowed=held
    )
    return secret


def test_loopback_reads_the_box_metrics_without_a_token(box: Box) -> None:
    before = SERVICE_METRICS.totals()
    with (
        serving(box.app, box.settings, free_port()) as url,
        httpx.Client(base_url=url, verify=False, timeout=30) as local,
    ):
        for _ in range(3):  # requests the box counts and times (the sign-in page)
            assert local.get("/login").status_code == 200
        reply = local.get("/metrics")
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == CONTENT_TYPE
    promtool_check(reply.content)
    series = parse_exposition(reply.text)
    requests = series[key("edgeid_device_inference_requests_total", **DEVICE)]
    assert requests >= before.requests + 3
    count = series[key("edgeid_device_inference_latency_seconds_count", **DEVICE)]
    assert count >= sum(before.latency_buckets) + 3
    assert series[key("edgeid_device_inference_latency_seconds_bucket", **DEVICE, le="+Inf")] == (
        count
    )
    assert 0 <= series[key("edgeid_device_cpu_usage_ratio", **DEVICE)] <= 1
    assert series[key("edgeid_device_memory_total_bytes", **DEVICE)] > 0
    assert series[key("edgeid_device_disk_free_bytes", **DEVICE)] > 0
    assert series[key("edgeid_device_backend_degraded", **DEVICE)] == 0
    info = [k for k in series if k.startswith("edgeid_device_info{")]
    assert info == [key("edgeid_device_info", **DEVICE, backend="cpu", version="0.0.0+unknown")]
    # Scrapes are not the box's work: /metrics itself is not counted.
    assert SERVICE_METRICS.totals().requests == requests


def test_from_elsewhere_only_a_technicians_token_opens_it(box: Box) -> None:
    remote = client(box)  # the test client's address is not loopback
    refused = remote.get("/metrics")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    assert "token" in refused.json()["error"]
    for role in (Role.INVESTIGATOR, Role.SUPERVISOR, Role.ADMIN):
        other = remote.get("/metrics", headers={"Authorization": f"Bearer {token_of(box, role)}"})
        assert other.status_code == 403, role
    technician = token_of(box, Role.TECHNICIAN)
    reply = remote.get("/metrics", headers={"Authorization": f"Bearer {technician}"})
    assert reply.status_code == 200
    assert key("edgeid_device_up", **DEVICE) not in parse_exposition(reply.text)  # fleet's only
    assert key("edgeid_device_memory_total_bytes", **DEVICE) in parse_exposition(reply.text)
    wrong = remote.get("/metrics", headers={"Authorization": "Bearer edgeid_nope_nope"})
    assert wrong.status_code == 401


def test_the_box_uses_the_fleets_names_for_the_same_figures(box: Box) -> None:
    """Every family the box exposes is one the fleet manager exposes for the same device."""
    from test_fleet import BASE, health_with_histogram

    from edgeid.fleet.devices import FleetState
    from edgeid.fleet.prometheus import render_fleet

    fleet = FleetState()
    fleet.ingest("edgeid/lab/dev-box/health", health_with_histogram(1, 1.0, [1] * 15, 2.0))
    assert BASE.integrity is None
    fleet_names = {k.split("{", 1)[0] for k in parse_exposition(render_fleet(fleet))}
    technician = token_of(box, Role.TECHNICIAN)
    reply = client(box).get("/metrics", headers={"Authorization": f"Bearer {technician}"})
    box_names = {k.split("{", 1)[0] for k in parse_exposition(reply.text)}
    assert box_names <= fleet_names, box_names - fleet_names
    assert {"edgeid_device_cpu_usage_ratio", "edgeid_device_inference_latency_seconds_bucket"} <= (
        box_names
    )
