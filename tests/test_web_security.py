"""Security of the web UI and API, against the real app: real galleries (LFW faces enrolled
through the real pipeline), the real audit log, real argon2id, real TLS cookie settings.

Covers: every role against every endpoint, CSRF and cross-site refusal, cookie flags,
throttling, sessions, per-gallery access, token scopes, hostile uploads, and a tampered
audit log caught by ``edgeid audit verify``.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from PIL import Image
from starlette.routing import Mount
from web_support import (
    OFFICE,
    OTHER,
    PASSWORD,
    PEOPLE,
    WORK_HEADERS,
    Box,
    all_routes,
    build_box,
    client,
    csrf_of,
    lfw_image,
    sign_in,
    tls_settings,
    work_on,
)

from edgeid.runtime.accounts.roles import ROLE_PERMISSIONS, Permission, Role
from edgeid.runtime.accounts.throttle import PAIR_FREE_FAILURES
from edgeid.runtime.accounts.tokens import TokenStore
from edgeid.runtime.accounts.users import UserStore
from edgeid.runtime.audit import AuditAction
from edgeid.runtime.audit.recorder import DENIAL_WINDOW_S
from edgeid.runtime.config.settings import Settings, WebSettings
from edgeid.runtime.inference.image_decode import decode_image
from edgeid.runtime.web.access import ApiAccess, LocalOrApiAccess, Requirement
from edgeid.runtime.web.app import create_app

MAX_UPLOAD = 1024 * 1024  # small, so the oversize test sends little
PUBLIC = {("GET", "/login"), ("POST", "/login"), ("GET", "/healthz")}
OPENAPI = "/api/v1/openapi.json"


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, lfw_dir: Path, models_dir: Path) -> Iterator[Box]:
    home = tmp_path_factory.mktemp("box")
    built = build_box(home, lfw_dir, models_dir, tls_settings(home, max_upload_bytes=MAX_UPLOAD))
    yield built
    built.close()


@pytest.fixture(scope="module")
def probe_photo(lfw_dir: Path) -> bytes:
    person, _, probe = PEOPLE[0]
    return lfw_image(lfw_dir, person, probe).read_bytes()


def audit_actions(box: Box, **filters: object) -> list[AuditAction]:
    return [r.event.action for r in box.audit.query(limit=1000, **filters)]  # type: ignore[arg-type]


def start_search(browser: TestClient, token: str, **form: object) -> str:
    data = {"case": "2025/0042", "reason": "identify a victim in seized media", "csrf_token": token}
    reply = browser.post("/search", data={**data, **form})
    assert reply.status_code == 303, reply.status_code
    return str(reply.headers["location"]).rsplit("/", 1)[1]


# -- every role against every endpoint ---------------------------------------------------------


def requirements(app: FastAPI) -> list[tuple[str, str, Requirement]]:
    """(method, path, requirement) of every route; fails on a route that declares none."""
    found = []
    for path, methods, route in all_routes(app):
        if isinstance(route, Mount) or path == OPENAPI:
            continue
        assert isinstance(route, APIRoute), f"unexpected route {route}"
        stack, reqs = [route.dependant], []
        while stack:
            dependant = stack.pop()
            stack.extend(dependant.dependencies)
            if isinstance(dependant.call, Requirement):
                reqs.append(dependant.call)
        for method in sorted(methods - {"HEAD"}):
            if (method, path) in PUBLIC:
                assert not reqs, f"{method} {path} is public yet checks access"
                continue
            assert len(reqs) == 1, f"{method} {path} declares no access requirement"
            found.append((method, path, reqs[0]))
    # Signing out ends the session the rest of the loop uses: do it last.
    return sorted(found, key=lambda item: item[1] == "/logout")


def fill(path: str, requirement: Requirement) -> str:
    """Real gallery (so gallery checks pass), ids that exist nowhere (so nothing is changed)."""
    gallery = "no-such-gallery" if requirement.permission is Permission.GALLERIES else OFFICE
    values = {
        "gallery": gallery,
        "subject_id": "0" * 32,
        "face_id": "0" * 32,
        "search_id": "no-such-search",
        "entry_id": "no-such-entry",
        "face_index": "0",
        "token_id": "0" * 16,
        "username": "no-such-user",
        "case_id": "0" * 32,
        "job_id": "no-such-job",
        "ingest_id": "no-such-ingest",
        "proposal_id": "0" * 16,
        "history_id": "0" * 24,
        "enrolled_id": "0" * 32,
        "number": "1",
    }
    for name, value in values.items():
        path = path.replace("{" + name + "}", value)
    assert "{" not in path, f"no test value for a parameter of {path}"
    return path


def test_every_role_against_every_endpoint(box: Box) -> None:
    routes = requirements(box.app)
    assert len(routes) > 50
    wrong = []
    for role in Role:
        held = ROLE_PERMISSIONS[role]
        browser, csrf = sign_in(box, role)
        token_store = TokenStore(box.home, box.accounts)
        _, secret = token_store.create(box.users[role], "matrix", held, allowed=held)
        api = client(box)
        api.headers["Authorization"] = f"Bearer {secret}"
        for method, path, requirement in routes:
            allowed = requirement.permission is None or requirement.permission in held
            url = fill(path, requirement)
            if isinstance(requirement, ApiAccess | LocalOrApiAccess):
                reply = api.request(method, url)
            elif method == "GET":
                reply = browser.get(url)
            else:
                reply = browser.request(method, url, data={"csrf_token": csrf})
            code = reply.status_code
            ok = code not in (401, 403) and code < 500 if allowed else code == 403
            if not ok:
                wrong.append(f"{role.value} {method} {path}: {code}")
    assert not wrong, "\n".join(wrong)


def test_pages_without_a_session_go_to_sign_in_and_the_api_wants_a_token(box: Box) -> None:
    anonymous = client(box)
    reply = anonymous.get("/search")
    assert reply.status_code == 303 and reply.headers["location"] == "/login?next=/search"
    assert anonymous.get("/api/v1/me").status_code == 401
    # A signed-in browser's cookie does not open the API (so no cross-site use of it).
    browser, _ = sign_in(box, Role.INVESTIGATOR)
    assert browser.get("/api/v1/me").status_code == 401
    assert browser.get("/healthz").json()["state"] == "ready"


# -- CSRF, cookies, headers --------------------------------------------------------------------


def test_state_changes_need_the_session_csrf_token_and_a_same_site_origin(box: Box) -> None:
    browser, csrf = sign_in(box, Role.INVESTIGATOR)
    form = {"case": "2025/0001", "reason": "identify a victim in seized media"}
    assert browser.post("/search", data=form).status_code == 403
    assert browser.post("/search", data={**form, "csrf_token": "forged"}).status_code == 403
    cross_site = browser.post(
        "/search",
        data={**form, "csrf_token": csrf},
        headers={"Origin": "https://attacker.example", "Sec-Fetch-Site": "cross-site"},
    )
    assert cross_site.status_code == 403
    other_origin = browser.post(
        "/search", data={**form, "csrf_token": csrf}, headers={"Origin": "https://evil.example"}
    )
    assert other_origin.status_code == 403
    same_site = browser.post(
        "/search",
        data={**form, "csrf_token": csrf},
        headers={"Origin": "https://testserver", "Sec-Fetch-Site": "same-origin"},
    )
    assert same_site.status_code == 303
    # Another session's token is worth nothing here.
    _, supervisor_csrf = sign_in(box, Role.SUPERVISOR)
    assert browser.post("/search", data={**form, "csrf_token": supervisor_csrf}).status_code == 403


def test_the_login_form_itself_is_csrf_protected(box: Box) -> None:
    browser = client(box)
    browser.get("/login")
    reply = browser.post(
        "/login", data={"username": box.users[Role.ADMIN], "password": PASSWORD, "csrf_token": "x"}
    )
    assert reply.status_code == 403


def test_session_cookie_flags_over_https(box: Box) -> None:
    browser = client(box)
    page = browser.get("/login")
    reply = browser.post(
        "/login",
        data={
            "username": box.users[Role.ADMIN],
            "password": PASSWORD,
            "csrf_token": csrf_of(page.text),
        },
    )
    cookie = reply.headers["set-cookie"]
    assert cookie.startswith("__Host-edgeid-session=")
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"secure", "httponly", "samesite=strict", "path=/"} <= flags
    assert not any(flag.startswith("domain") for flag in flags)
    assert reply.headers["strict-transport-security"].startswith("max-age=")


def test_plain_http_on_loopback_uses_an_unprefixed_cookie_with_the_other_flags(box: Box) -> None:
    plain = Settings(web=WebSettings(max_upload_bytes=MAX_UPLOAD))
    app = create_app(box.home, plain, galleries=box.service, audit=box.audit, version="test")
    browser = TestClient(app, base_url="http://testserver", follow_redirects=False)
    cookie = browser.get("/login").headers["set-cookie"]
    assert cookie.startswith("edgeid-session=")
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= flags and "secure" not in flags


def test_every_response_carries_the_security_headers(box: Box) -> None:
    browser, _ = sign_in(box, Role.TECHNICIAN)
    for url in ("/login", "/health", "/api/v1/openapi.json", "/static/edgeid.css"):
        headers = browser.get(url).headers
        assert "default-src 'none'" in headers["content-security-policy"], url
        assert "script-src" not in headers["content-security-policy"]  # no script at all
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "same-origin"
    assert browser.get("/health").headers["cache-control"] == "no-store"


# -- sign-in, throttling, sessions -------------------------------------------------------------


def test_a_wrong_password_past_the_free_ones_delays_that_pair_even_if_right(box: Box) -> None:
    """From the sixth wrong password in a row, this account from this address waits before its
    next attempt (refused with 429 and Retry-After, the right password too, recorded); the
    same account from elsewhere and other accounts from here are not slowed."""
    store = UserStore(box.home, box.accounts)
    store.create("throttled", Role.TECHNICIAN)
    browser = client(box)
    csrf = csrf_of(browser.get("/login").text)
    for attempt in range(PAIR_FREE_FAILURES + 1):
        reply = browser.post(
            "/login",
            data={"username": "throttled", "password": f"wrong {attempt}", "csrf_token": csrf},
        )
        assert reply.status_code == 401, attempt
    _, fresh = store.reset_password("throttled")  # the right password from now on
    refused = browser.post(
        "/login", data={"username": "throttled", "password": fresh, "csrf_token": csrf}
    )
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) > 0
    failed = box.audit.query(user="throttled", action=AuditAction.LOGIN_FAILED, limit=100)
    assert len(failed) == PAIR_FREE_FAILURES + 2
    assert "throttled" in (failed[0].event.detail or "")
    elsewhere = TestClient(
        box.app, base_url="https://testserver", follow_redirects=False, client=("10.2.3.4", 5000)
    )
    form = {"username": "throttled", "password": fresh}
    form["csrf_token"] = csrf_of(elsewhere.get("/login").text)
    reply = elsewhere.post("/login", data=form)
    assert reply.status_code == 303  # the same account from another address signs in
    other, _ = sign_in(box, Role.TECHNICIAN)  # other accounts from here still sign in
    assert other.get("/health").status_code == 200


def test_successful_and_failed_sign_ins_and_sign_out_are_audited(box: Box) -> None:
    before = box.audit.last_seq
    browser = client(box)
    csrf = csrf_of(browser.get("/login").text)
    bad = browser.post(
        "/login",
        data={"username": box.users[Role.SUPERVISOR], "password": "nope", "csrf_token": csrf},
    )
    assert bad.status_code == 401 and "Wrong user name or password" in bad.text
    browser, csrf = sign_in(box, Role.SUPERVISOR)
    assert browser.post("/logout", data={"csrf_token": csrf}).status_code == 303
    assert browser.get("/audit").status_code == 303  # the session is gone
    newest = [r.event for r in box.audit.query(user=box.users[Role.SUPERVISOR], limit=3)]
    assert [e.action for e in reversed(newest)] == [
        AuditAction.LOGIN_FAILED,
        AuditAction.LOGIN,
        AuditAction.LOGOUT,
    ]
    assert box.audit.last_seq == before + 3


def test_sessions_expire_when_idle_and_at_their_absolute_lifetime(box: Box) -> None:
    web = box.settings.web
    browser, _ = sign_in(box, Role.TECHNICIAN)
    box.clock.advance(web.session_idle_s + 1)
    assert browser.get("/health").status_code == 303
    browser, _ = sign_in(box, Role.TECHNICIAN)
    step = web.session_idle_s - 1
    for _ in range(web.session_max_s // step):
        box.clock.advance(step)
        assert browser.get("/health").status_code == 200
    box.clock.advance(step)
    assert browser.get("/health").status_code == 303


def test_a_one_time_password_must_be_changed_before_anything_else(box: Box) -> None:
    store = UserStore(box.home, box.accounts)
    _, once = store.create("newcomer", Role.INVESTIGATOR, galleries=[OFFICE])
    browser = client(box)
    csrf = csrf_of(browser.get("/login").text)
    reply = browser.post(
        "/login", data={"username": "newcomer", "password": once, "csrf_token": csrf}
    )
    assert reply.headers["location"] == "/account/password"
    assert browser.get("/search").headers["location"] == "/account/password"
    page = browser.get("/account/password")
    csrf = csrf_of(page.text)
    assert "one-time" in page.text
    assert browser.post("/search", data={"csrf_token": csrf, "case": "1"}).status_code == 403
    short = browser.post(
        "/account/password",
        data={
            "csrf_token": csrf,
            "current_password": once,
            "new_password": "short",
            "repeat_password": "short",
        },
    )
    assert short.status_code == 400 and "shorter than 12" in short.text
    done = browser.post(
        "/account/password",
        data={
            "csrf_token": csrf,
            "current_password": once,
            "new_password": PASSWORD,
            "repeat_password": PASSWORD,
        },
    )
    assert done.status_code == 303
    assert browser.get("/search").status_code == 200
    assert AuditAction.PASSWORD_CHANGED in audit_actions(box, user="newcomer")


def test_sign_in_never_redirects_off_the_box(box: Box) -> None:
    browser = client(box)
    csrf = csrf_of(browser.get("/login").text)
    reply = browser.post(
        "/login",
        data={
            "username": box.users[Role.ADMIN],
            "password": PASSWORD,
            "csrf_token": csrf,
            "next": "//evil.example/phish",
        },
    )
    assert reply.headers["location"] == "/"


# -- galleries and tokens ----------------------------------------------------------------------


def test_investigators_reach_only_their_galleries(box: Box, probe_photo: bytes) -> None:
    browser, csrf = sign_in(box, Role.INVESTIGATOR)
    box.clock.advance(DENIAL_WINDOW_S)  # a fresh refusal allowance (earlier tests used it up)
    page = browser.get("/search")
    assert f'value="{OFFICE}"' in page.text and f'value="{OTHER}"' not in page.text
    refused = browser.post(
        "/search",
        data={
            "case": "2025/1",
            "reason": "identify a victim in seized media",
            "gallery": OTHER,
            "csrf_token": csrf,
        },
    )
    assert refused.status_code == 403
    assert browser.get(f"/galleries/{OTHER}/subjects").status_code == 403
    assert browser.get(f"/galleries/{OTHER}/subjects/{box.other_subject}").status_code == 403
    face = box.service.faces(OTHER, box.other_subject)[0].face_id
    assert browser.get(f"/galleries/{OTHER}/faces/{face}/thumbnail.jpg").status_code == 403
    refusals = box.audit.query(action=AuditAction.ACCESS_DENIED, user=box.users[Role.INVESTIGATOR])
    assert len(refusals) >= 4  # each refused attempt is on record, with the gallery named
    assert all(r.event.detail and OTHER in r.event.detail for r in refusals[:4]), [
        r.event.detail for r in refusals[:4]
    ]
    work_on(browser, csrf)
    assert browser.get(f"/galleries/{OFFICE}/subjects").status_code == 200


def test_token_scopes_limit_the_api_and_revocation_stops_it(box: Box) -> None:
    user = box.users[Role.INVESTIGATOR]
    store = TokenStore(box.home, box.accounts)
    held = ROLE_PERMISSIONS[Role.INVESTIGATOR]
    token, secret = store.create(user, "reader", ["subjects:read"], allowed=held)
    api = client(box)
    api.headers["Authorization"] = f"Bearer {secret}"
    assert api.get(f"/api/v1/galleries/{OFFICE}/subjects", headers=WORK_HEADERS).status_code == 200
    start = {"case": "2025/7", "reason": "identify a victim in seized media"}
    assert api.post("/api/v1/searches", json=start).status_code == 403
    assert api.get("/api/v1/me").json()["scopes"] == ["subjects:read"]
    store.revoke(token.token_id)
    assert api.get(f"/api/v1/galleries/{OFFICE}/subjects", headers=WORK_HEADERS).status_code == 401


def test_a_token_never_exceeds_its_owner_s_current_role(box: Box) -> None:
    name = "demoted"
    UserStore(box.home, box.accounts).create(name, Role.INVESTIGATOR, galleries=[OFFICE])
    held = ROLE_PERMISSIONS[Role.INVESTIGATOR]
    _, secret = TokenStore(box.home, box.accounts).create(name, "all", held, allowed=held)
    api = client(box)
    api.headers["Authorization"] = f"Bearer {secret}"
    assert api.get(f"/api/v1/galleries/{OFFICE}/subjects", headers=WORK_HEADERS).status_code == 200
    UserStore(box.home, box.accounts).update(name, role=Role.TECHNICIAN)
    assert api.get(f"/api/v1/galleries/{OFFICE}/subjects", headers=WORK_HEADERS).status_code == 403
    UserStore(box.home, box.accounts).update(name, role=Role.INVESTIGATOR, disabled=True)
    assert api.get(f"/api/v1/galleries/{OFFICE}/subjects", headers=WORK_HEADERS).status_code == 401


# -- uploads -----------------------------------------------------------------------------------


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` black pixels: kilobytes on disk,
    ``3 * width * height`` bytes once decoded to RGB."""
    row = b"\x00" + bytes((width + 7) // 8)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def traced_peak(action: object) -> int:
    tracemalloc.start()
    try:
        action()  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_hostile_uploads_are_refused_with_4xx_in_bounded_memory(
    box: Box, probe_photo: bytes
) -> None:
    browser, csrf = sign_in(box, Role.INVESTIGATOR)
    search = start_search(browser, csrf)
    url = f"/search/{search}/photo"

    def upload(data: bytes) -> int:
        files = {"photo": ("photo.jpg", data, "image/jpeg")}
        return browser.post(url, data={"csrf_token": csrf}, files=files).status_code

    assert upload(b"\xff" * (MAX_UPLOAD + 1)) == 413  # refused before it is read
    assert upload(probe_photo[: len(probe_photo) // 2]) == 400  # truncated
    assert upload(b"GIF89a not a photo") == 400
    bomb = bomb_png(10_000, 10_000)  # 100 megapixels, 300 MB as RGB
    assert len(bomb) < 50_000
    codes: list[int] = []
    peak = traced_peak(lambda: codes.append(upload(bomb)))
    assert codes == [400]
    assert peak < 40 * 1024 * 1024, peak
    # The same measure does see a real decode: 2000x2000 RGB is 12 MB.
    big = io.BytesIO()
    Image.new("RGB", (2000, 2000)).save(big, format="PNG")
    assert traced_peak(lambda: decode_image(big.getvalue())) > 12 * 1024 * 1024
    # Nothing was lost: the search still has its case and takes a good photo.
    assert upload(probe_photo) == 303
    assert "2025/0042" in browser.get(f"/search/{search}").text


def test_hostile_uploads_through_the_api(box: Box, probe_photo: bytes) -> None:
    held = ROLE_PERMISSIONS[Role.INVESTIGATOR]
    _, secret = TokenStore(box.home, box.accounts).create(
        box.users[Role.INVESTIGATOR], "up", held, allowed=held
    )
    api = client(box)
    api.headers["Authorization"] = f"Bearer {secret}"
    start = {"case": "2025/9", "reason": "identify a victim in seized media"}
    search = api.post("/api/v1/searches", json=start).json()["search_id"]
    url = f"/api/v1/searches/{search}/photo"
    jpeg = {"Content-Type": "image/jpeg"}

    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_UPLOAD // 65536 + 2):  # no Content-Length: refused while streaming
            yield bytes(65536)

    assert api.put(url, content=chunks(), headers=jpeg).status_code == 413
    assert api.put(url, content=probe_photo[:500], headers=jpeg).status_code == 400
    assert api.put(url, content=bomb_png(10_000, 10_000), headers=jpeg).status_code == 400
    assert (
        api.put(url, content=probe_photo, headers={"Content-Type": "text/plain"}).status_code == 415
    )
    assert api.put(url, content=probe_photo, headers=jpeg).status_code == 200


def test_probe_photos_are_never_written_to_disk(box: Box, probe_photo: bytes) -> None:
    started = time.time()
    browser, csrf = sign_in(box, Role.INVESTIGATOR)
    search = start_search(browser, csrf)
    files = {"photo": ("photo.jpg", probe_photo, "image/jpeg")}
    assert (
        browser.post(f"/search/{search}/photo", data={"csrf_token": csrf}, files=files).status_code
        == 303
    )
    assert browser.post(f"/search/{search}/faces/0", data={"csrf_token": csrf}).status_code == 303
    marker = probe_photo[len(probe_photo) // 2 : len(probe_photo) // 2 + 64]
    written = []
    for root in (box.home, Path(tempfile.gettempdir())):
        for path in root.rglob("*"):
            try:
                if (
                    path.is_file()
                    and path.stat().st_mtime >= started
                    and marker in path.read_bytes()
                ):
                    written.append(path)
            except OSError:
                continue  # another process's file, gone or unreadable
    assert not written, f"probe bytes found on disk: {written}"
    searches = box.audit.query(case="2025/0042", action=AuditAction.SEARCH, limit=1)
    assert searches[0].event.probe_sha256 == hashlib.sha256(probe_photo).hexdigest()


# -- the audit log -----------------------------------------------------------------------------


def test_z_a_modified_audit_file_is_caught_by_edgeid_audit_verify(box: Box) -> None:
    """Runs last in this module: it leaves the box's audit log tampered."""
    sign_in(box, Role.SUPERVISOR)  # one more record through the web
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    command = [sys.executable, "-m", "edgeid", "audit", "verify", "--home", str(box.home)]
    clean = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert clean.returncode == 0, clean.stderr
    log = box.home / "audit" / "audit.log"
    data = bytearray(log.read_bytes())
    data[len(data) // 2] ^= 0x01
    log.write_bytes(bytes(data))
    tampered = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert tampered.returncode == 1
    assert "fails verification" in tampered.stderr
