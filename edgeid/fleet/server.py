"""`edgeid fleet serve`: the subscriber and a small HTTP server for the dashboard (``/``),
Prometheus (``/metrics``), the devices as JSON (``/api/devices``) and ``/healthz``.

The page has no login: bind it to loopback (the default) or put it behind the admins' reverse
proxy. It shows health only, so that is what an unwanted reader could see.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

from edgeid.fleet import dashboard, prometheus
from edgeid.fleet.devices import (
    DEFAULT_HISTORY_POINTS,
    DEFAULT_STALE_AFTER_S,
    DeviceView,
    FleetState,
)
from edgeid.fleet.live_page import LivePage
from edgeid.fleet.subscriber import FleetSubscriber, client_tls
from edgeid.runtime.errors import EdgeidError

logger = logging.getLogger(__name__)

# How old a large fleet's page may be: the browser reloads every 10 s, Prometheus scrapes 15+ s.
DASHBOARD_REFRESH_S = 2.0
METRICS_REFRESH_S = 5.0


@dataclass(frozen=True)
class FleetOptions:
    broker_host: str
    broker_port: int
    ca: Path
    cert: Path
    key: Path
    listen_host: str = "127.0.0.1"
    listen_port: int = 8090
    stale_after_s: float = DEFAULT_STALE_AFTER_S
    history_points: int = DEFAULT_HISTORY_POINTS
    homeassistant_prefix: str | None = None  # None: no Home Assistant discovery
    homeassistant_support_url: str | None = None  # origin.support_url of the discovery configs


def device_json(view: DeviceView) -> dict[str, Any]:
    return {
        "site": view.site,
        "device": view.device,
        "state": view.state,
        "last_seen": view.last_seen,
        "requests_total": view.requests_total,
        "errors_total": view.errors_total,
        "health": view.health.model_dump(mode="json") if view.health else None,
        "history": [
            {
                "measured_at": p.measured_at,
                "cpu_percent": p.cpu_percent,
                "latency_p95_ms": p.latency_p95_ms,
                "max_celsius": p.max_celsius,
            }
            for p in view.history
        ],
        "events": [
            {"received_at": at, "seq": e.seq, "at": e.at, "kind": e.kind.value}
            for at, e in view.events
        ],
    }


class FleetHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        state: FleetState,
        broker_connected: Callable[[], bool],
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(address, _Handler)
        self.state = state
        self.broker_connected = broker_connected
        self.clock = clock
        # Large fleets: rendered in the background while watched (see live_page.py).
        self.dashboard = LivePage(
            lambda: dashboard.render(state.devices(), clock()).encode("utf-8"),
            refresh_s=DASHBOARD_REFRESH_S,
            name="dashboard",
        )
        self.metrics = LivePage(
            lambda: prometheus.render(state.devices(), state.counters()).encode("utf-8"),
            refresh_s=METRICS_REFRESH_S,
            name="metrics",
        )


class _Handler(BaseHTTPRequestHandler):
    server: FleetHttpServer
    server_version = "edgeid-fleet"

    def do_GET(self) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._reply(200, "text/html; charset=utf-8", self.server.dashboard.get())
        elif path == "/metrics":
            self._reply(200, prometheus.CONTENT_TYPE, self.server.metrics.get())
        elif path == "/api/devices":
            devices = [device_json(v) for v in state.devices()]
            self._reply(200, "application/json", json.dumps({"devices": devices}).encode())
        elif path == "/healthz":
            status = {"ok": True, "broker_connected": self.server.broker_connected()}
            self._reply(200, "application/json", json.dumps(status).encode())
        else:
            self._reply(404, "text/plain; charset=utf-8", b"not found\n")

    def _reply(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug(format, *args)


class FleetService:
    """The subscriber and the HTTP server together; ``start``/``stop`` for tests and the CLI."""

    def __init__(self, options: FleetOptions, *, clock: Callable[[], float] = time.time) -> None:
        context = client_tls(options.ca, options.cert, options.key)
        self.state = FleetState(
            stale_after_s=options.stale_after_s,
            history_points=options.history_points,
            clock=clock,
            on_new_device=lambda site, device: self.subscriber.announce(site, device),
        )
        self.subscriber = FleetSubscriber(
            self.state,
            options.broker_host,
            options.broker_port,
            context,
            homeassistant_prefix=options.homeassistant_prefix,
            homeassistant_support_url=options.homeassistant_support_url,
        )
        try:
            self.http = FleetHttpServer(
                (options.listen_host, options.listen_port),
                self.state,
                lambda: self.subscriber.connected,
                clock,
            )
        except OSError as exc:
            raise EdgeidError(
                f"cannot listen on {options.listen_host}:{options.listen_port} "
                f"({exc.strerror}); choose another --listen"
            ) from exc
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.http.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self.subscriber.start()
        self._thread = threading.Thread(
            target=self.http.serve_forever, name="edgeid-fleet-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.subscriber.stop()


def serve(options: FleetOptions) -> None:
    """Run until SIGTERM or SIGINT."""
    service = FleetService(options)
    stop = threading.Event()

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    service.start()
    host, port = service.address
    print(
        f"edgeid fleet: dashboard on http://{host}:{port}/ (metrics: /metrics), broker "
        f"{options.broker_host}:{options.broker_port}",
        file=sys.stderr,
        flush=True,
    )
    stop.wait()
    service.stop()
