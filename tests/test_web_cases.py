"""Case ingest through the web UI and the API on a real box: case number and reason first, an
archive of real LFW photos streamed to a private temp file, live progress, clusters and leads
from an enrolled gallery, the report, the audit trail; refusals by role and gallery; oversize
and forged uploads; the temp archive shredded whatever happens."""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from threading import Event

import pytest
from fastapi.testclient import TestClient
from web_support import (
    OFFICE,
    OTHER,
    PASSWORD,
    PEOPLE,
    Box,
    build_box,
    client,
    csrf_of,
    lfw_image,
    tls_settings,
)

from edgeid.runtime.accounts.roles import ROLE_PERMISSIONS, Role
from edgeid.runtime.accounts.tokens import TokenStore
from edgeid.runtime.accounts.users import UserStore
from edgeid.runtime.audit import AuditAction, AuditEvent
from edgeid.runtime.audit.errors import AuditInputError
from edgeid.runtime.audit.events import check_event
from edgeid.runtime.cases.farmed import ImageFarm
from edgeid.runtime.cases.ingest import IngestProgress, IngestRequest, ProgressCallback
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.web.case_jobs import CaseJob
from edgeid.runtime.web.case_uploads import UPLOADS_DIR, CaseUploads

MAX_CASE_UPLOAD = 1024 * 1024  # small, so the oversize tests send little
CASE = "VID-2025/0042"
REASON = "seized phone of a suspect, warrant W-42/2025"
JOB = re.compile(r"/cases/jobs/([A-Za-z0-9_-]+)")
CASE_LINK = re.compile(r'href="/cases/([0-9a-f]{32})"')


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, lfw_dir: Path, models_dir: Path) -> Iterator[Box]:
    home = tmp_path_factory.mktemp("box")
    settings = tls_settings(home, max_case_upload_bytes=MAX_CASE_UPLOAD)
    built = build_box(home, lfw_dir, models_dir, settings)
    yield built
    built.close()


@pytest.fixture(scope="module")
def media_zip(lfw_dir: Path) -> bytes:
    """Two photos of the first enrolled person (not the enrolled one), one of the second, and
    a text file the ingest must list as unsupported."""
    first, _, probe = PEOPLE[0]
    second, _, other_probe = PEOPLE[1]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.write(lfw_image(lfw_dir, first, probe), "phone/a.jpg")
        archive.write(lfw_image(lfw_dir, first, 5), "phone/b.jpg")
        archive.write(lfw_image(lfw_dir, second, other_probe), "phone/c.jpg")
        archive.writestr("phone/notes.txt", "not a photo")
    return buffer.getvalue()


def uploads(box: Box) -> list[Path]:
    return sorted((box.home / UPLOADS_DIR).rglob("*"))


def sign_in_as(box: Box, username: str) -> tuple[TestClient, str]:
    browser = client(box)
    page = browser.get("/login")
    reply = browser.post(
        "/login",
        data={"username": username, "password": PASSWORD, "csrf_token": csrf_of(page.text)},
    )
    assert reply.status_code == 303
    return browser, csrf_of(browser.get("/account/tokens").text)


def investigator(box: Box, name: str, galleries: tuple[str, ...]) -> tuple[TestClient, str]:
    store = UserStore(box.home, box.accounts)
    if store.get(name) is None:
        _, once = store.create(name, Role.INVESTIGATOR, galleries=galleries)
        store.change_password(name, once, PASSWORD)
    return sign_in_as(box, name)


def plan(browser: TestClient, csrf: str, case: str = CASE, **form: object) -> str:
    reply = browser.post(
        "/cases", data={"case": case, "reason": REASON, "csrf_token": csrf, **form}
    )
    assert reply.status_code == 303, reply.text
    return str(reply.headers["location"]).rsplit("/", 1)[1]


def upload(browser: TestClient, csrf: str, entry: str, data: bytes) -> TestClient:
    return browser.post(  # type: ignore[return-value]
        f"/cases/new/{entry}/archive",
        data={"csrf_token": csrf},
        files={"archive": ("seized phone.zip", data, "application/zip")},
    )


def job_of(box: Box, user: str, job_id: str) -> CaseJob:
    job = box.app.state.web.cases.jobs.get(user, job_id)
    assert job is not None
    return job


def api_client(box: Box, user: str) -> TestClient:
    held = ROLE_PERMISSIONS[UserStore(box.home, box.accounts).get(user).role]  # type: ignore[union-attr]
    _, secret = TokenStore(box.home, box.accounts).create(user, "cases", held, allowed=held)
    api = client(box)
    api.headers["Authorization"] = f"Bearer {secret}"
    return api


def test_ingest_from_upload_to_clusters_leads_report_and_audit(box: Box, media_zip: bytes) -> None:
    user = box.users[Role.INVESTIGATOR]
    browser, csrf = investigator(box, user, (OFFICE,))
    start = browser.get("/cases")
    assert start.status_code == 200 and 'name="reason"' in start.text
    # "Faces may include children" is ticked by default and says what it costs.
    assert re.search(
        r'<input type="checkbox" id="children" name="children"[^>]* checked>', start.text
    )
    assert "more, smaller clusters" in start.text
    entry = plan(browser, csrf, children="on")
    page = browser.get(f"/cases/new/{entry}")
    assert page.status_code == 200 and CASE in page.text and 'type="file"' in page.text
    assert "<dt>Faces may include children</dt><dd>yes</dd>" in page.text
    unticked = plan(browser, csrf, case="ADULTS-1")  # a box left unticked sends nothing
    adults = browser.get(f"/cases/new/{unticked}").text
    assert "<dt>Faces may include children</dt><dd>no: adults only</dd>" in adults

    reply = upload(browser, csrf, entry, media_zip)
    assert reply.status_code == 303
    match = JOB.search(reply.headers["location"])
    assert match
    job_id = match.group(1)
    assert job_of(box, user, job_id).job.wait(timeout=300), "the ingest did not end"

    progress = browser.get(f"/cases/jobs/{job_id}")
    assert progress.status_code == 200
    assert 'http-equiv="refresh"' not in progress.text  # done: the page stops reloading
    assert "<strong>Done</strong> in " in progress.text
    link = CASE_LINK.search(progress.text)
    assert link, "the finished job links to its case"
    case_id = link.group(1)
    assert uploads(box) == [], "the uploaded archive must be shredded once the ingest ends"

    view = browser.get(f"/cases/{case_id}")
    assert view.status_code == 200
    assert "Subject 1" in view.text  # the enrolled mate of the first person is a lead
    # The cluster page states the threshold and the band used, and what the choice costs.
    assert "age band child, threshold 0.969" in view.text
    assert "children aged 0-12" in view.text and "more, smaller clusters" in view.text
    assert "age band unknown" in view.text and "Age not stated" in view.text
    assert "phone/a.jpg" in view.text and "phone/c.jpg" in view.text
    assert "phone/notes.txt" in view.text  # listed with its reason
    face = re.search(rf'src="(/cases/{case_id}/faces/[0-9a-f]+\.jpg)"', view.text)
    assert face
    chip = browser.get(face.group(1))
    assert chip.status_code == 200 and chip.headers["content-type"] == "image/jpeg"
    assert chip.content[:2] == b"\xff\xd8"

    report = browser.get(f"/cases/{case_id}/report.html")
    assert report.status_code == 200
    assert "attachment" in report.headers["content-disposition"]
    assert CASE in report.text and "Subject 1" in report.text

    api = api_client(box, user)
    assert api.get(f"/api/v1/cases/{case_id}").status_code == 400  # no case and reason stated
    body = api.get(
        f"/api/v1/cases/{case_id}", headers={"Edgeid-Case": CASE, "Edgeid-Reason": REASON}
    ).json()
    assert body["case"] == CASE
    leads = [
        lead
        for cluster in body["clusters"]
        for lead in (cluster["search"] or {}).get("leads", [])
        if lead["above_threshold"]
    ]
    assert {lead["subject_id"] for lead in leads} >= {box.subjects[PEOPLE[0][0]]}
    assert all(lead["band"] for lead in leads)
    assert api.get(f"/api/v1/case-jobs/{job_id}").json()["state"] == "complete"
    assert [c["case_id"] for c in api.get("/api/v1/cases").json()] == [case_id]

    records = [r.event for r in box.audit.query(case=CASE, limit=1000)]
    ingested = [e for e in records if e.action is AuditAction.CASE_INGESTED]
    assert len(ingested) == 1
    assert ingested[0].user == user and ingested[0].reason == REASON
    assert ingested[0].probe_sha256 == hashlib.sha256(media_zip).hexdigest()
    searches = [e for e in records if e.action is AuditAction.SEARCH]
    searched = [c for c in body["clusters"] if c["search"] is not None]
    assert searched and len(searches) == len(searched)  # one record per cluster search
    assert all(e.user == user and e.reason == REASON for e in searches)
    assert [e.action for e in records].count(AuditAction.CASE_REPORT) == 1
    viewed = [e for e in records if e.action is AuditAction.CASE_VIEWED]
    assert len(viewed) == 2  # the case page, then the API's view; its photos rode on the page


def test_progress_refreshes_while_running_and_the_archive_goes_whatever_the_end(
    box: Box, media_zip: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running job's page reloads itself and shows counts; a second upload meanwhile is
    refused before it is written; a failed ingest still shreds its archive."""
    assert box.cases is not None
    release, reading = Event(), Event()
    seen: list[Path] = []

    def blocked(
        request: IngestRequest,
        *,
        progress: ProgressCallback,
        stop: Event,
        farm: ImageFarm | None = None,
    ) -> None:
        seen.append(request.source)
        progress(IngestProgress(phase="reading", files_total=3, files_seen=1, faces_new=2))
        reading.set()
        release.wait(60)
        raise BadInputError("the archive is damaged")

    monkeypatch.setattr(box.cases, "ingest", blocked)
    user = box.users[Role.INVESTIGATOR]
    browser, csrf = investigator(box, user, (OFFICE,))
    reply = upload(browser, csrf, plan(browser, csrf, "VID-2025/0043"), media_zip)
    assert reply.status_code == 303
    job_id = JOB.search(reply.headers["location"]).group(1)  # type: ignore[union-attr]
    assert reading.wait(60)
    try:
        running = browser.get(f"/cases/jobs/{job_id}")
        assert '<meta http-equiv="refresh" content="2">' in running.text
        assert "Files looked at: 1 of 3" in running.text
        assert "Finding faces in the files" in running.text and "reading" not in running.text
        # The archive sits in a private folder while the ingest reads it.
        assert seen[0].read_bytes() == media_zip
        assert seen[0].parent.stat().st_mode & 0o777 == 0o700
        assert seen[0].stat().st_mode & 0o777 == 0o600
        busy = upload(browser, csrf, plan(browser, csrf, "VID-2025/0044"), media_zip)
        assert busy.status_code == 503
        assert uploads(box) == [seen[0].parent, seen[0]]
    finally:
        release.set()
    assert job_of(box, user, job_id).job.wait(timeout=60)
    ended = browser.get(f"/cases/jobs/{job_id}")
    assert "http-equiv" not in ended.text and "the archive is damaged." in ended.text
    assert uploads(box) == []


def test_technicians_supervisors_and_investigators_without_the_gallery_are_refused(
    box: Box, media_zip: bytes
) -> None:
    for role in (Role.TECHNICIAN, Role.SUPERVISOR, Role.ADMIN):
        browser, csrf = sign_in_as(box, box.users[role])
        assert browser.get("/cases").status_code == 403
        reply = browser.post("/cases", data={"case": CASE, "reason": REASON, "csrf_token": csrf})
        assert reply.status_code == 403
        api = api_client(box, box.users[role])
        planned = api.post("/api/v1/case-ingests", json={"case": CASE, "reason": REASON})
        assert planned.status_code == 403

    browser, csrf = investigator(box, "no-gallery", ())
    reply = browser.post("/cases", data={"case": "N-1", "reason": REASON, "csrf_token": csrf})
    assert reply.status_code == 403
    browser, csrf = investigator(box, "office-only", (OFFICE,))
    reply = browser.post(
        "/cases", data={"case": "N-1", "reason": REASON, "gallery": OTHER, "csrf_token": csrf}
    )
    assert reply.status_code == 403
    # A case opened by someone else is neither readable nor open to more media.
    mine = api_client(box, box.users[Role.INVESTIGATOR]).get("/api/v1/cases").json()
    if mine:
        case_id = mine[0]["case_id"]
        # Refused, and the refusal recorded (the case id is random: 403 reveals nothing).
        assert browser.get(f"/cases/{case_id}").status_code == 403
        assert browser.get(f"/cases/{case_id}/report.html").status_code == 403
        reply = browser.post(
            "/cases", data={"case": mine[0]["case"], "reason": REASON, "csrf_token": csrf}
        )
        assert reply.status_code == 403
    assert uploads(box) == []


def test_oversize_and_forged_uploads_are_refused_and_leave_nothing_on_disk(
    box: Box, media_zip: bytes
) -> None:
    user = box.users[Role.INVESTIGATOR]
    browser, csrf = investigator(box, user, (OFFICE,))
    entry = plan(browser, csrf, "VID-2025/0045")
    cases_before = len(box.app.state.web.cases.service.list_cases())

    # Declared over the limit: refused before a byte is read.
    huge = upload(browser, csrf, entry, b"\0" * (MAX_CASE_UPLOAD + 300 * 1024))
    assert huge.status_code == 413
    # Within the body allowance but the archive itself over the limit: refused mid-stream.
    over = upload(browser, csrf, entry, b"\0" * (MAX_CASE_UPLOAD + 1))
    assert over.status_code == 413
    assert uploads(box) == []
    # A forged token: refused before the archive part is written.
    forged = browser.post(
        f"/cases/new/{entry}/archive",
        data={"csrf_token": "forged"},
        files={"archive": ("a.zip", media_zip, "application/zip")},
    )
    assert forged.status_code == 403
    assert uploads(box) == []

    api = api_client(box, user)
    planned = api.post("/api/v1/case-ingests", json={"case": "VID-2025/0046", "reason": REASON})
    assert planned.status_code == 201
    ingest = planned.json()["ingest_id"]
    too_big = api.put(
        f"/api/v1/case-ingests/{ingest}/archive",
        content=b"\0" * (MAX_CASE_UPLOAD + 1),
        headers={"Content-Type": "application/zip"},
    )
    assert too_big.status_code == 413
    assert uploads(box) == []
    assert len(box.app.state.web.cases.service.list_cases()) == cases_before


def test_api_ingest_runs_end_to_end(box: Box, lfw_dir: Path) -> None:
    user = box.users[Role.INVESTIGATOR]
    api = api_client(box, user)
    person, _, probe = PEOPLE[1]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.write(lfw_image(lfw_dir, person, probe), "one.jpg")
    planned = api.post(
        "/api/v1/case-ingests",
        json={"case": "API-0001", "reason": REASON, "galleries": [OFFICE]},
    )
    assert planned.status_code == 201, planned.text
    started = api.put(
        f"/api/v1/case-ingests/{planned.json()['ingest_id']}/archive",
        content=buffer.getvalue(),
        headers={"Content-Type": "application/zip"},
    )
    assert started.status_code == 202, started.text
    job_id = started.json()["job_id"]
    assert job_of(box, user, job_id).job.wait(timeout=300)
    status = api.get(f"/api/v1/case-jobs/{job_id}").json()
    assert status["state"] == "complete" and status["files_new"] == 1
    view = api.get(
        f"/api/v1/cases/{status['case_id']}",
        headers={"Edgeid-Case": "API-0001", "Edgeid-Reason": REASON},
    ).json()
    assert view["source_files"][0]["names"] == ["one.jpg"]
    assert view["last_run"]["source"] == "upload: archive"
    # A new case may include children unless told otherwise: clustered with the child band's
    # threshold, its leads judged with the strictest band (nobody stated the cluster's age).
    assert planned.json()["may_include_children"] is None and view["may_include_children"]
    assert view["clustering"]["age_band"] == "child"
    search = view["clusters"][0]["search"]
    assert (search["age_band"], search["band_used"]) == ("unknown", "child_0_5")
    assert search["threshold"] == 0.967 and "Age not stated" in search["threshold_note"]
    top = search["leads"][0]
    assert top["subject_id"] == box.subjects[person]
    assert top["above_threshold"] == (top["score"] >= search["threshold"])
    ingested = box.audit.query(case="API-0001", action=AuditAction.CASE_INGESTED, limit=5)
    assert len(ingested) == 1 and "via API token" in (ingested[0].event.detail or "")
    searched = box.audit.query(case="API-0001", action=AuditAction.SEARCH, limit=5)
    assert [r.event.age_band for r in searched] == ["unknown"]
    assert uploads(box) == []


def test_a_crash_s_leftover_upload_is_shredded_at_start(tmp_path: Path) -> None:
    CaseUploads(tmp_path)
    left = tmp_path / UPLOADS_DIR / "0123" / "archive"
    left.parent.mkdir()
    left.write_bytes(b"seized media")
    CaseUploads(tmp_path)
    assert list((tmp_path / UPLOADS_DIR).iterdir()) == []


@pytest.mark.parametrize("action", [AuditAction.CASE_INGESTED, AuditAction.CASE_REPORT])
def test_case_audit_records_need_their_case_and_an_ingest_its_reason(action: AuditAction) -> None:
    whole = AuditEvent(user="inv", role="investigator", action=action, case=CASE, reason=REASON)
    assert check_event(whole).action is action
    with pytest.raises(AuditInputError, match="case"):
        check_event(AuditEvent(user="inv", role="investigator", action=action, reason=REASON))
    if action is AuditAction.CASE_INGESTED:
        with pytest.raises(AuditInputError, match="reason"):
            check_event(AuditEvent(user="inv", role="investigator", action=action, case=CASE))
