"""What each role does on its pages and through the API, against the real app and box:
enrolment with its quality gate and duplicate check, subject pages and erasure, the API
search, the supervisor's audit filters, export and retention, and the admin's pages."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from web_support import (
    OFFICE,
    PEOPLE,
    WORK_CASE,
    Box,
    build_box,
    central_face,
    client,
    csrf_of,
    lfw_image,
    sign_in,
    work_on,
)

from edgeid.runtime.accounts.roles import ROLE_PERMISSIONS, Role
from edgeid.runtime.accounts.tokens import TokenStore
from edgeid.runtime.accounts.users import UserStore
from edgeid.runtime.audit import AuditAction, verify_export
from edgeid.runtime.identity.device_key import load_device_key

NEW_PERSON = ("Amelie_Mauresmo", 1)
GROUP_PHOTO = "dlib-faces/2008_002079.jpg"  # several faces, some too poor to enrol


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, lfw_dir: Path, models_dir: Path) -> Iterator[Box]:
    built = build_box(tmp_path_factory.mktemp("box"), lfw_dir, models_dir)
    yield built
    built.close()


def api_client(box: Box, role: Role) -> TestClient:
    held = ROLE_PERMISSIONS[role]
    _, secret = TokenStore(box.home, box.accounts).create(
        box.users[role], "test", held, allowed=held
    )
    api = client(box)
    api.headers["Authorization"] = f"Bearer {secret}"
    return api


def enrol_form(csrf: str, name: str, **extra: str) -> dict[str, str]:
    return {
        "csrf_token": csrf,
        "gallery": OFFICE,
        "display_name": name,
        "legal_basis": "warrant 17/2025",
        **extra,
    }


# -- enrolment, subjects, erasure --------------------------------------------------------------


def test_enrolment_checks_for_duplicates_and_adds_to_the_subject(box: Box, lfw_dir: Path) -> None:
    browser, csrf = sign_in(box, Role.INVESTIGATOR)
    person = PEOPLE[0][0]  # enrolled as Subject 1; this is a third photo of them
    photo = lfw_image(lfw_dir, person, 5).read_bytes()
    subject = box.subjects[person]
    assert len(box.service.analyse(photo).faces) == 1
    before = len(box.service.faces(OFFICE, subject))
    reply = browser.post(
        "/enrol", data=enrol_form(csrf, "Subject 1 again"), files={"photo": ("a.jpg", photo)}
    )
    assert reply.status_code == 409
    assert "Possible duplicates" in reply.text and subject in reply.text
    entry = re.search(r'action="/enrol/([^"/]+)/add"', reply.text)
    assert entry is not None
    added = browser.post(
        f"/enrol/{entry.group(1)}/add",
        data={"csrf_token": csrf, "face": "0", "subject_id": subject},
    )
    assert added.status_code == 303
    assert added.headers["location"] == f"/galleries/{OFFICE}/subjects/{subject}"
    assert len(box.service.faces(OFFICE, subject)) == before + 1
    work_on(browser, csrf)
    page = browser.get(added.headers["location"])
    assert page.text.count("thumbnail.jpg") == before + 1
    assert len(box.service.subjects(OFFICE)) == len(PEOPLE)  # no new subject
    assert browser.get(f"/enrol/{entry.group(1)}").status_code == 404  # the photo is gone


def test_enrolment_quality_gate_refuses_a_poor_face(box: Box, scenes_dir: Path) -> None:
    browser, csrf = sign_in(box, Role.INVESTIGATOR)
    photo = (scenes_dir / GROUP_PHOTO).read_bytes()
    probe = box.service.analyse(photo)
    poor = [f.index for f in probe.faces if not f.enrollable]
    assert len(probe.faces) > 1 and poor, "the group photo should hold a face too poor to enrol"
    reply = browser.post("/enrol", data=enrol_form(csrf, "Poor"), files={"photo": ("g.jpg", photo)})
    assert reply.status_code == 303  # several faces: choose one
    pick = browser.get(reply.headers["location"])
    assert "too poor to enrol" in pick.text
    refused = browser.post(
        reply.headers["location"], data={"csrf_token": csrf, "face": str(poor[0])}
    )
    assert refused.status_code == 422 and "too poor to enrol" in refused.text
    assert len(box.service.subjects(OFFICE)) == len(PEOPLE)


def test_enrol_a_new_subject_then_erase_it_with_confirmation(box: Box, lfw_dir: Path) -> None:
    browser, csrf = sign_in(box, Role.INVESTIGATOR)
    photo = lfw_image(lfw_dir, *NEW_PERSON).read_bytes()
    keep = (date.today() + timedelta(days=365)).isoformat()
    bad_date = browser.post(
        "/enrol",
        data=enrol_form(csrf, "Subject N", retention_until="2000-01-01"),
        files={"photo": ("n.jpg", photo)},
    )
    assert bad_date.status_code == 400 and "must be in the future" in bad_date.text
    assert 'value="Subject N"' in bad_date.text  # what was typed is kept
    reply = browser.post(
        "/enrol",
        data=enrol_form(csrf, "Subject N", retention_until=keep, notes="seen at the harbour"),
        files={"photo": ("n.jpg", photo)},
    )
    assert reply.status_code == 303
    subject_url = reply.headers["location"]
    subject = subject_url.rsplit("/", 1)[1]
    asked = browser.get(subject_url)  # no case stated yet this session: the form comes first
    assert asked.status_code == 303 and asked.headers["location"].startswith("/context?next=")
    work_on(browser, csrf)
    page = browser.get(subject_url)
    assert "Subject N" in page.text and keep in page.text and "seen at the harbour" in page.text
    enrolled = box.audit.query(action=AuditAction.ENROLL, limit=1)[0].event
    assert enrolled.subject_id == subject and enrolled.user == box.users[Role.INVESTIGATOR]
    assert "Subject N" not in str(enrolled)  # no name of an enrolled person in the audit log

    confirm = browser.get(f"{subject_url}/delete")
    assert confirm.status_code == 200 and "cannot be undone" in confirm.text
    unconfirmed = browser.post(
        f"{subject_url}/delete", data={"csrf_token": csrf, "reason": "enrolled in error"}
    )
    assert unconfirmed.status_code == 400
    assert browser.get(subject_url).status_code == 200  # still there
    erased = browser.post(
        f"{subject_url}/delete",
        data={"csrf_token": csrf, "reason": "enrolled in error", "confirm": subject},
    )
    assert erased.status_code == 303
    assert browser.get(subject_url).status_code == 404
    deletion = box.audit.query(action=AuditAction.DELETE_SUBJECT, limit=1)[0].event
    assert deletion.subject_id == subject and deletion.reason == "enrolled in error"
    viewed = box.audit.query(action=AuditAction.SUBJECT_VIEWED, limit=1)[0].event
    assert viewed.subject_id == subject and viewed.case == WORK_CASE


# -- the API -----------------------------------------------------------------------------------


def test_api_search_returns_ranked_leads_and_records_everything(box: Box, lfw_dir: Path) -> None:
    api = api_client(box, Role.INVESTIGATOR)
    refused = api.post("/api/v1/searches", json={"case": "API-1", "reason": ""})
    assert refused.status_code == 422 and "reason" in refused.text  # the schema says why
    created = api.post(
        "/api/v1/searches",
        json={
            "case": "API-1",
            "reason": "identify a victim in seized media",
            "age_band": "adult",
            "mode": "investigation",  # the ranked list; identification returns matches only
        },
    )
    assert created.status_code == 201
    search = created.json()["search_id"]
    person, _, probe = PEOPLE[1]
    photo = lfw_image(lfw_dir, person, probe).read_bytes()
    faces = api.put(
        f"/api/v1/searches/{search}/photo", content=photo, headers={"Content-Type": "image/jpeg"}
    ).json()["faces"]
    face = central_face(box.service, photo)
    assert faces[face]["quality"] > 0
    chip = api.get(f"/api/v1/searches/{search}/faces/{face}/chip.jpg")
    assert chip.headers["content-type"] == "image/jpeg" and chip.content[:3] == b"\xff\xd8\xff"
    result = api.post(f"/api/v1/searches/{search}/faces/{face}/candidates", json={"k": 3}).json()
    assert [c["rank"] for c in result["candidates"]] == [1, 2, 3]
    top = result["candidates"][0]
    assert top["subject_id"] == box.subjects[person] and top["above_threshold"]
    assert result["age_band"] == "adult" and result["calibration"]["age_band_used"] == "adult"
    assert "Adults" in result["reliability"]["note"] and result["reliability"]["verification_rate"]
    # The same candidates judged as a young child's: the scores stay, the threshold does not.
    rescored = api.post(
        f"/api/v1/searches/{search}/faces/{face}/rescore", json={"age_band": "child_0_5"}
    ).json()
    assert [c["score"] for c in rescored["candidates"]] == [
        c["score"] for c in result["candidates"]
    ]
    assert rescored["threshold"] == 0.967 > top["score"]  # 0.961: a lead, below threshold
    assert rescored["no_match"] is True and not rescored["candidates"][0]["above_threshold"]
    assert "children aged 0-5" in rescored["reliability"]["note"]
    assert rescored["calibration"]["measured_in_product"] is False
    assert "1 in 10,000" not in str(rescored)
    bad = api.post(f"/api/v1/searches/{search}/faces/{face}/rescore", json={"age_band": "baby"})
    assert bad.status_code == 422
    assert top["display_name"] is None  # investigation: named only once opened
    candidate = f"/api/v1/search-history/{result['history_id']}/candidates/{top['face_id']}"
    assert api.get(candidate).json()["display_name"] == "Subject 2"
    decision = api.post(f"{candidate}/decision", json={"decision": "rejected"}).json()
    assert (decision["recorded"], decision["rank"], decision["subject_id"]) == (
        "rejected", 1, top["subject_id"]
    )  # fmt: skip
    records = box.audit.query(case="API-1", limit=10)
    assert [r.event.action for r in records] == [
        AuditAction.DECISION, AuditAction.SUBJECT_VIEWED, AuditAction.SEARCH, AuditAction.SEARCH
    ]  # fmt: skip
    assert all("via API token" in (r.event.detail or "") for r in records)
    assert [r.event.age_band for r in records[2:]] == ["child_0_5", "adult"]
    assert "re-scored, not searched again" in (records[2].event.detail or "")
    assert "mode investigation" in (records[3].event.detail or "")
    assert records[2].event.candidates[0].band == rescored["candidates"][0]["band"]
    assert records[3].event.candidates[0].subject_id == top["subject_id"]


def test_results_page_states_the_band_and_re_scores_without_searching(
    box: Box, lfw_dir: Path
) -> None:
    """A search with no age stated uses the strictest band and says so; the results page
    switches the band, which re-judges the same candidates and is recorded like a search."""
    browser, csrf = sign_in(box, Role.INVESTIGATOR)
    start = {"csrf_token": csrf, "case": "AGE-1", "reason": "identify a missing child",
             "age_band": "unknown", "gallery": OFFICE, "mode": "investigation"}  # fmt: skip
    search = browser.post("/search", data=start).headers["location"]
    person, _, probe = PEOPLE[0]
    photo = lfw_image(lfw_dir, person, probe).read_bytes()
    files = {"photo": ("probe.jpg", photo, "image/jpeg")}
    assert (
        browser.post(f"{search}/photo", data={"csrf_token": csrf}, files=files).status_code == 303
    )
    face = central_face(box.service, photo)
    reply = browser.post(f"{search}/faces/{face}", data={"csrf_token": csrf, "k": "3"})
    assert reply.status_code == 303
    page = browser.get(reply.headers["location"]).text
    assert "Age not stated" in page and "children aged 0-5" in page
    assert "Threshold 0.9670" in page and "cannot ship" in page
    assert "1 in 8,600" in page and "1 in 10,000" not in page  # strong, as 25,991 pairs allow
    assert 'name="age_band"' in page and "Re-score without searching again" in page
    reply = browser.post(
        f"{search}/faces/{face}/age-band", data={"csrf_token": csrf, "age_band": "adult"}
    )
    assert reply.status_code == 303
    page = browser.get(reply.headers["location"]).text
    assert "Re-scored for: Adult (18+)." in page
    assert "Threshold 0.9254" in page and "pairs of different adults" in page
    assert "Age not stated" not in page
    assert "<dd>Adult (18+)</dd>" in page
    records = box.audit.query(case="AGE-1", limit=10)
    assert [r.event.action for r in records] == [AuditAction.SEARCH, AuditAction.SEARCH]
    assert [r.event.age_band for r in records] == ["adult", "unknown"]
    assert "re-scored" in (records[0].event.detail or "")
    refused = browser.post(
        f"{search}/faces/{face}/age-band", data={"csrf_token": csrf, "age_band": "toddler"}
    )
    assert refused.status_code == 400


def test_the_openapi_document_names_the_scope_of_every_operation(box: Box) -> None:
    doc = client(box).get("/api/v1/openapi.json").json()
    assert doc["components"]["securitySchemes"]["token"]["scheme"] == "bearer"
    operations = [op for path in doc["paths"].values() for op in path.values()]
    assert len(operations) > 15
    assert all("x-edgeid-scope" in op for op in operations)
    search = doc["paths"]["/api/v1/searches/{search_id}/faces/{face_index}/candidates"]["post"]
    assert search["x-edgeid-scope"] == "search"
    assert not any(path.startswith("/search") for path in doc["paths"])  # pages stay out
    # The API's refusals in their real shape ({"error": ...}), not FastAPI's default 422 body.
    assert doc["components"]["schemas"]["Error"]["required"] == ["error"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    error = {"$ref": "#/components/schemas/Error"}
    for op in operations:
        for status in ("400", "401", "403", "404", "422"):
            shape = op["responses"][status]["content"]["application/json"]["schema"]
            # The one error shape, or a richer one holding it (enrolment's faces found).
            assert (
                shape == error
                or "error"
                in doc["components"]["schemas"][shape["$ref"].rsplit("/", 1)[1]]["required"]
            )
    photo = doc["paths"]["/api/v1/searches/{search_id}/photo"]["put"]["responses"]
    assert "413" in photo and "415" in photo
    enrol = doc["paths"]["/api/v1/galleries/{gallery}/subjects"]["post"]["responses"]
    assert "several faces" in enrol["422"]["description"]


def test_api_refusals_have_the_documented_shape(box: Box) -> None:
    api = api_client(box, Role.TECHNICIAN)
    for reply in (
        client(box).get("/api/v1/me"),  # 401
        api.post("/api/v1/searches", json={"case": "C-1", "reason": "identify the child"}),  # 403
        api_client(box, Role.INVESTIGATOR).post("/api/v1/searches", json={"case": "C-1"}),  # 422
    ):
        assert reply.status_code in (401, 403, 422)
        assert set(reply.json()) == {"error"} and reply.json()["error"]


# -- the supervisor ----------------------------------------------------------------------------


def test_audit_page_filters_by_user_case_and_date_and_exports_signed(
    box: Box, lfw_dir: Path
) -> None:
    person, _, probe = PEOPLE[2]
    photo = lfw_image(lfw_dir, person, probe).read_bytes()
    investigator, csrf = sign_in(box, Role.INVESTIGATOR)
    for case in ("FILTER-A", "FILTER-B"):
        form = {"case": case, "reason": "identify a victim in seized media", "csrf_token": csrf}
        search = investigator.post("/search", data=form).headers["location"]
        upload = investigator.post(
            f"{search}/photo", data={"csrf_token": csrf}, files={"photo": ("p.jpg", photo)}
        )
        assert upload.status_code == 303
        assert investigator.post(f"{search}/faces/0", data={"csrf_token": csrf}).status_code == 303
    supervisor, scsrf = sign_in(box, Role.SUPERVISOR)
    page = supervisor.get("/audit", params={"case": "FILTER-A"})
    assert page.status_code == 200
    assert len(re.findall(r"<tr>\s*<td data-label=\"#\">\d+</td>", page.text)) == 1
    assert "FILTER-B" not in page.text
    today = date.today().isoformat()
    mine = supervisor.get(
        "/audit", params={"user": box.users[Role.INVESTIGATOR], "since": today, "until": today}
    )
    assert "FILTER-A" in mine.text and "FILTER-B" in mine.text
    tomorrow = (date.today() + timedelta(days=1)).isoformat()
    assert "No record matches" in supervisor.get("/audit", params={"since": tomorrow}).text
    assert supervisor.get("/audit", params={"since": "yesterday"}).status_code == 400
    export = supervisor.post("/audit/export", data={"csrf_token": scsrf, "case": "FILTER-A"})
    assert export.status_code == 200
    assert "attachment" in export.headers["content-disposition"]
    saved = box.home / "export-test.jsonl"
    saved.write_bytes(export.content)
    check = verify_export(saved, public_key=load_device_key(box.home).public_key())
    assert check.records == 1
    assert AuditAction.AUDIT_EXPORTED in [r.event.action for r in box.audit.query(limit=5)]


def test_retention_lists_expired_subjects_without_names_and_erases_them(
    box: Box, lfw_dir: Path
) -> None:
    photo = lfw_image(lfw_dir, "Dominique_de_Villepin", 3).read_bytes()
    expired = box.service.enroll(
        OFFICE,
        display_name="Subject Expired",
        legal_basis="case closed",
        enrolled_by="setup",
        image_bytes=photo,
        face_index=central_face(box.service, photo),
        retention_until=date.today() - timedelta(days=1),
        allow_duplicate=True,
    ).subject.subject_id
    supervisor, csrf = sign_in(box, Role.SUPERVISOR)
    page = supervisor.get("/retention")
    assert expired in page.text and "Subject Expired" not in page.text
    fresh = box.subjects[PEOPLE[0][0]]
    refused = supervisor.post(
        f"/retention/{OFFICE}/{fresh}", data={"csrf_token": csrf, "confirm": fresh}
    )
    assert refused.status_code == 400  # not past its date
    erased = supervisor.post(
        f"/retention/{OFFICE}/{expired}", data={"csrf_token": csrf, "confirm": expired}
    )
    assert erased.status_code == 303
    assert expired not in {s.subject_id for s in box.service.subjects(OFFICE)}
    record = box.audit.query(action=AuditAction.DELETE_SUBJECT, limit=1)[0].event
    assert record.subject_id == expired and record.reason == "retention period over"
    assert record.detail is not None and "retention period over" in record.detail
    # Supervisors hold no face permission: the subject pages stay closed to them.
    assert supervisor.get(f"/galleries/{OFFICE}/subjects").status_code == 403


# -- the admin ---------------------------------------------------------------------------------


def test_admin_adds_a_user_with_a_one_time_password_and_manages_galleries(box: Box) -> None:
    """Access that widens (a gallery, an erasure) waits for a supervisor's approval on the
    Approvals page; what narrows it happens at once."""
    admin, csrf = sign_in(box, Role.ADMIN)
    supervisor, supervisor_csrf = sign_in(box, Role.SUPERVISOR)
    reason = "joins the field office investigations"

    def approve_all() -> None:
        page = supervisor.get("/approvals").text
        ids = re.findall(r'action="/approvals/([0-9a-f]+)/approve"', page)
        assert ids, "nothing to approve"
        for proposal_id in ids:
            done = supervisor.post(
                f"/approvals/{proposal_id}/approve", data={"csrf_token": supervisor_csrf}
            )
            assert done.status_code == 303

    refused = admin.post(
        "/admin/users",
        data={"csrf_token": csrf, "username": "Nina", "role": "investigator", "gallery": OFFICE},
    )
    assert refused.status_code == 400 and "give the reason" in refused.text
    assert UserStore(box.home, box.accounts).get("nina") is None
    reply = admin.post(
        "/admin/users",
        data={
            "csrf_token": csrf,
            "username": "Nina",
            "role": "investigator",
            "gallery": OFFICE,
            "reason": reason,
        },
    )
    assert reply.status_code == 200
    assert (
        "Waiting for a second person" in reply.text and "give nina access to office" in reply.text
    )
    once = re.search(r'<code class="token">([^<]+)</code>', reply.text)
    assert once is not None
    nina = UserStore(box.home, box.accounts).require("nina")
    assert nina.galleries == () and nina.must_change_password
    assert once.group(1) not in admin.get("/admin/users").text  # shown once only
    assert UserStore(box.home, box.accounts).authenticate("nina", once.group(1)) is not None
    approve_all()
    assert UserStore(box.home, box.accounts).require("nina").galleries == (OFFICE,)

    made = admin.post("/admin/galleries", data={"csrf_token": csrf, "name": "temporary"})
    assert made.status_code == 303
    admin.post(
        "/admin/users/nina",
        data={
            "csrf_token": csrf,
            "role": "investigator",
            "gallery": [OFFICE, "temporary"],
            "reason": reason,
        },
    )
    approve_all()
    assert UserStore(box.home, box.accounts).require("nina").galleries == (OFFICE, "temporary")
    wrong = admin.post(
        "/admin/galleries/temporary/delete",
        data={"csrf_token": csrf, "confirm_name": "temp", "reason": reason},
    )
    assert wrong.status_code == 400
    proposed = admin.post(
        "/admin/galleries/temporary/delete",
        data={"csrf_token": csrf, "confirm_name": "temporary", "reason": "no longer needed"},
    )
    assert proposed.status_code == 303
    assert "temporary" in [g.name for g in box.service.list_galleries()]  # waits
    assert "waits for a second person" in admin.get("/admin/galleries").text
    approve_all()
    assert "temporary" not in [g.name for g in box.service.list_galleries()]
    nina_now = UserStore(box.home, box.accounts).require("nina")
    assert nina_now.galleries == (OFFICE,)  # no stale access
    disabled = admin.post(
        "/admin/users/nina",
        data={"csrf_token": csrf, "role": "investigator", "gallery": OFFICE, "disabled": "yes"},
    )
    assert disabled.status_code == 303
    actions = [r.event.action for r in box.audit.query(user=box.users[Role.ADMIN], limit=20)]
    for expected in (
        AuditAction.USER_CREATED,
        AuditAction.CHANGE_PROPOSED,
        AuditAction.GALLERY_CREATED,
        AuditAction.USER_DISABLED,
    ):
        assert expected in actions, expected
    approved = [r.event.action for r in box.audit.query(user=box.users[Role.SUPERVISOR], limit=20)]
    for expected in (
        AuditAction.CHANGE_APPROVED,
        AuditAction.GALLERY_ACCESS_CHANGED,
        AuditAction.GALLERY_DELETED,
    ):
        assert expected in approved, expected


def test_admins_and_technicians_see_no_faces(box: Box) -> None:
    admin, _ = sign_in(box, Role.ADMIN)
    galleries = admin.get("/admin/galleries").text
    assert "Subject 1" not in galleries and "thumbnail" not in galleries
    technician, _ = sign_in(box, Role.TECHNICIAN)
    health = technician.get("/health")
    assert health.status_code == 200 and "dlib_resnet_v1" in health.text
    assert "Subject" not in health.text and OFFICE not in health.text


def test_users_manage_their_own_tokens(box: Box) -> None:
    browser, csrf = sign_in(box, Role.TECHNICIAN)
    refused = browser.post(
        "/account/tokens", data={"csrf_token": csrf, "name": "too much", "scope": "search"}
    )
    assert refused.status_code == 400 and "does not allow" in refused.text
    made = browser.post(
        "/account/tokens", data={"csrf_token": csrf, "name": "monitor", "scope": "health"}
    )
    secret = re.search(r'<code class="token">(edgeid_[^<]+)</code>', made.text)
    assert secret is not None
    api = client(box)
    api.headers["Authorization"] = f"Bearer {secret.group(1)}"
    assert api.get("/api/v1/health").json()["state"] == "ready"
    token_id = secret.group(1).split("_")[1]
    assert (
        browser.post(f"/account/tokens/{token_id}/revoke", data={"csrf_token": csrf}).status_code
        == 303
    )
    assert api.get("/api/v1/health").status_code == 401
    assert secret.group(1) not in browser.get("/account/tokens").text
    assert csrf_of(browser.get("/account/tokens").text) == csrf


def test_the_api_lists_the_galleries_a_token_may_search(box: Box) -> None:
    """Investigators could not list the galleries they may search (the list was admins')."""
    investigator = api_client(box, Role.INVESTIGATOR).get("/api/v1/galleries")
    assert investigator.status_code == 200
    assert [g["name"] for g in investigator.json()] == [OFFICE]  # not the other unit's
    admin = api_client(box, Role.ADMIN).get("/api/v1/galleries")
    assert {g["name"] for g in admin.json()} >= {OFFICE, "other"}
    technician = api_client(box, Role.TECHNICIAN).get("/api/v1/galleries")
    assert technician.status_code == 200 and technician.json() == []


def test_api_enrolment_from_a_group_photo_lists_the_faces_to_choose_from(
    box: Box, scenes_dir: Path
) -> None:
    """A group photo without face_index was answered only "send face_index"."""
    api = api_client(box, Role.INVESTIGATOR)
    photo = (scenes_dir / GROUP_PHOTO).read_bytes()
    form = {"display_name": "Subject Group", "legal_basis": "court order 21/2026"}
    before = len(box.service.subjects(OFFICE))
    asked = api.post(
        f"/api/v1/galleries/{OFFICE}/subjects", data=form, files={"photo": ("g.jpg", photo)}
    )
    assert asked.status_code == 422 and "face_index" in asked.json()["error"]
    faces = asked.json()["faces"]
    assert len(faces) == len(box.service.analyse(photo).faces) > 1
    assert all({"index", "box", "quality", "enrollable"} <= set(f) for f in faces)
    assert len(box.service.subjects(OFFICE)) == before  # nothing enrolled yet
    chosen = max(faces, key=lambda f: f["quality"])
    assert chosen["enrollable"]
    made = api.post(
        f"/api/v1/galleries/{OFFICE}/subjects",
        data={**form, "face_index": str(chosen["index"]), "allow_duplicate": "yes"},
        files={"photo": ("g.jpg", photo)},
    )
    assert made.status_code == 201, made.text
    assert len(box.service.subjects(OFFICE)) == before + 1
