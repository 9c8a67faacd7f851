"""Every web page of a real, served box, each opened as a person allowed to see it: what the
accessibility check (test_web_a11y.py) and ``make screenshots`` walk through.

The pages are enumerated from the app's routes (as test_every_door.py does), never listed by
hand: a page added later is walked without anyone remembering to add it. Each route's role
follows from the permission it declares; its path parameters are filled from one scene (a
search run, a case ingested, a group photo waiting for a face to be picked) set up through the
same forms and API a person uses. A page whose parameter the scene cannot fill is reported,
never skipped silently.
"""

from __future__ import annotations

import contextlib
import io
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from starlette.routing import Mount
from web_support import (
    OFFICE,
    OTHER,
    PEOPLE,
    WORK_CASE,
    Box,
    all_routes,
    build_box,
    central_face,
    free_port,
    lfw_image,
    serving,
    sign_in,
    tls_settings,
    work_on,
)

from edgeid.runtime.accounts.roles import ROLE_PERMISSIONS, Permission, Role
from edgeid.runtime.accounts.tokens import TokenStore
from edgeid.runtime.web.access import requirement_of

PARAM = re.compile(r"\{([a-z_]+)(?::[a-z]+)?\}")
# Pages whose answer is not a page (images, JSON, the API, Prometheus' text) are not walked.
NOT_PAGES = re.compile(r"^/(api/|static/)|\.(jpg|json)$|^/healthz$|^/metrics$")
# GET routes that answer 303 to a page the walk visits itself: the old address of a result
# (now kept in the search history) and a case lead, opened as a kept search for review.
REDIRECTS = frozenset(
    {
        "/search/{search_id}/faces/{face_index}",
        "/cases/{case_id}/clusters/{number}/leads/{face_id}",
    }
)
# The case the scene ingests is the one every session states as its work context, so its
# pages open rather than ask which case one is working on.
CASE = WORK_CASE
REASON = "identifying a child in media seized under warrant W-3"


@dataclass(frozen=True)
class Visit:
    """One page to open: as whom (None: signed out) and where; ``route`` is its pattern."""

    role: Role | None
    route: str
    path: str
    status: int = 200

    @property
    def name(self) -> str:
        """A file-name-safe label: role and path."""
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.path).strip("-") or "home"
        return f"{self.role.value if self.role else 'anonymous'}--{slug}"


@dataclass
class Walk:
    url: str
    box: Box
    cookies: dict[Role, str]  # each role's signed-in session cookie, work context stated
    cookie_name: str
    visits: list[Visit] = field(default_factory=list)
    unfilled: list[str] = field(default_factory=list)  # routes whose parameters have no value


def role_for(permission: Permission) -> Role:
    return next(role for role in Role if permission in ROLE_PERMISSIONS[role])


def _media_zip(photo: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("phone/a.jpg", photo)
    return buffer.getvalue()


def _scene(
    box: Box, lfw_dir: Path, group_photo: Path, browser: TestClient, csrf: str
) -> dict[str, str]:
    """Path parameter values: a search run, a case ingested, an enrolment waiting for a pick."""
    person, _, probe = PEOPLE[0]
    photo = lfw_image(lfw_dir, person, probe).read_bytes()
    started = browser.post(
        "/search",
        data={"csrf_token": csrf, "case": WORK_CASE, "reason": REASON, "gallery": OFFICE},
    )
    assert started.status_code == 303, started.text
    search_id = started.headers["location"].rsplit("/", 1)[1]
    sent = browser.post(
        f"/search/{search_id}/photo", data={"csrf_token": csrf}, files={"photo": ("p.jpg", photo)}
    )
    assert sent.status_code == 303, sent.text
    ran = browser.post(f"/search/{search_id}/faces/0", data={"csrf_token": csrf})
    assert ran.status_code == 303, ran.text
    kept = browser.get(ran.headers["location"])  # the result, kept in the search history
    history_id = str(kept.url).rstrip("/").rsplit("/", 1)[1]

    planned = browser.post("/cases", data={"csrf_token": csrf, "case": CASE, "reason": REASON})
    assert planned.status_code == 303, planned.text
    entry_id = planned.headers["location"].rsplit("/", 1)[1]
    # The case itself is ingested through the API (the upload page stays waiting for its file).
    held = ROLE_PERMISSIONS[Role.INVESTIGATOR]
    _, secret = TokenStore(box.home, box.accounts).create(
        box.users[Role.INVESTIGATOR], "page walk", held, allowed=held
    )
    api = TestClient(box.app, base_url="https://testserver")
    api.headers["Authorization"] = f"Bearer {secret}"
    ingest = api.post("/api/v1/case-ingests", json={"case": CASE, "reason": REASON})
    assert ingest.status_code == 201, ingest.text
    job = api.put(
        f"/api/v1/case-ingests/{ingest.json()['ingest_id']}/archive",
        content=_media_zip(photo),
        headers={"Content-Type": "application/zip"},
    )
    assert job.status_code == 202, job.text
    desk = box.app.state.web.cases
    running = desk.jobs.get(box.users[Role.INVESTIGATOR], job.json()["job_id"])
    assert running.job.wait(timeout=300), "the case ingest did not finish"
    case_id = str(running.case_id or desk.case_id_of(running))

    enrolling = browser.post(
        "/enrol",
        data={
            "csrf_token": csrf,
            "gallery": OFFICE,
            "display_name": "Subject 9",
            "legal_basis": "test case 0009",
        },
        files={"photo": ("group.jpg", group_photo.read_bytes())},
    )
    assert enrolling.status_code == 303, enrolling.text
    subject_id = box.subjects[person]
    due = box.service.enroll(  # a subject past its retention date, for the erasure page
        OFFICE,
        display_name="Subject Due",
        legal_basis="test case 0010",
        enrolled_by="setup",
        image_bytes=photo,
        face_index=central_face(box.service, photo),
        retention_until=date.today() - timedelta(days=1),
        allow_duplicate=True,  # the probe's person, enrolled again under another name
    ).subject.subject_id
    return {
        "search_id": search_id,
        "history_id": history_id,
        "due_subject_id": due,
        "face_index": "0",
        "entry_id": entry_id,
        "enrol_entry_id": enrolling.headers["location"].rsplit("/", 1)[1],
        "job_id": str(job.json()["job_id"]),
        "case_id": case_id,
        "gallery": OFFICE,
        "subject_id": subject_id,
        "face_id": box.service.faces(OFFICE, subject_id)[0].face_id,
        "username": box.users[Role.INVESTIGATOR],
        "erase_gallery": OTHER,
    }


def _fill(route: str, values: dict[str, str]) -> str | None:
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        # Two kinds of entry share the parameter name: a case upload and an enrolment.
        if name == "entry_id" and route.startswith("/enrol/"):
            name = "enrol_entry_id"
        if name == "gallery" and route.startswith("/admin/galleries/"):
            name = "erase_gallery"
        if name == "search_id" and route.startswith("/searches/"):
            name = "history_id"  # a kept search, not the session's search in progress
        if name == "subject_id" and route.startswith("/retention/"):
            name = "due_subject_id"
        if name not in values:
            raise KeyError(name)
        return values[name]

    try:
        return PARAM.sub(value, route)
    except KeyError:
        return None


def plan_visits(box: Box, values: dict[str, str]) -> tuple[list[Visit], list[str]]:
    visits, unfilled = [], []
    for path, methods, route in all_routes(box.app):
        if isinstance(route, Mount) or "GET" not in methods or NOT_PAGES.search(path):
            continue
        if path in REDIRECTS:
            continue
        concrete = _fill(path, values)
        if concrete is None:
            unfilled.append(path)
            continue
        requirement = requirement_of(route)
        if requirement is None:
            roles: list[Role | None] = [None]
        elif requirement.permission is None:
            # Pages for anyone signed in; the home page differs by role, so every role sees it.
            roles = list(Role) if path == "/" else [Role.INVESTIGATOR]
        else:
            roles = [role_for(requirement.permission)]
        visits += [Visit(role, path, concrete) for role in roles]
    # The error page, as a person meets it: a search that is not (or no longer) theirs.
    visits.append(Visit(Role.INVESTIGATOR, "(error page)", "/search/no-such-search", 404))
    return sorted(visits, key=lambda v: (v.role.value if v.role else "", v.path)), unfilled


@contextlib.contextmanager
def walk(home: Path, lfw_dir: Path, scenes_dir: Path, models_dir: Path) -> Iterator[Walk]:
    """A served box with every role signed in and the scene set; the pages to visit."""
    box = build_box(home, lfw_dir, models_dir, tls_settings(home))
    try:
        cookie_name = box.app.state.web.cookie_name
        cookies = {}
        sessions = {}
        for role in Role:
            browser, csrf = sign_in(box, role)
            work_on(browser, csrf)
            sessions[role] = (browser, csrf)
            cookies[role] = str(browser.cookies.get(cookie_name))
        browser, csrf = sessions[Role.INVESTIGATOR]
        values = _scene(box, lfw_dir, scenes_dir / "group" / "bbt1.jpg", browser, csrf)
        visits, unfilled = plan_visits(box, values)
        with serving(box.app, box.settings, free_port()) as url:
            yield Walk(url, box, cookies, cookie_name, visits, unfilled)
    finally:
        box.close()
