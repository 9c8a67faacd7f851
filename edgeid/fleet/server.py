"""`edgeid fleet serve`: the subscriber and the web server (Starlette on uvicorn) for the
dashboard (``/``), Prometheus (``/metrics``), the devices as JSON (``/api/devices``) and
``/healthz``.

On loopback the pages are open. Anywhere else a bearer token is required (``--token-file``):
every route but ``/healthz`` then wants ``Authorization: Bearer <token>`` (Prometheus'
``authorization`` setting), or the token as the password of HTTP basic authentication, which a
browser asks for. ``--tls-cert``/``--tls-key`` serve HTTPS. The pages show health only.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeid.fleet import dashboard, prometheus
from edgeid.fleet.devices import (
    DEFAULT_HISTORY_POINTS,
    DEFAULT_STALE_AFTER_S,
    DeviceView,
    FleetState,
)
from edgeid.fleet.homeassistant import check_support_url
from edgeid.fleet.live_page import LivePage
from edgeid.fleet.subscriber import FleetSubscriber, client_tls
from edgeid.runtime.addresses import is_loopback
from edgeid.runtime.errors import BadInputError, EdgeidError

logger = logging.getLogger(__name__)

# A token shorter than this is refused: `openssl rand -hex 32` gives 64 characters.
MIN_TOKEN_CHARS = 32
OPEN_PATHS = frozenset({"/healthz"})  # liveness for a load balancer; says nothing of devices
REALM = "edgeid fleet"
SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]

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
    token_file: Path | None = None  # required beyond loopback
    tls_cert: Path | None = None
    tls_key: Path | None = None
    homeassistant_support_url: str | None = None  # origin.support_url of the discovery configs

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def read_token(path: Path) -> str:
    """The token in ``path`` (one line), refusing a missing, short or shared-readable file."""
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(
            f"--token-file {path}: cannot be read ({exc.__class__.__name__}); make one with "
            f"`(umask 077; openssl rand -hex 32 > {path})`"
        ) from exc
    token = text.strip()
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token) or not token.isprintable():
        raise BadInputError(
            f"--token-file {path}: the token must be one line of at least {MIN_TOKEN_CHARS} "
            f"printable characters; make one with `(umask 077; openssl rand -hex 32 > {path})`"
        )
    if mode & 0o077:
        raise BadInputError(f"--token-file {path}: others may read it; run `chmod 600 {path}`")
    return token


def check_options(options: FleetOptions) -> None:
    """Refuse a setting that would expose the pages, or that the fleet cannot work with,
    before anything starts (every way of starting it comes through here)."""
    if options.stale_after_s <= 0:
        raise BadInputError("--stale-after must be a positive number of seconds")
    if options.homeassistant_support_url is not None:
        check_support_url(options.homeassistant_support_url)
    if (options.tls_cert is None) != (options.tls_key is None):
        raise BadInputError("give both --tls-cert and --tls-key, or neither")
    for flag, path in (("--tls-cert", options.tls_cert), ("--tls-key", options.tls_key)):
        if path is not None and not path.is_file():
            raise BadInputError(f"{flag} {path}: no such file; give the PEM file's path")
    if options.tls_cert is not None and options.tls_key is not None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                str(options.tls_cert), str(options.tls_key)
            )
        except (OSError, ssl.SSLError) as exc:
            raise BadInputError(
                f"--tls-cert/--tls-key cannot be loaded ({exc.__class__.__name__}); give a PEM "
                "certificate and its private key"
            ) from exc
    if options.token_file is None and not is_loopback(options.listen_host):
        raise BadInputError(
            f"refusing to serve the fleet pages on {options.listen_host} without a token: "
            "give --token-file FILE (made with `(umask 077; openssl rand -hex 32 > FILE)`) or "
            "--listen 127.0.0.1:PORT"
        )


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


class TokenGuard:
    """ASGI middleware: every path but ``OPEN_PATHS`` needs the token (bearer, or as a basic
    password), compared in constant time; every response gets the security headers."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self._token = token.encode() if token is not None else None

    def _allowed(self, scope: Scope) -> bool:
        if self._token is None or scope.get("path") in OPEN_PATHS:
            return True
        header = dict(scope.get("headers", [])).get(b"authorization", b"")
        scheme, _, value = header.partition(b" ")
        presented = value.strip()
        if scheme.lower() == b"basic":
            try:
                presented = base64.b64decode(presented, validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
        elif scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(presented, self._token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k != b"cache-control"]
                message = {**message, "headers": kept + SECURITY_HEADERS}
            await send(message)

        if not self._allowed(scope):
            refusal = PlainTextResponse(
                "a token is required: Authorization: Bearer <token>\n",
                status_code=401,
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}", Basic realm="{REALM}"'},
            )
            await refusal(scope, receive, with_headers)
            return
        await self.app(scope, receive, with_headers)


def create_app(
    state: FleetState,
    broker_connected: Callable[[], bool],
    *,
    token: str | None = None,
    clock: Callable[[], float] = time.time,
) -> ASGIApp:
    """The fleet's web app over ``state``; ``token``: None for open pages (loopback only)."""
    exposition = prometheus.FleetExposition(state)

    # Large fleets: rendered in the background while watched (see live_page.py).
    dashboard_page = LivePage(
        lambda: dashboard.render(state.devices(), clock()).encode("utf-8"),
        refresh_s=DASHBOARD_REFRESH_S,
        name="dashboard",
    )
    metrics_page = LivePage(exposition.render, refresh_s=METRICS_REFRESH_S, name="metrics")

    def page(request: Request) -> Response:
        if not request.query_params:  # the default view: the one a large fleet renders ahead
            return HTMLResponse(dashboard_page.get())
        try:
            view = dashboard.View.parse(dict(request.query_params))
        except BadInputError as exc:
            return PlainTextResponse(f"{exc}\n", status_code=400)
        return HTMLResponse(dashboard.render(state.devices(), clock(), view))

    def metrics(_request: Request) -> Response:
        return Response(metrics_page.get(), media_type=prometheus.CONTENT_TYPE)

    def devices(_request: Request) -> Response:
        return JSONResponse({"devices": [device_json(v) for v in state.devices()]})

    def healthz(_request: Request) -> Response:
        return JSONResponse({"ok": True, "broker_connected": broker_connected()})

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/metrics", metrics),
            Route("/api/devices", devices),
            Route("/healthz", healthz),
        ]
    )
    return TokenGuard(app, token)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, so that port 0 is known before uvicorn runs."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise EdgeidError(
            f"cannot listen on {host}:{port} ({exc.strerror}); choose another --listen"
        ) from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class FleetService:
    """The subscriber and the web server together; ``start``/``stop`` for tests, ``run`` for
    the CLI (uvicorn in the calling thread, until SIGTERM or SIGINT)."""

    def __init__(self, options: FleetOptions, *, clock: Callable[[], float] = time.time) -> None:
        check_options(options)
        token = read_token(options.token_file) if options.token_file is not None else None
        context = client_tls(options.ca, options.cert, options.key)
        self.options = options
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
        self.app = create_app(
            self.state, lambda: self.subscriber.connected, token=token, clock=clock
        )
        self._socket = bind(options.listen_host, options.listen_port)
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                ssl_certfile=str(options.tls_cert) if options.tls_cert else None,
                ssl_keyfile=str(options.tls_key) if options.tls_key else None,
                log_level="warning",
                access_log=False,
                server_header=False,
                proxy_headers=False,
                timeout_keep_alive=5,
                # A scraper holding its connection (over TLS, asyncio waits 30 s for its
                # close_notify) must not hold up a stop.
                timeout_graceful_shutdown=5,
            )
        )
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        return f"{'https' if self.options.tls else 'http'}://{shown}:{port}/"

    def _serve(self) -> None:
        self.server.run(sockets=[self._socket])

    def start(self) -> None:
        """Subscriber and web server in background threads."""
        self.subscriber.start()
        self._thread = threading.Thread(target=self._serve, name="edgeid-fleet-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                raise EdgeidError("the fleet's web server did not start within 10 s")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._socket.close()
        self.subscriber.stop()

    def run(self) -> None:
        """Serve in this thread until SIGTERM or SIGINT, then stop the subscriber.

        uvicorn shuts down on those signals and then raises the signal again for the handler
        in place before it started; ours only notes it, so the process exits normally.
        """
        received: list[int] = []

        def note(signum: int, _frame: FrameType | None) -> None:
            received.append(signum)

        previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.subscriber.start()
        try:
            self._serve()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._socket.close()
            self.subscriber.stop()


def serve(options: FleetOptions) -> None:
    """Run until SIGTERM or SIGINT."""
    service = FleetService(options)
    print(
        f"edgeid fleet: dashboard on {service.url} (metrics: /metrics), broker "
        f"{options.broker_host}:{options.broker_port}",
        file=sys.stderr,
        flush=True,
    )
    if not is_loopback(options.listen_host) and not options.tls:
        print(
            "edgeid fleet: warning: the token travels in clear text; add --tls-cert/--tls-key",
            file=sys.stderr,
            flush=True,
        )
    service.run()
