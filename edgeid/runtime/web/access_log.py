"""The service's access log: method, route template, status and time, never the real path.

Paths hold gallery names (``/galleries/office/subjects``) and query strings hold filters and
case numbers, so uvicorn's own access log stays off and this middleware, outermost around
the app, writes one line per request from the route the router matched::

    GET /galleries/{gallery}/subjects 200 12.3 ms

An exception that escapes the app is logged here as its type and stack, without its message
(which may quote a name), and goes no further: uvicorn would log it with the message.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
from collections.abc import Sequence

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ACCESS_LOGGER = "edgeid.runtime.web.access"
UNROUTED = "-"  # a request no route matched (404, or refused before routing)

access_logger = logging.getLogger(ACCESS_LOGGER)
logger = logging.getLogger(__name__)


def route_template(scope: Scope, prefixes: Sequence[str] = ()) -> str:
    """The matched route's template (``/search/{search_id}``), or ``-``; never the real path.

    A route of a router included under a prefix knows only its own part of the path; the
    prefix is put back when it is one of ``prefixes`` (fixed strings such as ``/api/v1``),
    and shown as ``...`` otherwise, since it could hold a parameter.
    """
    route = scope.get("route")
    template = getattr(route, "path", None)
    if not isinstance(template, str) or not template:
        return UNROUTED
    regex = getattr(route, "path_regex", None)
    concrete = str(scope.get("path", ""))
    if not isinstance(regex, re.Pattern) or regex.match(concrete):
        return template
    for prefix in prefixes:
        if concrete.startswith(prefix) and regex.match(concrete[len(prefix) :]):
            return prefix + template
    return "..." + template


def redacted_stack(exc: BaseException) -> str:
    """An exception's type and where it was raised, without its message."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    return f"{type(exc).__module__}.{type(exc).__qualname__} (message withheld)\n{frames}"


class RouteAccessLog:
    """ASGI middleware: one access line per HTTP request, by route template; ``prefixes``:
    the fixed prefixes routers are included under (see ``route_template``)."""

    def __init__(self, app: ASGIApp, *, prefixes: Sequence[str] = ()) -> None:
        self.app = app
        self.prefixes = tuple(prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: list[int] = []

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:  # logged here without its message; see the module docstring
            logger.error(
                "%s %s raised %s",
                scope.get("method"),
                route_template(scope, self.prefixes),
                redacted_stack(exc),
            )
            if not status:
                await PlainTextResponse("internal error", status_code=500)(scope, receive, sending)
        finally:
            access_logger.info(
                "%s %s %s %.1f ms",
                scope.get("method"),
                route_template(scope, self.prefixes),
                status[0] if status else "-",
                (time.perf_counter() - started) * 1000,
            )
