"""Accountability at every door: each web page, API operation (and, in test_every_command.py,
each CLI command) is classified, and what reveals or changes personal data writes exactly one
audit record, with the right action, actor and justification, before it answers.

A route added without a class here fails ``test_every_route_is_classified``: whoever adds a
door says what it does with personal data, and the exercise below proves it.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from enum import Enum
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.routing import Mount
from web_support import (
    OFFICE,
    PASSWORD,
    PEOPLE,
    WORK_CASE,
    WORK_HEADERS,
    WORK_REASON,
    Box,
    all_routes,
    build_box,
    central_face,
    client,
    csrf_of,
    lfw_image,
    sign_in,
    tls_settings,
    work_on,
)

from edgeid.runtime.accounts.roles import ROLE_PERMISSIONS, Role
from edgeid.runtime.accounts.tokens import TokenStore
from edgeid.runtime.accounts.users import UserStore
from edgeid.runtime.audit import AuditAction, AuditRecord
from edgeid.runtime.audit.events import CASE_REQUIRED

CASE = "DOOR-2026/7"
REASON = "identifying a victim in media seized under warrant W-7"
SEARCH_REASON = "a photo from the seized phone, to identify the child"


class Kind(Enum):
    REVEALS = "reveals personal or biometric data"
    CHANGES = "changes personal data, accounts or access"
    SHOWS_AGAIN = "shows the same session again what a recorded action revealed"
    NEITHER = "neither: own uploads, forms, lists of ids, health"


@dataclass(frozen=True)
class Door:
    kind: Kind
    action: AuditAction | None = None
    justified: bool = False  # the record carries a case number and a reason
    # An approval also carries out the change it approves: that change's own record follows.
    then: AuditAction | None = None
    # A kept search's pages: the record carries the case and reason stated when the search
    # was run (a search cannot exist without them), so there is no unjustified attempt.
    kept_search: bool = False

    @property
    def actions(self) -> list[AuditAction]:
        return [a for a in (self.action, self.then) if a is not None]


def reveals(action: AuditAction) -> Door:
    return Door(Kind.REVEALS, action, justified=action in CASE_REQUIRED)


def changes(
    action: AuditAction, *, justified: bool = False, then: AuditAction | None = None
) -> Door:
    return Door(Kind.CHANGES, action, justified=justified, then=then)


def reveals_kept(action: AuditAction) -> Door:
    return Door(Kind.REVEALS, action, justified=True, kept_search=True)


NEITHER = Door(Kind.NEITHER)
SHOWS_AGAIN = Door(Kind.SHOWS_AGAIN)

API = "/api/v1"
WEB_DOORS: dict[tuple[str, str], Door] = {
    # Sign-in and one's own account
    ("GET", "/"): NEITHER,
    ("GET", "/login"): NEITHER,
    ("POST", "/login"): changes(AuditAction.LOGIN),
    ("POST", "/logout"): changes(AuditAction.LOGOUT),
    ("GET", "/account/password"): NEITHER,
    ("POST", "/account/password"): changes(AuditAction.PASSWORD_CHANGED),
    ("GET", "/account/tokens"): NEITHER,
    ("POST", "/account/tokens"): changes(AuditAction.TOKEN_CREATED),
    ("POST", "/account/tokens/{token_id}/revoke"): changes(AuditAction.TOKEN_REVOKED),
    ("GET", "/context"): NEITHER,
    ("POST", "/context"): changes(AuditAction.WORK_CONTEXT_SET, justified=True),
    # Search: the case and reason come first (no record yet: nothing is revealed), the photo is
    # the investigator's own, the search itself is the reveal.
    ("GET", "/search"): NEITHER,
    ("POST", "/search"): NEITHER,
    ("GET", "/search/{search_id}"): NEITHER,
    ("POST", "/search/{search_id}/photo"): NEITHER,
    ("GET", "/search/{search_id}/photo.jpg"): NEITHER,
    ("GET", "/search/{search_id}/faces/{face_index}/chip.jpg"): NEITHER,
    ("POST", "/search/{search_id}/faces/{face_index}"): reveals(AuditAction.SEARCH),
    ("GET", "/search/{search_id}/faces/{face_index}"): SHOWS_AGAIN,
    # The same candidates judged for another age band: a new answer, recorded like a search.
    ("POST", "/search/{search_id}/faces/{face_index}/age-band"): reveals(AuditAction.SEARCH),
    # Kept searches (the user's, across sessions): shown again to another session, a result
    # is recorded like a search; opening a candidate reveals its name and photos; decisions
    # live only in that comparison.
    ("GET", "/searches"): NEITHER,  # cases, modes, counts: no name, no face
    ("GET", "/searches/{search_id}"): reveals_kept(AuditAction.SEARCH),
    ("GET", "/searches/{search_id}/probe.jpg"): NEITHER,  # the investigator's own probe
    ("GET", "/searches/{search_id}/candidates/{face_id}"): reveals_kept(AuditAction.SUBJECT_VIEWED),
    ("GET", "/searches/{search_id}/candidates/{face_id}/faces/{enrolled_id}.jpg"): reveals_kept(
        AuditAction.FACE_VIEWED
    ),
    ("POST", "/searches/{search_id}/candidates/{face_id}/decision"): changes(
        AuditAction.DECISION, justified=True
    ),
    # Cases
    ("GET", "/cases"): NEITHER,
    ("POST", "/cases"): NEITHER,
    ("GET", "/cases/new/{entry_id}"): NEITHER,
    ("POST", "/cases/new/{entry_id}/archive"): changes(AuditAction.CASE_INGESTED, justified=True),
    ("GET", "/cases/jobs/{job_id}"): NEITHER,
    ("POST", "/cases/jobs/{job_id}/stop"): NEITHER,
    ("GET", "/cases/{case_id}"): reveals(AuditAction.CASE_VIEWED),
    ("GET", "/cases/{case_id}/faces/{face_id}.jpg"): reveals(AuditAction.CASE_VIEWED),
    # Finds or keeps (sealed) the user's review of a lead, then sends to the comparison view,
    # which records what it reveals.
    ("GET", "/cases/{case_id}/clusters/{number}/leads/{face_id}"): NEITHER,
    ("GET", "/cases/{case_id}/report.html"): reveals(AuditAction.CASE_REPORT),
    # Galleries, subjects, enrolment, erasure
    ("GET", "/galleries"): NEITHER,
    ("GET", "/galleries/{gallery}/subjects"): reveals(AuditAction.SUBJECTS_LISTED),
    ("GET", "/galleries/{gallery}/subjects/{subject_id}"): reveals(AuditAction.SUBJECT_VIEWED),
    ("GET", "/galleries/{gallery}/faces/{face_id}/thumbnail.jpg"): reveals(AuditAction.FACE_VIEWED),
    ("GET", "/galleries/{gallery}/subjects/{subject_id}/delete"): reveals(
        AuditAction.SUBJECT_VIEWED
    ),
    ("POST", "/galleries/{gallery}/subjects/{subject_id}/delete"): changes(
        AuditAction.DELETE_SUBJECT
    ),
    ("GET", "/enrol"): NEITHER,
    ("POST", "/enrol"): changes(AuditAction.ENROLL),
    ("GET", "/enrol/{entry_id}"): NEITHER,
    ("GET", "/enrol/{entry_id}/photo.jpg"): NEITHER,
    ("GET", "/enrol/{entry_id}/faces/{face_index}.jpg"): NEITHER,  # the enroller's own upload
    # Another photo of a subject, and edits: the forms show the subject's record.
    ("GET", "/galleries/{gallery}/subjects/{subject_id}/photos"): reveals(
        AuditAction.SUBJECT_VIEWED
    ),
    ("POST", "/galleries/{gallery}/subjects/{subject_id}/photos"): changes(AuditAction.FACE_ADDED),
    ("GET", "/galleries/{gallery}/subjects/{subject_id}/edit"): reveals(AuditAction.SUBJECT_VIEWED),
    ("POST", "/galleries/{gallery}/subjects/{subject_id}/edit"): changes(
        AuditAction.SUBJECT_EDITED, justified=True
    ),
    ("POST", "/enrol/{entry_id}"): changes(AuditAction.ENROLL),
    ("POST", "/enrol/{entry_id}/add"): changes(AuditAction.FACE_ADDED),
    # Administration
    ("GET", "/admin/users"): NEITHER,
    ("POST", "/admin/users"): changes(AuditAction.USER_CREATED),
    ("GET", "/admin/users/{username}"): NEITHER,
    ("POST", "/admin/users/{username}"): changes(AuditAction.USER_DISABLED),
    ("POST", "/admin/users/{username}/password"): changes(AuditAction.PASSWORD_CHANGED),
    ("POST", "/admin/users/{username}/unlock"): changes(AuditAction.LOCK_CLEARED),
    ("GET", "/admin/galleries"): NEITHER,
    ("POST", "/admin/galleries"): changes(AuditAction.GALLERY_CREATED),
    ("GET", "/admin/galleries/{gallery}/delete"): NEITHER,
    # Erasing a whole gallery is proposed by one person and approved by another.
    ("POST", "/admin/galleries/{gallery}/delete"): changes(AuditAction.CHANGE_PROPOSED),
    ("GET", "/approvals"): NEITHER,  # what waits: kinds, proposers, reasons; no subject data
    ("POST", "/approvals/{proposal_id}/approve"): changes(
        AuditAction.CHANGE_APPROVED, then=AuditAction.GALLERY_DELETED
    ),
    ("POST", "/approvals/{proposal_id}/reject"): changes(AuditAction.CHANGE_REJECTED),
    ("GET", "/admin/settings"): NEITHER,
    # Oversight
    ("GET", "/audit"): reveals(AuditAction.AUDIT_VIEWED),
    ("POST", "/audit/export"): reveals(AuditAction.AUDIT_EXPORTED),
    ("GET", "/retention"): NEITHER,  # subject ids and dates, never a name or a face
    ("GET", "/retention/{gallery}/{subject_id}"): NEITHER,  # the erasure's confirmation: ids, dates
    ("POST", "/retention/{gallery}/{subject_id}"): changes(AuditAction.DELETE_SUBJECT),
    ("GET", "/healthz"): NEITHER,
    ("GET", "/health"): NEITHER,
    ("GET", "/metrics"): NEITHER,  # health figures for Prometheus: loopback or a health token
    # The API
    ("GET", f"{API}/me"): NEITHER,
    ("GET", f"{API}/openapi.json"): NEITHER,
    ("POST", f"{API}/searches"): NEITHER,
    ("PUT", f"{API}/searches/{{search_id}}/photo"): NEITHER,
    ("GET", f"{API}/searches/{{search_id}}/faces/{{face_index}}/chip.jpg"): NEITHER,
    ("POST", f"{API}/searches/{{search_id}}/faces/{{face_index}}/candidates"): reveals(
        AuditAction.SEARCH
    ),
    ("POST", f"{API}/searches/{{search_id}}/faces/{{face_index}}/rescore"): reveals(
        AuditAction.SEARCH
    ),
    ("GET", f"{API}/search-history"): NEITHER,
    ("GET", f"{API}/search-history/{{history_id}}"): reveals_kept(AuditAction.SEARCH),
    ("GET", f"{API}/search-history/{{history_id}}/candidates/{{face_id}}"): reveals_kept(
        AuditAction.SUBJECT_VIEWED
    ),
    ("POST", f"{API}/search-history/{{history_id}}/candidates/{{face_id}}/decision"): changes(
        AuditAction.DECISION, justified=True
    ),
    ("GET", f"{API}/galleries"): NEITHER,
    ("POST", f"{API}/galleries"): changes(AuditAction.GALLERY_CREATED),
    ("DELETE", f"{API}/galleries/{{gallery}}"): changes(AuditAction.CHANGE_PROPOSED),
    ("GET", f"{API}/approvals"): NEITHER,
    ("POST", f"{API}/approvals/{{proposal_id}}/approve"): changes(
        AuditAction.CHANGE_APPROVED, then=AuditAction.GALLERY_DELETED
    ),
    ("POST", f"{API}/approvals/{{proposal_id}}/reject"): changes(AuditAction.CHANGE_REJECTED),
    ("GET", f"{API}/galleries/{{gallery}}/subjects"): reveals(AuditAction.SUBJECTS_LISTED),
    ("GET", f"{API}/galleries/{{gallery}}/subjects/{{subject_id}}"): reveals(
        AuditAction.SUBJECT_VIEWED
    ),
    ("GET", f"{API}/galleries/{{gallery}}/faces/{{face_id}}/thumbnail.jpg"): reveals(
        AuditAction.FACE_VIEWED
    ),
    ("POST", f"{API}/galleries/{{gallery}}/subjects"): changes(AuditAction.ENROLL),
    ("DELETE", f"{API}/galleries/{{gallery}}/subjects/{{subject_id}}"): changes(
        AuditAction.DELETE_SUBJECT
    ),
    ("GET", f"{API}/audit"): reveals(AuditAction.AUDIT_VIEWED),
    ("GET", f"{API}/health"): NEITHER,
    ("GET", f"{API}/users"): NEITHER,
    ("POST", f"{API}/users"): changes(AuditAction.USER_CREATED),
    ("PATCH", f"{API}/users/{{username}}"): changes(AuditAction.ROLE_CHANGED),
    ("POST", f"{API}/users/{{username}}/password-reset"): changes(AuditAction.PASSWORD_CHANGED),
    ("POST", f"{API}/users/{{username}}/unlock"): changes(AuditAction.LOCK_CLEARED),
    ("GET", f"{API}/tokens"): NEITHER,
    ("DELETE", f"{API}/tokens/{{token_id}}"): changes(AuditAction.TOKEN_REVOKED),
    ("POST", f"{API}/case-ingests"): NEITHER,
    ("PUT", f"{API}/case-ingests/{{ingest_id}}/archive"): changes(
        AuditAction.CASE_INGESTED, justified=True
    ),
    ("GET", f"{API}/case-jobs/{{job_id}}"): NEITHER,
    ("POST", f"{API}/case-jobs/{{job_id}}/stop"): NEITHER,
    ("GET", f"{API}/cases"): NEITHER,
    ("GET", f"{API}/cases/{{case_id}}"): reveals(AuditAction.CASE_VIEWED),
    ("GET", f"{API}/cases/{{case_id}}/faces/{{face_id}}.jpg"): reveals(AuditAction.CASE_VIEWED),
    ("GET", f"{API}/cases/{{case_id}}/report.html"): reveals(AuditAction.CASE_REPORT),
}


def app_routes(box: Box) -> set[tuple[str, str]]:
    """Every (method, path) the app answers, through its included routers."""
    found = set()
    for path, methods, route in all_routes(box.app):
        if isinstance(route, Mount):
            continue  # the static files: stylesheet only
        for method in methods - {"HEAD"}:
            found.add((method, path))
    return found


# -- the box and its people ---------------------------------------------------------------------


@dataclass
class World:
    """Signed-in sessions, tokens and ids the exercises use."""

    box: Box
    lfw_dir: Path
    investigator: TestClient
    csrf: str
    api: TestClient  # the investigator's token, every scope of the role
    supervisor: TestClient
    supervisor_csrf: str
    admin: TestClient
    admin_csrf: str
    admin_api: TestClient
    supervisor_api: TestClient
    case_id: str = ""
    case_face: str = ""
    made: dict[str, str] = field(default_factory=dict)

    @property
    def subject(self) -> str:
        return self.box.subjects[PEOPLE[0][0]]

    @property
    def face(self) -> str:
        return self.box.service.faces(OFFICE, self.subject)[0].face_id

    def photo(self, number: int = 0) -> bytes:
        person, _, probe = PEOPLE[number]
        return lfw_image(self.lfw_dir, person, probe).read_bytes()

    def records_after(self, seq: int) -> list[AuditRecord]:
        return sorted(
            (r for r in self.box.audit.query(limit=1000) if r.seq > seq), key=lambda r: r.seq
        )

    def last_seq(self) -> int:
        newest = self.box.audit.query(limit=1)
        return newest[0].seq if newest else 0


def token_client(box: Box, role: Role) -> TestClient:
    held = ROLE_PERMISSIONS[role]
    _, secret = TokenStore(box.home, box.accounts).create(
        box.users[role], f"doors {role.value}", held, allowed=held
    )
    api = client(box)
    api.headers["Authorization"] = f"Bearer {secret}"
    return api


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, lfw_dir: Path, models_dir: Path
) -> Iterator[World]:
    home = tmp_path_factory.mktemp("doors")
    box = build_box(home, lfw_dir, models_dir, tls_settings(home))
    try:
        investigator, csrf = sign_in(box, Role.INVESTIGATOR)
        supervisor, supervisor_csrf = sign_in(box, Role.SUPERVISOR)
        admin, admin_csrf = sign_in(box, Role.ADMIN)
        yield World(
            box,
            lfw_dir,
            investigator,
            csrf,
            token_client(box, Role.INVESTIGATOR),
            supervisor,
            supervisor_csrf,
            admin,
            admin_csrf,
            token_client(box, Role.ADMIN),
            token_client(box, Role.SUPERVISOR),
        )
    finally:
        box.close()


# -- setting the scene --------------------------------------------------------------------------


def web_search(w: World, photo: bytes | None = None) -> str:
    started = w.investigator.post(
        "/search",
        data={"csrf_token": w.csrf, "case": WORK_CASE, "reason": SEARCH_REASON, "gallery": OFFICE},
    )
    assert started.status_code == 303, started.text
    search_id = started.headers["location"].rsplit("/", 1)[1]
    sent = w.investigator.post(
        f"/search/{search_id}/photo",
        data={"csrf_token": w.csrf},
        files={"photo": ("p.jpg", photo or w.photo())},
    )
    assert sent.status_code == 303, sent.text
    return search_id


def web_searched(w: World) -> tuple[str, str]:
    """A search already run; the id of its top candidate's face."""
    search_id = web_search(w)
    assert (
        w.investigator.post(f"/search/{search_id}/faces/0", data={"csrf_token": w.csrf}).status_code
        == 303
    )
    result = w.box.app.state.web.searches.get(
        w.box.app.state.web.sessions.get(
            w.investigator.cookies.get(w.box.app.state.web.cookie_name)
        ).owner,
        search_id,
    ).results[0]
    return search_id, result.candidates[0].face_id


def api_search(w: World) -> str:
    made = w.api.post(
        f"{API}/searches", json={"case": WORK_CASE, "reason": SEARCH_REASON, "galleries": [OFFICE]}
    )
    assert made.status_code == 201, made.text
    search_id = str(made.json()["search_id"])
    sent = w.api.put(
        f"{API}/searches/{search_id}/photo",
        content=w.photo(),
        headers={"Content-Type": "image/jpeg"},
    )
    assert sent.status_code == 200, sent.text
    return search_id


def new_subject(w: World, name: str) -> str:
    image = lfw_image(w.lfw_dir, PEOPLE[2][0], PEOPLE[2][2]).read_bytes()
    done = w.box.service.enroll(
        OFFICE,
        display_name=name,
        legal_basis="test case 0001",
        enrolled_by="setup",
        image_bytes=image,
        face_index=central_face(w.box.service, image),
        allow_duplicate=True,
        retention_until=date.today() - timedelta(days=1),
    )
    return done.subject.subject_id


def media_zip(w: World) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("phone/a.jpg", w.photo(0))
    return buffer.getvalue()


def ensure_case(w: World) -> None:
    """One case ingested by the investigator (through the API), to open its pages."""
    if w.case_id:
        return
    planned = w.api.post(f"{API}/case-ingests", json={"case": CASE, "reason": REASON})
    assert planned.status_code == 201, planned.text
    started = w.api.put(
        f"{API}/case-ingests/{planned.json()['ingest_id']}/archive",
        content=media_zip(w),
        headers={"Content-Type": "application/zip"},
    )
    assert started.status_code == 202, started.text
    desk = w.box.app.state.web.cases
    job = desk.jobs.get(w.box.users[Role.INVESTIGATOR], started.json()["job_id"])
    assert job.job.wait(timeout=300)
    w.case_id = str(job.case_id or desk.case_id_of(job))
    case = w.box.cases.store.find(CASE) if w.box.cases else None
    assert case is not None
    w.case_face = case.faces()[0].face_id


def case_headers() -> dict[str, str]:
    return {"Edgeid-Case": CASE, "Edgeid-Reason": REASON}


def fresh_user(w: World, name: str) -> None:
    store = UserStore(w.box.home, w.box.accounts)
    if store.get(name) is None:
        _, once = store.create(name, Role.INVESTIGATOR, galleries=[OFFICE])
        store.change_password(name, once, PASSWORD)


# -- one exercise per door that reveals or changes ---------------------------------------------
# Each sets the scene (which may write records of its own) and returns the one request whose
# records are counted.

Request = Callable[[], httpx.Response]
Exercise = Callable[[World], Request]


def _login(w: World) -> Request:
    browser = client(w.box)
    page = browser.get("/login")

    def go() -> httpx.Response:
        return browser.post(
            "/login",
            data={
                "username": w.box.users[Role.SUPERVISOR],
                "password": PASSWORD,
                "csrf_token": csrf_of(page.text),
            },
        )

    return go


def _logout(w: World) -> Request:
    browser, csrf = sign_in(w.box, Role.SUPERVISOR)
    return lambda: browser.post("/logout", data={"csrf_token": csrf})


def _password(w: World) -> Request:
    fresh_user(w, "pw-changer")
    browser = client(w.box)
    page = browser.get("/login")
    browser.post(
        "/login",
        data={"username": "pw-changer", "password": PASSWORD, "csrf_token": csrf_of(page.text)},
    )
    csrf = csrf_of(browser.get("/account/tokens").text)
    new = "another long passphrase here"

    def go() -> httpx.Response:
        return browser.post(
            "/account/password",
            data={
                "csrf_token": csrf,
                "current_password": PASSWORD,
                "new_password": new,
                "repeat_password": new,
            },
        )

    return go


def _token_create(w: World) -> Request:
    return lambda: w.investigator.post(
        "/account/tokens", data={"csrf_token": w.csrf, "name": "door test", "scope": "search"}
    )


def _token_revoke(w: World) -> Request:
    held = ROLE_PERMISSIONS[Role.INVESTIGATOR]
    token, _ = TokenStore(w.box.home, w.box.accounts).create(
        w.box.users[Role.INVESTIGATOR], "to revoke", held, allowed=held
    )
    return lambda: w.investigator.post(
        f"/account/tokens/{token.token_id}/revoke", data={"csrf_token": w.csrf}
    )


def _context(w: World) -> Request:
    return lambda: w.investigator.post(
        "/context", data={"csrf_token": w.csrf, "case": WORK_CASE, "reason": WORK_REASON}
    )


def _search(w: World) -> Request:
    search_id = web_search(w)
    return lambda: w.investigator.post(f"/search/{search_id}/faces/0", data={"csrf_token": w.csrf})


def web_kept(w: World) -> tuple[str, str]:
    """A search run through the pages and kept in the investigator's history: its id there
    and its top candidate's face."""
    search_id, face_id = web_searched(w)
    state = w.box.app.state.web
    owner = state.sessions.get(w.investigator.cookies.get(state.cookie_name)).owner
    return state.searches.get(owner, search_id).records[0], face_id


def _kept_search(w: World) -> Request:
    kept, _ = web_kept(w)
    browser, _ = sign_in(w.box, Role.INVESTIGATOR)  # signed in again: nothing shown yet
    return lambda: browser.get(f"/searches/{kept}")


def _compare(w: World) -> Request:
    kept, face_id = web_kept(w)
    return lambda: w.investigator.get(f"/searches/{kept}/candidates/{face_id}")


def _compare_face(w: World) -> Request:
    kept, face_id = web_kept(w)
    browser, _ = sign_in(w.box, Role.INVESTIGATOR)  # this session was shown no photo
    return lambda: browser.get(
        f"/searches/{kept}/candidates/{face_id}/faces/{face_id}.jpg?size=large&landmarks=on"
    )


def _decision(w: World) -> Request:
    kept, face_id = web_kept(w)
    assert w.investigator.get(f"/searches/{kept}/candidates/{face_id}").status_code == 200
    return lambda: w.investigator.post(
        f"/searches/{kept}/candidates/{face_id}/decision",
        data={"csrf_token": w.csrf, "decision": "rejected"},
    )


def _case_archive(w: World) -> Request:
    planned = w.investigator.post(
        "/cases", data={"csrf_token": w.csrf, "case": "DOOR-WEB/1", "reason": REASON}
    )
    assert planned.status_code == 303, planned.text
    entry = planned.headers["location"].rsplit("/", 1)[1]

    def go() -> httpx.Response:
        reply = w.investigator.post(
            f"/cases/new/{entry}/archive",
            data={"csrf_token": w.csrf},
            files={"archive": ("media.zip", media_zip(w), "application/zip")},
        )
        job = re.search(r"/cases/jobs/([A-Za-z0-9_-]+)", reply.headers.get("location", ""))
        if job:  # wait for its end so the next door finds the box idle (not counted: later)
            found = w.box.app.state.web.cases.jobs.get(w.box.users[Role.INVESTIGATOR], job.group(1))
            pending_waits.append(lambda: found.job.wait(timeout=300))
        return reply

    return go


pending_waits: list[Callable[[], object]] = []


def _case_page(w: World) -> Request:
    ensure_case(w)
    work_on(w.investigator, w.csrf, CASE, REASON)
    return lambda: w.investigator.get(f"/cases/{w.case_id}")


def _case_face(w: World) -> Request:
    ensure_case(w)
    browser, csrf = sign_in(w.box, Role.INVESTIGATOR)  # a session that has not opened the page
    work_on(browser, csrf, CASE, REASON)
    return lambda: browser.get(f"/cases/{w.case_id}/faces/{w.case_face}.jpg")


def _case_report(w: World) -> Request:
    ensure_case(w)
    work_on(w.investigator, w.csrf, CASE, REASON)
    return lambda: w.investigator.get(f"/cases/{w.case_id}/report.html")


def _subjects(w: World) -> Request:
    work_on(w.investigator, w.csrf)
    return lambda: w.investigator.get(f"/galleries/{OFFICE}/subjects")


def _subject(w: World) -> Request:
    work_on(w.investigator, w.csrf)
    return lambda: w.investigator.get(f"/galleries/{OFFICE}/subjects/{w.subject}")


def _thumbnail(w: World) -> Request:
    browser, csrf = sign_in(w.box, Role.INVESTIGATOR)  # nothing shown to this session yet
    work_on(browser, csrf)
    return lambda: browser.get(f"/galleries/{OFFICE}/faces/{w.face}/thumbnail.jpg")


def _delete_confirm(w: World) -> Request:
    work_on(w.investigator, w.csrf)
    return lambda: w.investigator.get(f"/galleries/{OFFICE}/subjects/{w.subject}/delete")


def _delete_subject(w: World) -> Request:
    subject = new_subject(w, "Subject to erase")
    return lambda: w.investigator.post(
        f"/galleries/{OFFICE}/subjects/{subject}/delete",
        data={"csrf_token": w.csrf, "confirm": subject, "reason": "enrolled in error, twice"},
    )


def _enrol_direct(w: World) -> Request:
    return lambda: w.investigator.post(
        "/enrol",
        data={
            "csrf_token": w.csrf,
            "gallery": OFFICE,
            "display_name": "Subject Direct",
            "legal_basis": "court order 12/2026",
        },
        files={"photo": ("n.jpg", lfw_image(w.lfw_dir, "AJ_Lamas", 1).read_bytes())},
    )


def _enrol_pending(w: World, display_name: str) -> str:
    photo = lfw_image(w.lfw_dir, *PEOPLE[0][:1], 5).read_bytes()
    web = w.box.app.state.web
    from edgeid.runtime.web import operations as ops

    principal = _principal(w)
    form = ops.check_enrolment(
        web, principal, gallery=OFFICE, display_name=display_name, legal_basis="order 1/2026"
    )
    return ops.prepare_enrolment(web, principal, form, photo).entry_id


def _principal(w: World):  # type: ignore[no-untyped-def]
    web = w.box.app.state.web
    from edgeid.runtime.web.access import session_principal

    session = web.sessions.get(w.investigator.cookies.get(web.cookie_name))
    return session_principal(web.users.require(session.username), session)


def _enrol_pick(w: World) -> Request:
    entry = _enrol_pending(w, "Subject Picked")
    return lambda: w.investigator.post(
        f"/enrol/{entry}", data={"csrf_token": w.csrf, "face": "0", "allow_duplicate": "yes"}
    )


def _enrol_add(w: World) -> Request:
    entry = _enrol_pending(w, "Subject Added")
    return lambda: w.investigator.post(
        f"/enrol/{entry}/add", data={"csrf_token": w.csrf, "face": "0", "subject_id": w.subject}
    )


def _photo_form(w: World) -> Request:
    work_on(w.investigator, w.csrf)
    return lambda: w.investigator.get(f"/galleries/{OFFICE}/subjects/{w.subject}/photos")


def _photo_add(w: World) -> Request:
    work_on(w.investigator, w.csrf)
    photo = lfw_image(w.lfw_dir, "Amelie_Mauresmo", 1).read_bytes()  # one face: added at once
    return lambda: w.investigator.post(
        f"/galleries/{OFFICE}/subjects/{w.subject}/photos",
        data={"csrf_token": w.csrf, "age_at_capture": "31"},
        files={"photo": ("p.jpg", photo)},
    )


def _edit_form(w: World) -> Request:
    work_on(w.investigator, w.csrf)
    return lambda: w.investigator.get(f"/galleries/{OFFICE}/subjects/{w.subject}/edit")


def _edit(w: World) -> Request:
    subject = new_subject(w, "Subject to edit")
    work_on(w.investigator, w.csrf)
    return lambda: w.investigator.post(
        f"/galleries/{OFFICE}/subjects/{subject}/edit",
        data={
            "csrf_token": w.csrf,
            "display_name": "Subject edited",
            "legal_basis": "test case 0001",
            "notes": "",
            "retention_until": "",
            "reason": "the name was misspelt at enrolment",
        },
    )


def _admin_user_create(w: World) -> Request:
    return lambda: w.admin.post(
        "/admin/users",
        data={"csrf_token": w.admin_csrf, "username": "door-new", "role": "technician"},
    )


def _admin_user_disable(w: World) -> Request:
    fresh_user(w, "door-disable")
    return lambda: w.admin.post(
        "/admin/users/door-disable",
        data={
            "csrf_token": w.admin_csrf,
            "role": "investigator",
            "gallery": OFFICE,
            "disabled": "yes",
        },
    )


def _admin_password(w: World) -> Request:
    fresh_user(w, "door-reset")
    return lambda: w.admin.post(
        "/admin/users/door-reset/password", data={"csrf_token": w.admin_csrf}
    )


def slowed_user(w: World, name: str) -> None:
    """A user whose wrong passwords from one address delay their next sign-in there."""
    fresh_user(w, name)
    for _ in range(8):
        w.box.app.state.web.throttle.failure(name, "10.66.0.1")
    assert w.box.app.state.web.throttle.is_throttled(name)


def _admin_unlock(w: World) -> Request:
    slowed_user(w, "door-unlock")
    return lambda: w.admin.post(
        "/admin/users/door-unlock/unlock", data={"csrf_token": w.admin_csrf}
    )


def _api_unlock(w: World) -> Request:
    slowed_user(w, "door-api-unlock")
    return lambda: w.admin_api.post(f"{API}/users/door-api-unlock/unlock")


def _admin_gallery_create(w: World) -> Request:
    return lambda: w.admin.post(
        "/admin/galleries", data={"csrf_token": w.admin_csrf, "name": "door-gallery"}
    )


def _admin_gallery_delete(w: World) -> Request:
    w.box.service.create_gallery("door-doomed")
    return lambda: w.admin.post(
        "/admin/galleries/door-doomed/delete",
        data={
            "csrf_token": w.admin_csrf,
            "confirm_name": "door-doomed",
            "reason": "the unit was dissolved, data to be erased",
        },
    )


def _audit_page(w: World) -> Request:
    return lambda: w.supervisor.get("/audit")


def _audit_export(w: World) -> Request:
    return lambda: w.supervisor.post("/audit/export", data={"csrf_token": w.supervisor_csrf})


def _retention_erase(w: World) -> Request:
    subject = new_subject(w, "Subject Expired")
    return lambda: w.supervisor.post(
        f"/retention/{OFFICE}/{subject}",
        data={"csrf_token": w.supervisor_csrf, "confirm": subject},
    )


def _api_candidates(w: World) -> Request:
    search_id = api_search(w)
    return lambda: w.api.post(f"{API}/searches/{search_id}/faces/0/candidates", json={"k": 5})


def api_kept(w: World) -> tuple[str, str]:
    search_id = api_search(w)
    found = w.api.post(f"{API}/searches/{search_id}/faces/0/candidates", json={"k": 5}).json()
    return str(found["history_id"]), str(found["candidates"][0]["face_id"])


def _api_kept_search(w: World) -> Request:
    kept, _ = api_kept(w)
    other = token_client(w.box, Role.INVESTIGATOR)  # another token: nothing shown to it yet
    return lambda: other.get(f"{API}/search-history/{kept}")


def _api_compare(w: World) -> Request:
    kept, face_id = api_kept(w)
    return lambda: w.api.get(f"{API}/search-history/{kept}/candidates/{face_id}")


def _api_decision(w: World) -> Request:
    kept, face_id = api_kept(w)
    assert w.api.get(f"{API}/search-history/{kept}/candidates/{face_id}").is_success
    return lambda: w.api.post(
        f"{API}/search-history/{kept}/candidates/{face_id}/decision",
        json={"decision": "confirmed", "note": "matches the scar in the exhibit"},
    )


def _api_gallery_create(w: World) -> Request:
    return lambda: w.admin_api.post(f"{API}/galleries", json={"name": "door-api-gallery"})


def _api_gallery_delete(w: World) -> Request:
    w.box.service.create_gallery("door-api-doomed")
    return lambda: w.admin_api.request(
        "DELETE",
        f"{API}/galleries/door-api-doomed",
        json={"reason": "the unit was dissolved, data to be erased"},
    )


def _api_subjects(w: World) -> Request:
    return lambda: w.api.get(f"{API}/galleries/{OFFICE}/subjects", headers=WORK_HEADERS)


def _api_subject(w: World) -> Request:
    return lambda: w.api.get(f"{API}/galleries/{OFFICE}/subjects/{w.subject}", headers=WORK_HEADERS)


def _api_thumbnail(w: World) -> Request:
    api = token_client(w.box, Role.INVESTIGATOR)  # a token shown nothing yet
    return lambda: api.get(
        f"{API}/galleries/{OFFICE}/faces/{w.face}/thumbnail.jpg", headers=WORK_HEADERS
    )


def _api_enrol(w: World) -> Request:
    photo = lfw_image(w.lfw_dir, "Aaron_Guiel", 1).read_bytes()
    return lambda: w.api.post(
        f"{API}/galleries/{OFFICE}/subjects",
        data={"display_name": "Subject API", "legal_basis": "court order 13/2026"},
        files={"photo": ("p.jpg", photo)},
    )


def _api_erase(w: World) -> Request:
    subject = new_subject(w, "Subject API erase")
    return lambda: w.api.request(
        "DELETE",
        f"{API}/galleries/{OFFICE}/subjects/{subject}",
        json={"reason": "enrolled in error, twice"},
    )


def _api_audit(w: World) -> Request:
    return lambda: w.supervisor_api.get(f"{API}/audit")


def _api_user_create(w: World) -> Request:
    return lambda: w.admin_api.post(
        f"{API}/users", json={"username": "door-api-new", "role": "technician"}
    )


def _api_user_patch(w: World) -> Request:
    fresh_user(w, "door-api-role")
    return lambda: w.admin_api.patch(f"{API}/users/door-api-role", json={"role": "technician"})


def _api_password_reset(w: World) -> Request:
    fresh_user(w, "door-api-reset")
    return lambda: w.admin_api.post(f"{API}/users/door-api-reset/password-reset")


def _api_token_revoke(w: World) -> Request:
    held = ROLE_PERMISSIONS[Role.INVESTIGATOR]
    token, _ = TokenStore(w.box.home, w.box.accounts).create(
        w.box.users[Role.INVESTIGATOR], "api revoke", held, allowed=held
    )
    return lambda: w.api.request("DELETE", f"{API}/tokens/{token.token_id}")


def _api_case_archive(w: World) -> Request:
    planned = w.api.post(f"{API}/case-ingests", json={"case": "DOOR-API/2", "reason": REASON})
    assert planned.status_code == 201, planned.text

    def go() -> httpx.Response:
        reply = w.api.put(
            f"{API}/case-ingests/{planned.json()['ingest_id']}/archive",
            content=media_zip(w),
            headers={"Content-Type": "application/zip"},
        )
        if reply.status_code == 202:
            desk = w.box.app.state.web.cases
            found = desk.jobs.get(w.box.users[Role.INVESTIGATOR], reply.json()["job_id"])
            pending_waits.append(lambda: found.job.wait(timeout=300))
        return reply

    return go


def _api_case(w: World) -> Request:
    ensure_case(w)
    return lambda: w.api.get(f"{API}/cases/{w.case_id}", headers=case_headers())


def _api_case_face(w: World) -> Request:
    ensure_case(w)
    api = token_client(w.box, Role.INVESTIGATOR)
    return lambda: api.get(
        f"{API}/cases/{w.case_id}/faces/{w.case_face}.jpg", headers=case_headers()
    )


def _api_case_report(w: World) -> Request:
    ensure_case(w)
    return lambda: w.api.get(f"{API}/cases/{w.case_id}/report.html", headers=case_headers())


def _propose_erasure(w: World, gallery: str) -> str:
    """An admin's proposal to erase ``gallery`` (recorded when made: not counted)."""
    w.box.service.create_gallery(gallery)
    asked = w.admin_api.request(
        "DELETE", f"{API}/galleries/{gallery}", json={"reason": "the unit was dissolved"}
    )
    assert asked.status_code == 202, asked.text
    return str(asked.json()["proposal_id"])


def _approve(w: World) -> Request:
    pid = _propose_erasure(w, "door-approve")
    return lambda: w.supervisor.post(
        f"/approvals/{pid}/approve", data={"csrf_token": w.supervisor_csrf}
    )


def _reject(w: World) -> Request:
    pid = _propose_erasure(w, "door-reject")
    return lambda: w.supervisor.post(
        f"/approvals/{pid}/reject", data={"csrf_token": w.supervisor_csrf}
    )


def _api_approve(w: World) -> Request:
    pid = _propose_erasure(w, "door-api-approve")
    return lambda: w.supervisor_api.post(f"{API}/approvals/{pid}/approve")


def _api_reject(w: World) -> Request:
    pid = _propose_erasure(w, "door-api-reject")
    return lambda: w.supervisor_api.post(f"{API}/approvals/{pid}/reject")


def _rescore(w: World) -> Request:
    search_id, _ = web_searched(w)
    return lambda: w.investigator.post(
        f"/search/{search_id}/faces/0/age-band", data={"csrf_token": w.csrf, "age_band": "adult"}
    )


def _api_rescore(w: World) -> Request:
    search_id = api_search(w)
    assert w.api.post(f"{API}/searches/{search_id}/faces/0/candidates", json={"k": 5}).is_success
    return lambda: w.api.post(
        f"{API}/searches/{search_id}/faces/0/rescore", json={"age_band": "adult"}
    )


EXERCISES: dict[tuple[str, str], Exercise] = {
    ("POST", "/search/{search_id}/faces/{face_index}/age-band"): _rescore,
    ("POST", f"{API}/searches/{{search_id}}/faces/{{face_index}}/rescore"): _api_rescore,
    ("POST", "/approvals/{proposal_id}/approve"): _approve,
    ("POST", "/approvals/{proposal_id}/reject"): _reject,
    ("POST", f"{API}/approvals/{{proposal_id}}/approve"): _api_approve,
    ("POST", f"{API}/approvals/{{proposal_id}}/reject"): _api_reject,
    ("POST", "/login"): _login,
    ("POST", "/logout"): _logout,
    ("POST", "/account/password"): _password,
    ("POST", "/account/tokens"): _token_create,
    ("POST", "/account/tokens/{token_id}/revoke"): _token_revoke,
    ("POST", "/context"): _context,
    ("POST", "/search/{search_id}/faces/{face_index}"): _search,
    ("GET", "/searches/{search_id}"): _kept_search,
    ("GET", "/searches/{search_id}/candidates/{face_id}"): _compare,
    ("GET", "/searches/{search_id}/candidates/{face_id}/faces/{enrolled_id}.jpg"): _compare_face,
    ("POST", "/searches/{search_id}/candidates/{face_id}/decision"): _decision,
    ("POST", "/cases/new/{entry_id}/archive"): _case_archive,
    ("GET", "/cases/{case_id}"): _case_page,
    ("GET", "/cases/{case_id}/faces/{face_id}.jpg"): _case_face,
    ("GET", "/cases/{case_id}/report.html"): _case_report,
    ("GET", "/galleries/{gallery}/subjects"): _subjects,
    ("GET", "/galleries/{gallery}/subjects/{subject_id}"): _subject,
    ("GET", "/galleries/{gallery}/faces/{face_id}/thumbnail.jpg"): _thumbnail,
    ("GET", "/galleries/{gallery}/subjects/{subject_id}/delete"): _delete_confirm,
    ("POST", "/galleries/{gallery}/subjects/{subject_id}/delete"): _delete_subject,
    ("POST", "/enrol"): _enrol_direct,
    ("POST", "/enrol/{entry_id}"): _enrol_pick,
    ("POST", "/enrol/{entry_id}/add"): _enrol_add,
    ("GET", "/galleries/{gallery}/subjects/{subject_id}/photos"): _photo_form,
    ("POST", "/galleries/{gallery}/subjects/{subject_id}/photos"): _photo_add,
    ("GET", "/galleries/{gallery}/subjects/{subject_id}/edit"): _edit_form,
    ("POST", "/galleries/{gallery}/subjects/{subject_id}/edit"): _edit,
    ("POST", "/admin/users"): _admin_user_create,
    ("POST", "/admin/users/{username}"): _admin_user_disable,
    ("POST", "/admin/users/{username}/password"): _admin_password,
    ("POST", "/admin/users/{username}/unlock"): _admin_unlock,
    ("POST", "/admin/galleries"): _admin_gallery_create,
    ("POST", "/admin/galleries/{gallery}/delete"): _admin_gallery_delete,
    ("GET", "/audit"): _audit_page,
    ("POST", "/audit/export"): _audit_export,
    ("POST", "/retention/{gallery}/{subject_id}"): _retention_erase,
    ("POST", f"{API}/searches/{{search_id}}/faces/{{face_index}}/candidates"): _api_candidates,
    ("GET", f"{API}/search-history/{{history_id}}"): _api_kept_search,
    ("GET", f"{API}/search-history/{{history_id}}/candidates/{{face_id}}"): _api_compare,
    ("POST", f"{API}/search-history/{{history_id}}/candidates/{{face_id}}/decision"): (
        _api_decision
    ),
    ("POST", f"{API}/galleries"): _api_gallery_create,
    ("DELETE", f"{API}/galleries/{{gallery}}"): _api_gallery_delete,
    ("GET", f"{API}/galleries/{{gallery}}/subjects"): _api_subjects,
    ("GET", f"{API}/galleries/{{gallery}}/subjects/{{subject_id}}"): _api_subject,
    ("GET", f"{API}/galleries/{{gallery}}/faces/{{face_id}}/thumbnail.jpg"): _api_thumbnail,
    ("POST", f"{API}/galleries/{{gallery}}/subjects"): _api_enrol,
    ("DELETE", f"{API}/galleries/{{gallery}}/subjects/{{subject_id}}"): _api_erase,
    ("GET", f"{API}/audit"): _api_audit,
    ("POST", f"{API}/users"): _api_user_create,
    ("PATCH", f"{API}/users/{{username}}"): _api_user_patch,
    ("POST", f"{API}/users/{{username}}/password-reset"): _api_password_reset,
    ("POST", f"{API}/users/{{username}}/unlock"): _api_unlock,
    ("DELETE", f"{API}/tokens/{{token_id}}"): _api_token_revoke,
    ("PUT", f"{API}/case-ingests/{{ingest_id}}/archive"): _api_case_archive,
    ("GET", f"{API}/cases/{{case_id}}"): _api_case,
    ("GET", f"{API}/cases/{{case_id}}/faces/{{face_id}}.jpg"): _api_case_face,
    ("GET", f"{API}/cases/{{case_id}}/report.html"): _api_case_report,
}

COUNTED = sorted(k for k, door in WEB_DOORS.items() if door.kind in (Kind.REVEALS, Kind.CHANGES))
ACTIONS_SEEN: set[AuditAction] = set()


# -- the tests ----------------------------------------------------------------------------------


def test_every_route_is_classified(world: World) -> None:
    """A new page or API operation must be given a class here (and an exercise if it reveals
    or changes personal data); a class for a route that no longer exists is stale."""
    routes = app_routes(world.box)
    unclassified = sorted(routes - WEB_DOORS.keys())
    stale = sorted(WEB_DOORS.keys() - routes)
    assert not unclassified, f"classify these routes in WEB_DOORS: {unclassified}"
    assert not stale, f"these classified routes no longer exist: {stale}"
    assert set(COUNTED) == set(EXERCISES), "every revealing or changing door needs an exercise"


@pytest.mark.parametrize("door", COUNTED, ids=lambda d: f"{d[0]} {d[1]}")
def test_each_revealing_or_changing_door_writes_exactly_one_record(
    world: World, door: tuple[str, str]
) -> None:
    expected = WEB_DOORS[door]
    go = EXERCISES[door](world)
    before = world.last_seq()
    reply = go()
    assert reply.status_code < 400, f"{door}: {reply.status_code} {reply.text[:300]}"
    while pending_waits:
        pending_waits.pop()()
    new = [r for r in world.records_after(before) if r.event.action is not AuditAction.SEARCH]
    if expected.action is AuditAction.SEARCH or door[1].endswith("/archive"):
        # a case ingest's cluster searches follow it, each recorded; the door's own is first
        new = world.records_after(before)[:1]
    actions = [r.event.action for r in new]
    assert actions == expected.actions, f"{door}: wrote {actions}, expected {expected.actions}"
    event = new[0].event
    assert event.user and event.role, f"{door}: the record names no actor"
    if expected.justified:
        assert event.case and event.reason, f"{door}: the record carries no case and reason"
    ACTIONS_SEEN.update(expected.actions)


# -- without a justification: refused, nothing revealed, nothing recorded ----------------------


def _fresh_session(w: World) -> TestClient:
    browser, _ = sign_in(w.box, Role.INVESTIGATOR)  # signed in, no case stated
    return browser


def _bare_api(w: World) -> TestClient:
    return token_client(w.box, Role.INVESTIGATOR)


def _page_without_context(url: Callable[[World], str]) -> Exercise:
    def setup(w: World) -> Request:
        browser = _fresh_session(w)
        return lambda: browser.get(url(w))

    return setup


def _api_without(url: Callable[[World], str], headers: dict[str, str] | None = None) -> Exercise:
    def setup(w: World) -> Request:
        api = _bare_api(w)
        return lambda: api.get(url(w), headers=headers or {})

    return setup


UNJUSTIFIED: dict[tuple[str, str], Exercise] = {
    ("GET", "/galleries/{gallery}/subjects"): _page_without_context(
        lambda w: f"/galleries/{OFFICE}/subjects"
    ),
    ("GET", "/galleries/{gallery}/subjects/{subject_id}"): _page_without_context(
        lambda w: f"/galleries/{OFFICE}/subjects/{w.subject}"
    ),
    ("GET", "/galleries/{gallery}/faces/{face_id}/thumbnail.jpg"): _page_without_context(
        lambda w: f"/galleries/{OFFICE}/faces/{w.face}/thumbnail.jpg"
    ),
    ("GET", "/galleries/{gallery}/subjects/{subject_id}/delete"): _page_without_context(
        lambda w: f"/galleries/{OFFICE}/subjects/{w.subject}/delete"
    ),
    ("GET", "/galleries/{gallery}/subjects/{subject_id}/photos"): _page_without_context(
        lambda w: f"/galleries/{OFFICE}/subjects/{w.subject}/photos"
    ),
    ("GET", "/galleries/{gallery}/subjects/{subject_id}/edit"): _page_without_context(
        lambda w: f"/galleries/{OFFICE}/subjects/{w.subject}/edit"
    ),
    ("GET", "/cases/{case_id}"): _page_without_context(lambda w: f"/cases/{w.case_id}"),
    ("GET", "/cases/{case_id}/faces/{face_id}.jpg"): _page_without_context(
        lambda w: f"/cases/{w.case_id}/faces/{w.case_face}.jpg"
    ),
    ("GET", "/cases/{case_id}/report.html"): _page_without_context(
        lambda w: f"/cases/{w.case_id}/report.html"
    ),
    # A search cannot exist without its case and reason: starting one without them is refused.
    ("POST", "/search/{search_id}/faces/{face_index}"): lambda w: (
        lambda: w.investigator.post(
            "/search",
            data={"csrf_token": w.csrf, "case": WORK_CASE, "reason": "look", "gallery": OFFICE},
        )
    ),
    ("POST", "/search/{search_id}/faces/{face_index}/age-band"): lambda w: (
        lambda: w.investigator.post(
            "/search",
            data={"csrf_token": w.csrf, "case": "", "reason": SEARCH_REASON, "gallery": OFFICE},
        )
    ),
    ("POST", f"{API}/searches/{{search_id}}/faces/{{face_index}}/rescore"): lambda w: (
        lambda: w.api.post(
            f"{API}/searches", json={"case": WORK_CASE, "reason": "", "galleries": [OFFICE]}
        )
    ),
    ("GET", f"{API}/galleries/{{gallery}}/subjects"): _api_without(
        lambda w: f"{API}/galleries/{OFFICE}/subjects"
    ),
    ("GET", f"{API}/galleries/{{gallery}}/subjects/{{subject_id}}"): _api_without(
        lambda w: f"{API}/galleries/{OFFICE}/subjects/{w.subject}",
        {"Edgeid-Case": WORK_CASE},  # a case but no reason
    ),
    ("GET", f"{API}/galleries/{{gallery}}/faces/{{face_id}}/thumbnail.jpg"): _api_without(
        lambda w: f"{API}/galleries/{OFFICE}/faces/{w.face}/thumbnail.jpg"
    ),
    ("POST", f"{API}/searches/{{search_id}}/faces/{{face_index}}/candidates"): (
        lambda w: (
            lambda: w.api.post(
                f"{API}/searches",
                json={"case": "bad case!", "reason": SEARCH_REASON, "galleries": [OFFICE]},
            )
        )
    ),
    ("GET", f"{API}/cases/{{case_id}}"): _api_without(lambda w: f"{API}/cases/{w.case_id}"),
    ("GET", f"{API}/cases/{{case_id}}/faces/{{face_id}}.jpg"): _api_without(
        lambda w: f"{API}/cases/{w.case_id}/faces/{w.case_face}.jpg"
    ),
    ("GET", f"{API}/cases/{{case_id}}/report.html"): _api_without(
        lambda w: f"{API}/cases/{w.case_id}/report.html",
        {"Edgeid-Case": "ANOTHER-CASE", "Edgeid-Reason": REASON},  # not this case
    ),
}
JUSTIFIED_REVEALS = sorted(
    k
    for k, door in WEB_DOORS.items()
    if door.kind is Kind.REVEALS and door.justified and not door.kept_search
)


def test_every_justified_reveal_has_an_unjustified_attempt() -> None:
    assert set(JUSTIFIED_REVEALS) == set(UNJUSTIFIED)


@pytest.mark.parametrize("door", JUSTIFIED_REVEALS, ids=lambda d: f"{d[0]} {d[1]}")
def test_without_a_justification_nothing_is_revealed_or_recorded(
    world: World, door: tuple[str, str]
) -> None:
    ensure_case(world)
    go = UNJUSTIFIED[door](world)
    before = world.last_seq()
    reply = go()
    if door[1].startswith(API):
        assert reply.status_code in (400, 422), f"{door}: {reply.status_code}"
    else:  # pages send the person to state the case first (or refuse the form)
        assert reply.status_code in (303, 400), f"{door}: {reply.status_code}"
        if reply.status_code == 303:
            assert reply.headers["location"].startswith("/context?next=")
    assert not reply.headers.get("content-type", "").startswith("image/")
    body = reply.text
    assert "Subject 1" not in body and "Subject 2" not in body, f"{door} revealed a name"
    written = [r.event.action for r in world.records_after(before)]
    assert written == [], f"{door}: wrote {written} though it was refused"


def test_results_shown_again_only_to_the_session_that_searched(world: World) -> None:
    """The photo and its faces stay with the session; the kept result is the user's
    (tests/test_search_history.py), opened from their history."""
    search_id, _ = web_searched(world)
    again = world.investigator.get(f"/search/{search_id}/faces/0")
    assert again.status_code == 303 and again.headers["location"].startswith("/searches/")
    kept = world.investigator.get(again.headers["location"])
    assert kept.status_code == 200 and "Subject 1" in kept.text
    other, _ = sign_in(world.box, Role.INVESTIGATOR)  # the same person, another session
    world.box.clock.advance(61)  # a fresh refusal allowance for the investigator
    before = world.last_seq()
    refused = other.get(f"/search/{search_id}/faces/0")
    assert refused.status_code == 404 and "Subject 1" not in refused.text
    written = world.records_after(before)
    assert [r.event.action for r in written] == [AuditAction.ACCESS_DENIED]
    assert written[0].event.detail and search_id in written[0].event.detail
