"""Result modes, the comparison view, decisions and the sealed search history (issue 14).

Through the web app (TestClient) and the services themselves: identification shows a stranger
nothing; investigation records its mode and reveals a name only when a candidate is opened; a
decision needs the comparison first and a note below the threshold (web, API and service);
searches belong to their user, survive signing out, are listed on their case page, leave with
an erased subject, and expire by ``searches.history_days``.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from web_support import (
    OFFICE,
    OTHER_PERSON,
    PEOPLE,
    Box,
    build_box,
    central_face,
    lfw_image,
    sign_in,
    tls_settings,
)

from edgeid.runtime.accounts.roles import Role
from edgeid.runtime.audit import AuditAction
from edgeid.runtime.audit.events import AuditRecord
from edgeid.runtime.audit.justification import Justification
from edgeid.runtime.compat import UTC
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.errors import AccessDeniedError, BadInputError
from edgeid.runtime.services.caller import LocalOperator
from edgeid.runtime.services.search_history import (
    SearchHistory,
    SearchHistoryError,
    StoredSearch,
)

CASE = "HIST-2026/9"
NAMED = re.compile(r"Subject [0-9X]")  # every enrolled name in the box
REASON = "identify the child in exhibit 9, photo 2"


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, lfw_dir: Path, models_dir: Path) -> Iterator[Box]:
    home = tmp_path_factory.mktemp("history")
    made = build_box(home, lfw_dir, models_dir, tls_settings(home))
    try:
        yield made
    finally:
        made.close()


def stranger(lfw_dir: Path) -> bytes:
    """A person enrolled in no gallery the investigator searches."""
    return lfw_image(lfw_dir, OTHER_PERSON[0], OTHER_PERSON[2]).read_bytes()


def enrolled(lfw_dir: Path) -> bytes:
    """Another photo of Subject 1."""
    person, _, probe = PEOPLE[0]
    return lfw_image(lfw_dir, person, probe).read_bytes()


def records_after(box: Box, seq: int) -> list[AuditRecord]:
    return sorted((r for r in box.audit.query(limit=1000) if r.seq > seq), key=lambda r: r.seq)


def last_seq(box: Box) -> int:
    newest = box.audit.query(limit=1)
    return newest[0].seq if newest else 0


def web_search(
    box: Box,
    browser: TestClient,
    csrf: str,
    photo: bytes,
    mode: str,
    *,
    age_band: str = "adult",
    case: str = CASE,
) -> str:
    """A search run through the pages; the id of its kept result."""
    started = browser.post(
        "/search",
        data={
            "csrf_token": csrf,
            "case": case,
            "reason": REASON,
            "gallery": OFFICE,
            "age_band": age_band,
            "mode": mode,
        },
    )
    assert started.status_code == 303, started.text
    entry = started.headers["location"].rsplit("/", 1)[1]
    sent = browser.post(
        f"/search/{entry}/photo", data={"csrf_token": csrf}, files={"photo": ("p.jpg", photo)}
    )
    assert sent.status_code == 303, sent.text
    face = central_face(box.service, photo)
    ran = browser.post(f"/search/{entry}/faces/{face}", data={"csrf_token": csrf, "k": "3"})
    assert ran.status_code == 303, ran.text
    location = ran.headers["location"]
    assert location.startswith("/searches/"), location
    return location.rsplit("/", 1)[1]


def kept(box: Box, search_id: str) -> StoredSearch:
    found = box.app.state.web.history.history.get(search_id)
    assert found is not None
    return found


# -- identification --------------------------------------------------------------------------


def test_identification_of_a_stranger_shows_no_face_and_no_name(box: Box, lfw_dir: Path) -> None:
    browser, csrf = sign_in(box, Role.INVESTIGATOR)
    before = last_seq(box)
    search_id = web_search(box, browser, csrf, stranger(lfw_dir), "identification")
    page = browser.get(f"/searches/{search_id}")
    assert page.status_code == 200
    faces = sum(len(box.service.faces(OFFICE, s)) for s in box.subjects.values())
    assert f"No match in {faces} enrolled face(s)." in page.text
    assert not NAMED.search(page.text)
    assert "/thumbnail.jpg" not in page.text and "Compare candidate" not in page.text
    (search,) = [r for r in records_after(box, before) if r.event.action is AuditAction.SEARCH]
    assert "mode identification" in (search.event.detail or "")
    assert search.event.candidates == ()  # nothing below the threshold was even recorded
    # Nor can a below-threshold face be fetched: the core never revealed it to this session.
    held = kept(box, search_id)
    assert held.candidates == () and held.no_match


def test_identification_of_an_enrolled_person_names_the_match(box: Box, lfw_dir: Path) -> None:
    browser, csrf = sign_in(box, Role.INVESTIGATOR)
    search_id = web_search(box, browser, csrf, enrolled(lfw_dir), "identification")
    page = browser.get(f"/searches/{search_id}").text
    assert "Subject 1" in page and "Compare candidate 1" in page
    assert re.search(r"A stranger \(adults\) scores this high (at most )?about 1 in [\d,]+", page)
    assert all(c.above_threshold for c in kept(box, search_id).candidates)


# -- investigation ---------------------------------------------------------------------------


def test_investigation_is_recorded_and_reveals_a_name_only_when_opened(
    box: Box, lfw_dir: Path
) -> None:
    browser, csrf = sign_in(box, Role.INVESTIGATOR)
    before = last_seq(box)
    search_id = web_search(box, browser, csrf, stranger(lfw_dir), "investigation")
    (search,) = [r for r in records_after(box, before) if r.event.action is AuditAction.SEARCH]
    assert "mode investigation" in (search.event.detail or "")
    held = kept(box, search_id)
    assert len(held.candidates) == 3 and held.mode == "investigation"
    page = browser.get(f"/searches/{search_id}").text
    assert not NAMED.search(page), "an investigation named a candidate before it was opened"
    assert page.count("Not a match claim.") == 3
    assert page.count("/thumbnail.jpg") == 3
    assert "scores this high" in page

    first = held.candidates[0]
    seq = last_seq(box)
    opened = browser.get(f"/searches/{search_id}/candidates/{first.face_id}")
    assert opened.status_code == 200
    name = box.service.subject(first.gallery, first.subject_id).display_name
    assert name in opened.text and "Lead confirmed" in opened.text
    (viewed,) = records_after(box, seq)
    assert viewed.event.action is AuditAction.SUBJECT_VIEWED
    assert viewed.event.subject_id == first.subject_id
    assert viewed.event.case == CASE and viewed.event.reason == REASON
    assert search_id in (viewed.event.detail or "")
    assert first.face_id in kept(box, search_id).opened
    # The enlarged and marked renderings come back as JPEGs, bigger than the chip.
    probe = browser.get(f"/searches/{search_id}/probe.jpg?size=large&landmarks=on")
    photo = browser.get(
        f"/searches/{search_id}/candidates/{first.face_id}/faces/{first.face_id}.jpg?size=large"
    )
    for reply in (probe, photo):
        assert reply.status_code == 200 and reply.headers["content-type"] == "image/jpeg"
        assert len(reply.content) > len(held.probe_chip)


# -- decisions -------------------------------------------------------------------------------


def test_a_below_threshold_confirmation_needs_a_note_on_the_page(box: Box, lfw_dir: Path) -> None:
    browser, csrf = sign_in(box, Role.INVESTIGATOR)
    search_id = web_search(box, browser, csrf, stranger(lfw_dir), "investigation")
    weak = kept(box, search_id).candidates[0]
    assert not weak.above_threshold
    url = f"/searches/{search_id}/candidates/{weak.face_id}"

    # No decision before the comparison was opened.
    early = browser.post(f"{url}/decision", data={"csrf_token": csrf, "decision": "rejected"})
    assert early.status_code == 400 and "open this candidate" in early.text.lower()
    browser.get(url)

    seq = last_seq(box)
    refused = browser.post(f"{url}/decision", data={"csrf_token": csrf, "decision": "confirmed"})
    assert refused.status_code == 400
    assert "below the threshold" in refused.text
    assert not [r for r in records_after(box, seq) if r.event.action is AuditAction.DECISION]
    assert kept(box, search_id).decisions == ()

    note = "same scar above the left eyebrow as in exhibit 9"
    done = browser.post(
        f"{url}/decision", data={"csrf_token": csrf, "decision": "confirmed", "note": note}
    )
    assert done.status_code == 303
    (decision,) = [r for r in records_after(box, seq) if r.event.action is AuditAction.DECISION]
    assert decision.event.decision == "lead confirmed"
    assert decision.event.case == CASE and decision.event.user == box.users[Role.INVESTIGATOR]
    assert note in (decision.event.detail or "") and "below the threshold" in (
        decision.event.detail or ""
    )
    made = kept(box, search_id).decision(weak.face_id)
    assert made is not None and made.note == note and made.by == box.users[Role.INVESTIGATOR]
    assert f"“{note}”" in browser.get(url).text


def test_the_service_and_the_api_refuse_it_too(box: Box, lfw_dir: Path) -> None:
    """The rule lives in the service: the API (and any later door) cannot skip it."""
    searches = box.app.state.web.history
    operator = LocalOperator.current()
    probe = box.app.state.web.accountable.analyse(stranger(lfw_dir))
    face = central_face(box.service, stranger(lfw_dir))
    held, _ = searches.search(
        operator,
        Justification.of(CASE, REASON),
        probe,
        face,
        [OFFICE],
        mode="investigation",
        k=2,
        age_band="adult",
    )
    weak = held.candidates[0]
    with pytest.raises(BadInputError, match="open this candidate"):
        searches.decide(operator, held.search_id, weak.face_id, "rejected", where="test")
    searches.open_candidate(operator, held.search_id, weak.face_id, where="test")
    with pytest.raises(BadInputError, match="below the threshold"):
        searches.decide(operator, held.search_id, weak.face_id, "confirmed", "ok", where="test")
    searches.decide(operator, held.search_id, weak.face_id, "rejected", where="test")

    api = token_client(box)
    made = api.post(
        "/api/v1/searches",
        json={
            "case": CASE,
            "reason": REASON,
            "galleries": [OFFICE],
            "mode": "investigation",
            "age_band": "adult",
        },
    )
    assert made.status_code == 201 and made.json()["mode"] == "investigation"
    entry = made.json()["search_id"]
    assert api.put(
        f"/api/v1/searches/{entry}/photo",
        content=stranger(lfw_dir),
        headers={"Content-Type": "image/jpeg"},
    ).is_success
    result = api.post(f"/api/v1/searches/{entry}/faces/{face}/candidates", json={"k": 3}).json()
    assert result["mode"] == "investigation" and result["history_id"]
    assert all(c["display_name"] is None for c in result["candidates"])
    history_id, face_id = result["history_id"], result["candidates"][0]["face_id"]
    base = f"/api/v1/search-history/{history_id}/candidates/{face_id}"
    early = api.post(f"{base}/decision", json={"decision": "rejected"})
    assert early.status_code == 400
    opened = api.get(base)
    assert opened.status_code == 200 and opened.json()["display_name"].startswith("Subject")
    refused = api.post(f"{base}/decision", json={"decision": "confirmed"})
    assert refused.status_code == 400 and "below the threshold" in refused.json()["error"]
    note = "tattoo on the right wrist matches exhibit 9"
    done = api.post(f"{base}/decision", json={"decision": "confirmed", "note": note})
    assert done.status_code == 200 and done.json()["note"] == note
    listed = api.get("/api/v1/search-history").json()
    assert any(s["history_id"] == history_id for s in listed)


def token_client(box: Box) -> TestClient:
    from web_support import client

    from edgeid.runtime.accounts.roles import ROLE_PERMISSIONS
    from edgeid.runtime.accounts.tokens import TokenStore

    held = ROLE_PERMISSIONS[Role.INVESTIGATOR]
    _, secret = TokenStore(box.home, box.accounts).create(
        box.users[Role.INVESTIGATOR], "history test", held, allowed=held
    )
    api = client(box)
    api.headers["Authorization"] = f"Bearer {secret}"
    return api


# -- the history -----------------------------------------------------------------------------


def test_a_search_survives_sign_out_and_is_listed_on_its_case_page(box: Box, lfw_dir: Path) -> None:
    case = "HIST-CASE/1"
    browser, csrf = sign_in(box, Role.INVESTIGATOR)
    search_id = web_search(box, browser, csrf, enrolled(lfw_dir), "identification", case=case)
    assert browser.post("/logout", data={"csrf_token": csrf}).status_code == 303

    again, csrf = sign_in(box, Role.INVESTIGATOR)
    mine = again.get("/searches")
    assert mine.status_code == 200 and f"/searches/{search_id}" in mine.text
    seq = last_seq(box)
    shown = again.get(f"/searches/{search_id}")
    assert shown.status_code == 200 and "Subject 1" in shown.text
    # A new session is shown the candidates again: recorded like a search, not searched again.
    (record,) = records_after(box, seq)
    assert record.event.action is AuditAction.SEARCH
    assert "not searched again" in (record.event.detail or "") and record.event.case == case
    assert again.get(f"/searches/{search_id}").status_code == 200
    assert records_after(box, record.seq) == []  # the same session: nothing new revealed

    # Another investigator cannot open it (refused and recorded).
    from web_support import PASSWORD

    from edgeid.runtime.accounts.users import UserStore

    users = UserStore(box.home, box.accounts)
    _, once = users.create("other-investigator", Role.INVESTIGATOR, galleries=[OFFICE])
    users.change_password("other-investigator", once, PASSWORD)
    other, _ = sign_in_as(box, "other-investigator")
    box.clock.advance(61)
    seq = last_seq(box)
    refused = other.get(f"/searches/{search_id}")
    assert refused.status_code == 403 and "Subject 1" not in refused.text
    assert [r.event.action for r in records_after(box, seq)] == [AuditAction.ACCESS_DENIED]

    # Its case page lists it, with the investigator and the mode.
    case_id = ingest_case(box, again, csrf, lfw_dir, case)
    work = again.post("/context", data={"csrf_token": csrf, "case": case, "reason": REASON})
    assert work.status_code == 303
    page = again.get(f"/cases/{case_id}")
    assert page.status_code == 200, page.text
    section = page.text.split('id="case-searches"', 1)[1]
    assert f"/searches/{search_id}" in section
    assert box.users[Role.INVESTIGATOR] in section and "Identification" in section

    # A case lead goes to the same comparison view and is decided there, like a candidate.
    lead = re.search(rf'href="(/cases/{case_id}/clusters/\d+/leads/[0-9a-f]+)"', page.text)
    assert lead, "no lead to compare on the case page"
    review = again.get(lead.group(1))
    assert review.status_code == 303
    compare = review.headers["location"]
    seq = last_seq(box)
    shown = again.get(compare)
    assert shown.status_code == 200 and "Subject 1" in shown.text
    assert [r.event.action for r in records_after(box, seq)] == [AuditAction.SUBJECT_VIEWED]
    assert again.get(lead.group(1)).headers["location"] == compare  # the same review again
    note = "compared the ear shape with the enrolled photo"
    decided = again.post(
        f"{compare}/decision", data={"csrf_token": csrf, "decision": "rejected", "note": note}
    )
    assert decided.status_code == 303
    (decision,) = [r for r in records_after(box, seq) if r.event.action is AuditAction.DECISION]
    assert decision.event.case == case and f"case {case_id} cluster" in (
        decision.event.detail or ""
    )
    listed = again.get(f"/cases/{case_id}").text.split('id="case-searches"', 1)[1]
    assert (
        "Case lead review" in listed
        and f"rejected (rank 1, {box.users[Role.INVESTIGATOR]})" in (listed)
    )


def sign_in_as(box: Box, name: str) -> tuple[TestClient, str]:
    from web_support import PASSWORD, client, csrf_of

    browser = client(box)
    page = browser.get("/login")
    reply = browser.post(
        "/login", data={"username": name, "password": PASSWORD, "csrf_token": csrf_of(page.text)}
    )
    assert reply.status_code == 303
    return browser, csrf_of(browser.get("/account/tokens").text)


def ingest_case(
    box: Box, browser: TestClient, csrf: str, lfw_dir: Path, case: str, keep_until: str = ""
) -> str:
    """A case of one photo, ingested through the pages; its id."""
    form = {"csrf_token": csrf, "case": case, "reason": REASON, "retention_until": keep_until}
    planned = browser.post("/cases", data=form)
    assert planned.status_code == 303, planned.text
    entry = planned.headers["location"].rsplit("/", 1)[1]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("phone/a.jpg", enrolled(lfw_dir))
    started = browser.post(
        f"/cases/new/{entry}/archive",
        data={"csrf_token": csrf},
        files={"archive": ("media.zip", buffer.getvalue(), "application/zip")},
    )
    assert started.status_code == 303, started.text
    job_id = started.headers["location"].rsplit("/", 1)[1]
    desk = box.app.state.web.cases
    job = desk.jobs.get(box.users[Role.INVESTIGATOR], job_id)
    assert job.job.wait(timeout=300)
    return str(job.case_id or desk.case_id_of(job))


def test_history_is_sealed_and_expires_by_the_retention_setting(
    box: Box, lfw_dir: Path, tmp_path: Path
) -> None:
    # The setting comes from edgeid.toml and is what the running app keeps searches for.
    (tmp_path / "edgeid.toml").write_text("[searches]\nhistory_days = 30\n")
    assert load_settings(tmp_path).searches.history_days == 30
    running = box.app.state.web.history.history
    assert running.keep == timedelta(days=box.settings.searches.history_days) == timedelta(90)

    now = [datetime(2026, 12, 1, tzinfo=UTC)]
    keyring = box.service.store.keyring
    history = SearchHistory(box.home, keyring, keep=timedelta(days=30), clock=lambda: now[0])
    browser, csrf = sign_in(box, Role.INVESTIGATOR)
    search_id = web_search(box, browser, csrf, enrolled(lfw_dir), "identification")
    search = history.get(search_id)
    assert search is not None
    path = history.root / f"{search_id}.sealed"
    raw = path.read_bytes()
    for plain in (CASE, REASON, search.candidates[0].subject_id, "Subject 1"):
        assert plain.encode() not in raw, "a search file holds plaintext"
    assert search.probe_chip not in raw

    # Kept within the setting, whoever is signed in; erased once past it.
    now[0] = search.created_at + timedelta(days=29)
    assert history.get(search_id) is not None
    now[0] = search.created_at + timedelta(days=30, seconds=1)
    assert search_id not in {s.search_id for s in history.all()}
    assert not path.exists()

    # A file renamed to another search's id does not open (its id is bound to it).
    other = web_search(box, browser, csrf, enrolled(lfw_dir), "identification")
    moved = history.root / ("0" * 24 + ".sealed")
    (history.root / f"{other}.sealed").rename(moved)
    try:
        with pytest.raises(SearchHistoryError, match="does not open"):
            history.get("0" * 24)
        # Scrub reads every kept search and names the one that does not open, erasing nothing.
        from edgeid.runtime.services.scrub import scrub

        web_search(box, browser, csrf, enrolled(lfw_dir), "identification")  # one that opens
        searches = [c for c in scrub(box.home, box.service.store) if c.kind == "search"]
        assert [c.name for c in searches if not c.ok] == [moved.name]
        assert any(c.ok for c in searches) and moved.exists()
    finally:
        moved.unlink()


def test_an_erased_subject_leaves_every_kept_search(box: Box, lfw_dir: Path) -> None:
    browser, csrf = sign_in(box, Role.INVESTIGATOR)
    person, enrolled_number, probe_number = PEOPLE[2]
    image = lfw_image(lfw_dir, person, enrolled_number).read_bytes()
    subject_id = box.service.enroll(
        OFFICE,
        display_name="Subject Erased",
        legal_basis="test case 0003",
        enrolled_by="setup",
        image_bytes=image,
        face_index=central_face(box.service, image),
        allow_duplicate=True,
    ).subject.subject_id
    photo = lfw_image(lfw_dir, person, probe_number).read_bytes()
    search_id = web_search(box, browser, csrf, photo, "investigation")
    assert subject_id in {c.subject_id for c in kept(box, search_id).candidates}
    box.app.state.web.accountable.delete_subject(
        LocalOperator.current(),
        OFFICE,
        subject_id,
        reason="erasure test for the history",
        where="test",
    )
    assert subject_id not in {c.subject_id for c in kept(box, search_id).candidates}


def test_another_users_search_is_refused_in_the_service(box: Box, lfw_dir: Path) -> None:
    browser, csrf = sign_in(box, Role.INVESTIGATOR)
    search_id = web_search(box, browser, csrf, enrolled(lfw_dir), "identification")
    box.clock.advance(61)
    with pytest.raises(AccessDeniedError):
        box.app.state.web.history.get(LocalOperator.current(), search_id, where="test")


def test_a_purged_case_takes_its_lead_reviews_with_it(box: Box, lfw_dir: Path) -> None:
    """A lead review holds the case's face: it goes with the case; a search that only names
    the case number stays until its retention."""
    case = "HIST-PURGE/1"
    browser, csrf = sign_in(box, Role.INVESTIGATOR)
    search_id = web_search(box, browser, csrf, enrolled(lfw_dir), "identification", case=case)
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    case_id = ingest_case(box, browser, csrf, lfw_dir, case, keep_until=tomorrow.isoformat())
    assert (
        browser.post(
            "/context", data={"csrf_token": csrf, "case": case, "reason": REASON}
        ).status_code
        == 303
    )
    page = browser.get(f"/cases/{case_id}").text
    lead = re.search(rf'href="(/cases/{case_id}/clusters/\d+/leads/[0-9a-f]+)"', page)
    assert lead
    review_id = browser.get(lead.group(1)).headers["location"].split("/")[2]
    assert kept(box, review_id).origin.startswith(f"case {case_id} ")

    web = box.app.state.web
    web.case_access.purge(
        LocalOperator.current(),
        case_id,
        "the case is closed and past its date",
        where="test",
        today=tomorrow + timedelta(days=1),
    )
    assert web.history.history.get(review_id) is None
    assert web.history.history.get(search_id) is not None
