"""Nothing personal in clear at rest or in the service's log: a full web flow on the real app
and box, every name, label, case number and reason a canary, then every file of the state
directory and every line the service logged (all loggers at DEBUG, and the access log) is
scanned for them in UTF-8, UTF-16, JSON, URL, hex and base64 forms."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from urllib.parse import quote, quote_plus

import httpx
import pytest
from fastapi.testclient import TestClient
from test_gallery_store import _hits, _text_needles
from web_support import (
    OFFICE,
    PASSWORD,
    PEOPLE,
    Box,
    build_box,
    csrf_of,
    free_port,
    lfw_image,
    serving,
    sign_in,
)

from edgeid.runtime.accounts.roles import Role
from edgeid.runtime.web.access_log import ACCESS_LOGGER, RouteAccessLog
from edgeid.runtime.web.server import access_logged

# Each canary holds a word found nowhere else, so that any encoding that keeps a word whole
# (a URL, a repr, a traceback) still shows it.
CANARIES = {
    "user": ("quillon.marrowbyte", "marrowbyte"),
    "gallery": ("Zephyrine Canary Gallery", "Zephyrine"),
    "subject": ("Ottoline Brackwater-Canary", "Brackwater"),
    "notes": ("seen near the Thornquist harbour", "Thornquist"),
    "legal basis": ("warrant Quorvane 17/2025", "Quorvane"),
    "case": ("CASE-Vexmoor-4471", "Vexmoor"),
    "reason": ("identify a periwinkle lantern victim", "periwinkle"),
    "token label": ("Glimmerdusk canary script", "Glimmerdusk"),
    "proposal reason": ("grant for the Sablewick operation", "Sablewick"),
}
USER, GALLERY, SUBJECT = CANARIES["user"][0], CANARIES["gallery"][0], CANARIES["subject"][0]
CASE, REASON = CANARIES["case"][0], CANARIES["reason"][0]
NEW_PERSON = ("Amelie_Mauresmo", 1)  # in no gallery of the box yet
# The test's own HTTP client logs the URLs it requests; it is not the service.
CLIENT_LOGGERS = ("httpx", "httpcore")


def _needles() -> dict[str, bytes]:
    needles = {}
    for what, (text, word) in CANARIES.items():
        needles |= {f"{what} {k}": v for k, v in _text_needles(text).items()}
        needles[f"{what} url"] = quote(text).encode()
        needles[f"{what} url-plus"] = quote_plus(text).encode()
        for form in ("utf-8", "utf-16-le", "utf-16-be"):
            needles[f"{what} word {form}"] = word.encode(form)
            needles[f"{what} lower word {form}"] = word.lower().encode(form)
        needles[f"{what} word hex"] = word.encode().hex().encode()
    return needles


def _service_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every service record as the journal would get it: message and formatted traceback."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [formatter.format(r) for r in caplog.records if not r.name.startswith(CLIENT_LOGGERS)]


def _log_leaks(lines: list[str]) -> list[str]:
    text = "\n".join(lines)
    found = [
        f"{what}: {form!r}"
        for what, (full, word) in CANARIES.items()
        for form in (full, word, quote(full), quote_plus(full))
        if form.lower() in text.lower()
    ]
    return found


def _browser(app: RouteAccessLog, scheme: str = "https") -> TestClient:
    return TestClient(app, base_url=f"{scheme}://testserver", follow_redirects=False)


def _sign_in_first_time(app: RouteAccessLog, username: str, once: str) -> tuple[TestClient, str]:
    browser = _browser(app)
    page = browser.get("/login")
    signed = browser.post(
        "/login", data={"username": username, "password": once, "csrf_token": csrf_of(page.text)}
    )
    assert signed.status_code == 303
    form = browser.get("/account/password")
    changed = browser.post(
        "/account/password",
        data={
            "csrf_token": csrf_of(form.text),
            "current_password": once,
            "new_password": PASSWORD,
            "repeat_password": PASSWORD,
        },
    )
    assert changed.status_code == 303, changed.text[:300]
    return browser, csrf_of(browser.get("/account/tokens").text)


def test_a_full_web_flow_leaves_no_canary_on_disk_or_in_the_log(
    tmp_path: Path,
    lfw_dir: Path,
    models_dir: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    box = build_box(tmp_path / "box", lfw_dir, models_dir)
    try:
        caplog.set_level(logging.DEBUG)  # every logger, every level
        app = access_logged(box.app)  # as make_server wraps the app
        _flow(box, app, lfw_dir)
        # The real server in front of the same app: uvicorn's own output is scanned too.
        with serving(box.app, box.settings, free_port()) as url:
            quoted = quote(GALLERY)
            reply = httpx.get(
                f"{url}/galleries/{quoted}/subjects?case={quote_plus(CASE)}",
                verify=False,
                timeout=30,
            )
            assert reply.status_code == 303  # to the login page: no session
        # uvicorn logs to stderr through its own handlers, which caplog does not see.
        printed = capfd.readouterr()
    finally:
        box.close()

    log = _service_log(caplog)
    access = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]
    for line in (
        "POST /admin/users/{username} 303",
        "POST /admin/galleries 303",
        "POST /enrol 303",
        "POST /search 303",
        "POST /account/tokens 200",
        "GET /api/v1/galleries/{gallery}/subjects 200",
        "GET /audit 200",
        "GET /galleries/{gallery}/subjects 303",  # through uvicorn
    ):
        assert any(a.startswith(line + " ") for a in access), f"no access line {line!r}"
    assert not _log_leaks(log), f"canaries in the service log: {_log_leaks(log)}"
    assert not _log_leaks([printed.out, printed.err]), "canaries printed by the server"
    hits = _hits(box.home, _needles())
    assert not hits, f"canaries in clear under the state directory: {hits[:8]}"


def _flow(box: Box, app: RouteAccessLog, lfw_dir: Path) -> None:
    admin, csrf = sign_in(box, Role.ADMIN)
    admin = _rebind(admin, app)
    grant_reason = CANARIES["proposal reason"][0]
    made = admin.post(
        "/admin/users",
        data={
            "csrf_token": csrf,
            "username": USER,
            "role": "investigator",
            "gallery": OFFICE,
            "reason": grant_reason,
        },
    )
    once = re.search(r'<code class="token">([^<]+)</code>', made.text)
    assert made.status_code == 200 and once is not None
    assert admin.post("/admin/galleries", data={"csrf_token": csrf, "name": GALLERY}).status_code
    assert (
        admin.post(
            f"/admin/users/{USER}",
            data={
                "csrf_token": csrf,
                "role": "investigator",
                "gallery": [OFFICE, GALLERY],
                "reason": grant_reason,
            },
        ).status_code
        == 303
    )
    # Gallery grants wait for a second person (sealed proposals, scanned below as well).
    supervisor, scsrf = sign_in(box, Role.SUPERVISOR)
    supervisor = _rebind(supervisor, app)
    waiting = re.findall(
        r'action="/approvals/([0-9a-f]+)/approve"', supervisor.get("/approvals").text
    )
    assert waiting
    for proposal_id in waiting:
        approved = supervisor.post(f"/approvals/{proposal_id}/approve", data={"csrf_token": scsrf})
        assert approved.status_code == 303
    assert admin.get(f"/admin/users/{USER}").status_code == 200

    browser, ucsrf = _sign_in_first_time(app, USER, once.group(1))
    photo = lfw_image(lfw_dir, *NEW_PERSON).read_bytes()
    enrolled = browser.post(
        "/enrol",
        data={
            "csrf_token": ucsrf,
            "gallery": GALLERY,
            "display_name": SUBJECT,
            "legal_basis": CANARIES["legal basis"][0],
            "notes": CANARIES["notes"][0],
        },
        files={"photo": ("upload.jpg", photo)},
    )
    assert enrolled.status_code == 303, enrolled.text[:300]
    # Browsing the gallery needs the case and reason the session works on (recorded, sealed).
    stated = browser.post("/context", data={"csrf_token": ucsrf, "case": CASE, "reason": REASON})
    assert stated.status_code == 303
    assert SUBJECT in browser.get(enrolled.headers["location"]).text
    assert browser.get(f"/galleries/{GALLERY}/subjects", params={"q": SUBJECT}).status_code == 200

    person, _, probe = PEOPLE[0]
    form = {"case": CASE, "reason": REASON, "csrf_token": ucsrf}
    search = browser.post("/search", data=form)
    assert search.status_code == 303
    where = search.headers["location"]
    probe_photo = lfw_image(lfw_dir, person, probe).read_bytes()
    upload = browser.post(
        f"{where}/photo", data={"csrf_token": ucsrf}, files={"photo": ("p.jpg", probe_photo)}
    )
    assert upload.status_code == 303
    assert browser.post(f"{where}/faces/0", data={"csrf_token": ucsrf}).status_code == 303
    kept = browser.get(f"{where}/faces/0", follow_redirects=True)  # now in the search history
    assert kept.status_code == 200 and "/searches/" in str(kept.url)

    token_page = browser.post(
        "/account/tokens",
        data={
            "csrf_token": ucsrf,
            "name": CANARIES["token label"][0],
            "scope": ["search", "subjects:read"],
        },
    )
    secret = re.search(r'<code class="token">(edgeid_[^<]+)</code>', token_page.text)
    assert token_page.status_code == 200 and secret is not None
    api = _browser(app)
    api.headers["Authorization"] = f"Bearer {secret.group(1)}"
    api.headers["Edgeid-Case"] = quote(CASE)
    api.headers["Edgeid-Reason"] = quote(REASON)  # the canaries travel in headers too
    listed = api.get(f"/api/v1/galleries/{GALLERY}/subjects")
    assert listed.status_code == 200 and SUBJECT in listed.text
    assert api.get(f"/api/v1/galleries/{GALLERY} missing/subjects").status_code == 403

    supervisor, _ = sign_in(box, Role.SUPERVISOR)
    supervisor = _rebind(supervisor, app)
    audit = supervisor.get("/audit", params={"case": CASE, "user": USER})
    assert audit.status_code == 200 and CASE in audit.text


def _rebind(browser: TestClient, app: RouteAccessLog) -> TestClient:
    """The same signed-in session, its requests now through the access log."""
    through = _browser(app)
    through.cookies = browser.cookies
    return through
