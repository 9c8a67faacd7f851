"""Serving the app: uvicorn with TLS when a certificate is configured.

Plain HTTP is refused unless the address is loopback (development on the box itself): on
the office network session cookies and photos travel only over HTTPS. uvicorn's own access log
stays off (it prints real paths and query strings); ``access_log.py`` logs each request by its
route template instead.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgeid.runtime.addresses import is_loopback
from edgeid.runtime.config.settings import Settings
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.web.access_log import RouteAccessLog
from edgeid.runtime.web.app import API_PREFIX

logger = logging.getLogger(__name__)

# Idle keep-alive connections are dropped after this long: a box serves a few people.
KEEP_ALIVE_S = 5
# More concurrent requests than this get 503: the CPU cannot serve them anyway.
MAX_CONCURRENT_REQUESTS = 64


class SturdyH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing cleanly on malformed input it cannot answer.

    A request refused early (413 while its body still arrives) followed by broken framing (a
    lying Content-Length, a bad chunk) makes uvicorn answer 400 on a connection whose response
    is already sent; h11 refuses, and asyncio logs "Fatal error on SSL protocol" with a
    traceback. Here the connection is closed and one line is logged instead.
    """

    def data_received(self, data: bytes) -> None:
        try:
            super().data_received(data)
        except h11.LocalProtocolError:
            self._drop("malformed request data after the response")

    def send_400_response(self, msg: str) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self._drop("malformed request data after the response")  # no second answer
            return
        super().send_400_response(msg)

    def _drop(self, why: str) -> None:
        logger.warning("connection closed: %s", why)
        self.transport.close()


def make_server(
    app: FastAPI, settings: Settings, *, host: str | None = None, port: int | None = None
) -> uvicorn.Server:
    """A uvicorn server for ``app`` on ``host:port`` (default: the settings' web section)."""
    web = settings.web
    host = host or web.host
    port = web.port if port is None else port
    tls = bool(web.tls_cert and web.tls_key)
    if bool(web.tls_cert) != bool(web.tls_key):
        raise BadInputError("set both web.tls_cert and web.tls_key in edgeid.toml, or neither")
    if not tls and not is_loopback(host):
        raise BadInputError(
            f"refusing plain HTTP on {host}: set web.tls_cert and web.tls_key (edgeid init makes "
            "them) or bind to 127.0.0.1 for development"
        )
    for path in (web.tls_cert, web.tls_key) if tls else ():
        if path and not Path(path).is_file():
            raise BadInputError(f"TLS file {path} does not exist; run edgeid init or fix the path")
    config = uvicorn.Config(
        access_logged(app),
        host=host,
        port=port,
        ssl_certfile=web.tls_cert if tls else None,
        ssl_keyfile=web.tls_key if tls else None,
        log_level="warning",
        access_log=False,  # uvicorn's prints real paths (gallery names, case filters)
        server_header=False,
        date_header=False,
        proxy_headers=False,  # no proxy in front: the peer address is the client's
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=MAX_CONCURRENT_REQUESTS,
        http=SturdyH11Protocol,
    )
    return uvicorn.Server(config)


def access_logged(app: FastAPI) -> RouteAccessLog:
    """The app behind its access log (method, route template, status; see access_log.py)."""
    return RouteAccessLog(app, prefixes=(API_PREFIX,))


def web_url(settings: Settings, *, host: str | None = None, port: int | None = None) -> str:
    web = settings.web
    scheme = "https" if web.tls_cert and web.tls_key else "http"
    return f"{scheme}://{host or web.host}:{web.port if port is None else port}"


def run_web(
    app: FastAPI, settings: Settings, *, host: str | None = None, port: int | None = None
) -> None:
    """Serve until SIGINT or SIGTERM, then return normally, so that the caller's ``with``
    blocks close the audit log (final signed checkpoint) and flush the galleries' indexes.

    uvicorn shuts down gracefully on those signals and then raises the signal again for the
    handler that was in place before it started; ours only notes it, where the default
    handler would kill the process before any cleanup.
    """
    server = make_server(app, settings, host=host, port=port)
    logger.info("web UI on %s", web_url(settings, host=host, port=port))
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    received: list[int] = []

    def note(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        logger.info("signal %d: web UI stopped", received[0])
