"""The access log (edgeid/runtime/web/access_log.py) on a small app: route templates with and
without
a router prefix, no path or query in any line, and an escaping exception logged without its
message. No face models needed; the full flow is in test_web_canary.py."""

from __future__ import annotations

import logging

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient

from edgeid.runtime.config.settings import Settings, WebSettings
from edgeid.runtime.web.access_log import ACCESS_LOGGER, RouteAccessLog
from edgeid.runtime.web.server import make_server

SECRET = "Zephyrine Canary"


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/galleries/{gallery}/subjects")
    def subjects(gallery: str) -> dict[str, str]:
        return {"gallery": gallery}

    @app.get("/boom/{name}")
    def boom(name: str) -> None:
        raise ValueError(f"no subject named {name}")

    api = APIRouter()

    @api.get("/galleries/{gallery}")
    def gallery(gallery: str) -> dict[str, str]:
        return {"gallery": gallery}

    app.include_router(api, prefix="/api/v1")
    app.include_router(api, prefix="/elsewhere")
    return app


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]


def _service_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every record but the test client's own (httpx logs the URLs it requests)."""
    formatter = logging.Formatter("%(name)s %(message)s")
    return "\n".join(formatter.format(r) for r in caplog.records if r.name != "httpx")


def test_lines_name_the_route_template_never_the_path_or_query(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    browser = TestClient(RouteAccessLog(_app(), prefixes=("/api/v1",)))
    assert browser.get(f"/galleries/{SECRET}/subjects", params={"case": SECRET}).status_code == 200
    assert browser.get(f"/api/v1/galleries/{SECRET}").status_code == 200
    assert browser.get(f"/elsewhere/galleries/{SECRET}").status_code == 200
    assert browser.post(f"/nowhere/{SECRET}").status_code == 404
    lines = _lines(caplog)
    assert [" ".join(line.split()[:3]) for line in lines] == [
        "GET /galleries/{gallery}/subjects 200",
        "GET /api/v1/galleries/{gallery} 200",
        "GET .../galleries/{gallery} 200",  # a prefix it was not told is fixed: not shown
        "POST - 404",
    ]
    assert "Zephyrine" not in _service_text(caplog)


def test_an_escaping_exception_is_logged_without_its_message_and_answered_500(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    browser = TestClient(RouteAccessLog(_app()), raise_server_exceptions=False)
    reply = browser.get(f"/boom/{SECRET}")
    assert reply.status_code == 500
    assert _lines(caplog)[0].startswith("GET /boom/{name} 500 ")
    (error,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "builtins.ValueError (message withheld)" in error.getMessage()
    assert "in boom" in error.getMessage()  # where it was raised, for the operator
    assert "Zephyrine" not in _service_text(caplog)
    assert "Zephyrine" not in "".join(capfd.readouterr())


def test_the_server_wraps_the_app_in_the_access_log_and_keeps_uvicorns_off() -> None:
    server = make_server(FastAPI(), Settings(web=WebSettings()), host="127.0.0.1")
    assert isinstance(server.config.app, RouteAccessLog)
    assert server.config.app.prefixes == ("/api/v1",)
    assert server.config.access_log is False  # uvicorn's own prints the real path
