"""The fleet manager's web server: a bearer token beyond loopback (refused without one, with a
one-line error naming the fix), the token checked on every page but /healthz, HTTPS, and a
dashboard that escapes whatever it shows."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from mqtt_broker import WAIT_S, Broker, Pki
from test_fleet import BASE, Clock
from test_fleet_mqtt import REPO_ROOT, Fleet

from edgeid.fleet.devices import DeviceView, FleetState, Point
from edgeid.fleet.server import (
    MIN_TOKEN_CHARS,
    FleetOptions,
    FleetService,
    create_app,
    read_token,
)
from edgeid.runtime.errors import BadInputError

TOKEN = "f" * 24 + "0123456789abcdef0123456789abcdef"
PAGES = ("/", "/metrics", "/api/devices")


def token_file(folder: Path, token: str = TOKEN, mode: int = 0o600) -> Path:
    path = folder / "fleet.token"
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


def fleet_serve(pki: Pki, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "edgeid", "fleet", "serve", "--ca", str(pki.ca.path),
            "--cert", str(pki.fleet.cert), "--key", str(pki.fleet.key), *args,
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=WAIT_S,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def test_beyond_loopback_without_a_token_is_refused_naming_the_fix(pki: Pki) -> None:
    for address in ("0.0.0.0:0", "192.0.2.7:8090", "[::]:0"):
        result = fleet_serve(pki, "--listen", address)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert "--token-file" in result.stderr and "127.0.0.1" in result.stderr


def test_settings_the_fleet_cannot_work_with_are_refused_by_the_service_itself(pki: Pki) -> None:
    """The service checks them, not the CLI: any way of starting it is refused the same."""
    for flags, words in (
        (["--stale-after", "0"], "--stale-after must be a positive"),
        (["--homeassistant-support-url", "ftp://help"], "give an http:// or https:// URL"),
    ):
        result = fleet_serve(pki, *flags)
        assert result.returncode == 2 and words in result.stderr, result.stderr
    options = FleetOptions(
        broker_host="127.0.0.1",
        broker_port=1,
        ca=pki.ca.path,
        cert=pki.fleet.cert,
        key=pki.fleet.key,
        homeassistant_support_url="javascript:alert(1)",
    )
    with pytest.raises(BadInputError, match="http:// or https://"):
        FleetService(options)


@pytest.mark.parametrize(
    ("token", "mode", "fix"),
    [
        ("short", 0o600, "openssl rand -hex 32"),
        ("two words " + "x" * MIN_TOKEN_CHARS, 0o600, "openssl rand -hex 32"),
        (TOKEN, 0o644, "chmod 600"),
    ],
    ids=["short", "spaces", "readable-by-others"],
)
def test_a_weak_or_exposed_token_file_is_refused(
    tmp_path: Path, pki: Pki, token: str, mode: int, fix: str
) -> None:
    result = fleet_serve(
        pki, "--listen", "0.0.0.0:0", "--token-file", str(token_file(tmp_path, token, mode))
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and fix in result.stderr, result.stderr
    assert token not in result.stderr


def test_tls_needs_both_files_that_load(tmp_path: Path, pki: Pki) -> None:
    half = fleet_serve(pki, "--tls-cert", str(pki.server.cert))
    assert half.returncode == 2 and "--tls-cert and --tls-key" in half.stderr
    garbage = tmp_path / "not.pem"
    garbage.write_text("not a certificate\n")
    bad = fleet_serve(pki, "--tls-cert", str(garbage), "--tls-key", str(pki.server.key))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "--tls-cert/--tls-key cannot be loaded" in bad.stderr


def test_read_token_strips_the_newline(tmp_path: Path) -> None:
    assert read_token(token_file(tmp_path)) == TOKEN
    with pytest.raises(BadInputError, match="cannot be read"):
        read_token(tmp_path / "absent")


# -- the token on every page -----------------------------------------------------------------


@pytest.fixture
def guarded() -> Iterator[TestClient]:
    state = FleetState()
    state.ingest("edgeid/lab/box-1/status", b"online")
    with TestClient(create_app(state, lambda: True, token=TOKEN)) as client:
        yield client


def test_every_page_but_healthz_wants_the_token(guarded: TestClient) -> None:
    assert guarded.get("/healthz").json() == {"ok": True, "broker_connected": True}
    basic = base64.b64encode(f"admin:{TOKEN}".encode()).decode()
    wrong_basic = base64.b64encode(b"admin:" + b"0" * len(TOKEN)).decode()
    for path in PAGES:
        bare = guarded.get(path)
        assert bare.status_code == 401, path
        assert bare.headers["www-authenticate"].startswith('Bearer realm="edgeid fleet"')
        assert 'Basic realm="edgeid fleet"' in bare.headers["www-authenticate"]
        assert "lab" not in bare.text
        for refused in (f"Bearer {TOKEN[:-1]}x", f"Bearer {TOKEN}0", f"Basic {wrong_basic}",
                        "Basic !!!", TOKEN, f"Token {TOKEN}"):  # fmt: skip
            reply = guarded.get(path, headers={"Authorization": refused})
            assert reply.status_code == 401, (path, refused)
        for accepted in (f"Bearer {TOKEN}", f"Basic {basic}"):
            reply = guarded.get(path, headers={"Authorization": accepted})
            assert reply.status_code == 200, (path, accepted)
            assert reply.headers["cache-control"] == "no-store"
            assert reply.headers["x-frame-options"] == "DENY"
    assert guarded.get("/nothing", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404


def test_the_served_dashboard_escapes_hostile_ids_and_strings() -> None:
    """The schema never lets these in; the page escapes them all the same."""
    hostile = '<script>alert("x")</script>'
    health = BASE.model_copy(
        update={  # model_copy does not validate: values no message could carry
            "software": BASE.software.model_copy(
                update={"edgeid": hostile, "models": ['"><img src=x onerror=alert(1)>']}
            ),
            "inference": BASE.inference.model_copy(update={"backend": "<b>cpu</b>"}),
        }
    )
    view = DeviceView(
        site='<img src=x onerror="alert(1)">',
        device=hostile,
        state="online",
        last_seen=1.0,
        health=health,
        history=(Point(1.0, 5.0, 1.0, None), Point(2.0, 6.0, 2.0, None)),
        events=(),
        requests_total=1,
        errors_total=0,
    )

    class Hostile(FleetState):
        def devices(self) -> list[DeviceView]:
            return [view]

    with TestClient(create_app(Hostile(), lambda: True, clock=Clock())) as client:
        page = client.get("/").text
    assert "<script" not in page and "<img" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;b&gt;cpu&lt;/b&gt;" in page
    assert "<polyline" in page  # the page's own markup is intact


# -- a real server: token and HTTPS ----------------------------------------------------------


def test_fleet_serve_over_https_with_a_token(tmp_path: Path, broker: Broker, pki: Pki) -> None:
    fleet = Fleet(
        broker, pki, tmp_path / "fleet.log",
        "--token-file", str(token_file(tmp_path)),
        "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
        token=TOKEN, tls_ca=pki.ca.path,
    )  # fmt: skip
    try:
        assert fleet.url.startswith("https://")
        content_type, text = fleet.get("/metrics")
        assert content_type.startswith("text/plain; version=0.0.4")
        assert "edgeid_fleet_messages_accepted_total" in text
        assert "edgeid fleet" in fleet.get("/")[1]
        with pytest.raises(urllib.error.HTTPError) as refused:
            fleet.get("/metrics", headers={})
        assert refused.value.code == 401
        assert json.loads(fleet.get("/healthz", headers={})[1])["ok"] is True
        # ``refused`` still holds its TLS connection open: the stop must not wait on it.
        assert fleet.stop() == 0
    finally:
        fleet.close()


def test_the_service_starts_and_stops_in_process(broker: Broker, pki: Pki) -> None:
    """``FleetService.start``/``stop``: subscriber and web server in threads (what an embedding
    program uses), on a port the OS picks."""
    service = FleetService(
        FleetOptions(
            broker_host="127.0.0.1",
            broker_port=broker.port,
            ca=pki.ca.path,
            cert=pki.fleet.cert,
            key=pki.fleet.key,
            listen_port=0,
        )
    )
    service.start()
    try:
        host, port = service.address
        assert host == "127.0.0.1" and port > 0 and service.url == f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + WAIT_S
        while True:
            with urllib.request.urlopen(service.url + "healthz", timeout=WAIT_S) as reply:
                if json.loads(reply.read())["broker_connected"]:
                    break
            assert time.monotonic() < deadline, "never connected to the broker"
            time.sleep(0.1)
    finally:
        service.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(service.url + "healthz", timeout=5)


def test_a_narrowed_dashboard_view_is_served_and_a_bad_one_refused() -> None:
    state = FleetState()
    state.ingest("edgeid/lab/box-1/status", b"offline")
    state.ingest("edgeid/north/box-2/status", b"online")
    client = TestClient(create_app(state, lambda: True))
    page = client.get("/", params={"state": "offline"})
    assert page.status_code == 200 and 'id="lab/box-1"' in page.text
    assert 'id="north/box-2"' not in page.text
    refused = client.get("/", params={"state": "<script>"})
    assert refused.status_code == 400 and "<script>" not in refused.text
