"""A real box for the web tests: galleries with LFW faces enrolled through the real pipeline,
the real audit log, users of every role with real argon2id passwords, and the app over them.

Enrolled subjects get neutral display names ("Subject 1"): no real name reaches test output.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient

from edgeid.runtime.accounts.roles import Role
from edgeid.runtime.accounts.sealing import AccountsKey, accounts_key
from edgeid.runtime.accounts.users import UserStore
from edgeid.runtime.audit import AuditLog
from edgeid.runtime.cases.service import CaseService
from edgeid.runtime.config.settings import Settings, WebSettings
from edgeid.runtime.gallery.service import GalleryService
from edgeid.runtime.inference.pipeline import FacePipeline
from edgeid.runtime.web.app import create_app
from edgeid.runtime.web.server import make_server
from edgeid.runtime.web.tls import make_certificate

OFFICE = "office"  # the investigators' gallery
OTHER = "other"  # a gallery the investigator may not use
PASSWORD = "correct horse battery staple"
# (LFW folder, image enrolled, image used as the probe): different photos of one person,
# scoring well above the FMR 1e-3 threshold with the shipped model (0.979, 0.961, 0.980).
PEOPLE = (
    ("Tang_Jiaxuan", 1, 3),
    ("Paul_Martin", 3, 2),
    ("John_Bolton", 4, 13),
)
OTHER_PERSON = ("Donald_Rumsfeld", 22, 28)
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def lfw_image(lfw_dir: Path, person: str, number: int) -> Path:
    return lfw_dir / "images" / person / f"{person}_{number:04d}.jpg"


class FakeClock:
    """Monotonic seconds the test moves forward by hand (session expiry, throttling)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Box:
    home: Path
    settings: Settings
    service: GalleryService
    audit: AuditLog
    app: FastAPI
    clock: FakeClock
    users: dict[Role, str]
    accounts: AccountsKey  # what users.json and tokens.json are sealed under
    # LFW folder -> subject id; kept out of repr so no real name reaches a failure report.
    subjects: dict[str, str] = field(default_factory=dict, repr=False)
    other_subject: str = ""
    cases: CaseService | None = None

    def close(self) -> None:
        desk = self.app.state.web.cases
        if desk is not None:
            desk.jobs.stop_all(wait_s=60)
        if self.cases is not None:
            self.cases.close()
        self.audit.close()
        self.service.close()


def central_face(service: GalleryService, image: bytes) -> int:
    """LFW centres its person; other faces may show at the edges."""
    probe = service.analyse(image)
    assert probe.faces, "no face in a test image"

    def off_centre(index: int) -> float:
        x0, y0, x1, y1 = probe.faces[index].box
        return abs((x0 + x1) / 2 - probe.width / 2) + abs((y0 + y1) / 2 - probe.height / 2)

    return min(range(len(probe.faces)), key=off_centre)


def tls_settings(home: Path, **web: object) -> Settings:
    files = make_certificate(home, device_id="test-box")
    return Settings(
        web=WebSettings(tls_cert=str(files.cert), tls_key=str(files.key), **web)  # type: ignore[arg-type]
    )


def make_user(
    home: Path, accounts: AccountsKey, role: Role, galleries: tuple[str, ...] = ()
) -> str:
    """A user of ``role`` whose one-time password is already changed to PASSWORD."""
    name = role.value
    store = UserStore(home, accounts)
    _, once = store.create(name, role, galleries=galleries)
    store.change_password(name, once, PASSWORD)
    return name


def populate(service: GalleryService, lfw_dir: Path) -> tuple[dict[str, str], str]:
    """Two galleries: PEOPLE in OFFICE, OTHER_PERSON in OTHER; their subject ids."""
    service.create_gallery(OFFICE, "field office")
    service.create_gallery(OTHER, "another unit")
    subjects = {}
    for number, (person, enrolled, _) in enumerate(PEOPLE, start=1):
        image = lfw_image(lfw_dir, person, enrolled).read_bytes()
        done = service.enroll(
            OFFICE,
            display_name=f"Subject {number}",
            legal_basis="test case 0001",
            enrolled_by="setup",
            image_bytes=image,
            face_index=central_face(service, image),
        )
        subjects[person] = done.subject.subject_id
    image = lfw_image(lfw_dir, OTHER_PERSON[0], OTHER_PERSON[1]).read_bytes()
    other = service.enroll(
        OTHER,
        display_name="Subject X",
        legal_basis="test case 0002",
        enrolled_by="setup",
        image_bytes=image,
        face_index=central_face(service, image),
    )
    return subjects, other.subject.subject_id


def build_box(home: Path, lfw_dir: Path, models_dir: Path, settings: Settings | None = None) -> Box:
    settings = settings or tls_settings(home)
    pipeline = FacePipeline.load(models_dir)
    service = GalleryService.open(home, settings, pipeline=pipeline)
    try:
        subjects, other = populate(service, lfw_dir)
        audit = AuditLog.open(home, service.store.keyring)
        cases = CaseService(home, service, audit, detector=settings.inference.detector)
    except BaseException:
        service.close()
        raise
    accounts = accounts_key(service.store.keyring)
    users = {
        role: make_user(home, accounts, role, (OFFICE,) if role is Role.INVESTIGATOR else ())
        for role in Role
    }
    clock = FakeClock()
    app = create_app(
        home,
        settings,
        galleries=service,
        audit=audit,
        version="test",
        models_dir=models_dir,
        cases=cases,
        clock=clock,
    )
    return Box(home, settings, service, audit, app, clock, users, accounts, subjects, other, cases)


# -- browser-like sessions through the TestClient ---------------------------------------------


def client(box: Box) -> TestClient:
    scheme = "https" if box.settings.web.tls_cert else "http"
    return TestClient(box.app, base_url=f"{scheme}://testserver", follow_redirects=False)


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def sign_in(box: Box, role: Role, *, password: str = PASSWORD) -> tuple[TestClient, str]:
    """A client signed in as the box's user of ``role``, and its session's CSRF token."""
    browser = client(box)
    page = browser.get("/login")
    reply = browser.post(
        "/login",
        data={"username": box.users[role], "password": password, "csrf_token": csrf_of(page.text)},
    )
    assert reply.status_code == 303, f"sign-in as {role.value} failed: {reply.status_code}"
    token = csrf_of(browser.get("/account/tokens").text)
    return browser, token


WORK_CASE = "2026/0042"
WORK_REASON = "identifying the child seen in the seized photos"
# What an API call states to browse a gallery or a case (edgeid/runtime/web/work_context.py).
WORK_HEADERS = {"Edgeid-Case": WORK_CASE, "Edgeid-Reason": WORK_REASON}


def work_on(
    browser: TestClient, csrf: str, case: str = WORK_CASE, reason: str = WORK_REASON
) -> None:
    """State the case and reason the session is working on (recorded once)."""
    reply = browser.post("/context", data={"csrf_token": csrf, "case": case, "reason": reason})
    assert reply.status_code == 303, reply.text


def all_routes(app: FastAPI) -> Iterator[tuple[str, set[str], object]]:
    """(full path, methods, route) of every route, through included routers."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI before 0.16x keeps included routes flat in app.routes
        for route in app.routes:
            yield getattr(route, "path", ""), getattr(route, "methods", set()), route
        return
    for context in iter_route_contexts(app.routes):
        yield context.path or "", context.methods or set(), context.original_route


# -- a real server on a free loopback port ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serving(app: FastAPI, settings: Settings, port: int) -> Iterator[str]:
    """Serve ``app`` with uvicorn (TLS as configured) in a thread; yields its base URL."""
    server = make_server(app, settings, host="127.0.0.1", port=port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    scheme = "https" if settings.web.tls_cert else "http"
    url = f"{scheme}://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the web server did not start"
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def get_json(url: str) -> object:
    return httpx.get(url, verify=False, timeout=10).json()


# Waits for every image the locator matches to finish (loaded or broken), then their natural
# widths: 0 means broken. Reading naturalWidth at once races a busy machine's image loads.
_WIDTHS_WHEN_DONE = """async imgs => {
    await Promise.all(imgs.map(i => i.complete ? null : new Promise(done => {
        i.addEventListener('load', done, {once: true});
        i.addEventListener('error', done, {once: true});
    })));
    return imgs.map(i => i.naturalWidth);
}"""


def loaded_widths(images: Any) -> list[int]:
    """The natural widths of a Playwright locator's images once each has loaded or failed."""
    widths: list[int] = images.evaluate_all(_WIDTHS_WHEN_DONE)
    return widths
