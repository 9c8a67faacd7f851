"""Case, audit, retention, admin and health pages as a person uses them, in Debian's Chromium
against a served box holding a real case (LFW photos ingested and clustered, each cluster
searched): clusters with a lead above the threshold first, lead filters and paging, best faces
above the quality gate; the audit log found by a case number's beginning with times on one
line; erasure behind its own confirmation page; health in human units; error messages as
sentences; nothing scrolls sideways at tablet width (768 px)."""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from test_web_flow import CHROMIUM, CHROMIUM_ARGS, PAGE_TIMEOUT_MS
from web_support import (
    OFFICE,
    PASSWORD,
    PEOPLE,
    Box,
    build_box,
    central_face,
    free_port,
    lfw_image,
    serving,
    sign_in,
    tls_settings,
)

from edgeid.runtime.accounts.roles import Role
from edgeid.runtime.audit import AuditAction
from edgeid.runtime.cases import browse
from edgeid.runtime.cases.ingest import IngestRequest, Requester
from edgeid.runtime.cases.views import BEST_MIN_QUALITY

CASE = "VID-2026/0300"
REASON = "photos from a seized phone, warrant W-300/2026"
OTHERS = ("Tom_Cruise", "Nancy_Pelosi", "Muhammad_Ali", "William_Macy")
PER_PAGE = 2  # clusters a page here, so that a small case has several pages
TABLET = 768
CONFIRM_HEADING = "Erase a subject past its retention date"


def photos(folder: Path) -> list[Path]:
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, lfw_dir: Path, models_dir: Path
) -> Iterator[tuple[str, Box, str]]:
    """A box with a case of real photos: two more of each enrolled person, two each of four
    people nobody enrolled, and a truncated photo; the case's id."""
    home = tmp_path_factory.mktemp("case-pages")
    box = build_box(home, lfw_dir, models_dir, tls_settings(home))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for person, enrolled, probe in PEOPLE:
            archive.write(lfw_image(lfw_dir, person, probe), f"phone/{person[:3]}-{probe}.jpg")
            other = next(
                p
                for p in photos(lfw_dir / "images" / person)
                if p.name not in (f"{person}_{enrolled:04d}.jpg", f"{person}_{probe:04d}.jpg")
            )
            archive.write(other, f"phone/{person[:3]}-x.jpg")
        for person in OTHERS:
            for path in photos(lfw_dir / "images" / person)[:2]:
                archive.write(path, f"phone/camera/{person[:3]}-{path.name[-8:]}")
        broken = lfw_image(lfw_dir, PEOPLE[0][0], PEOPLE[0][2]).read_bytes()[:3000]
        archive.writestr("phone/broken.jpg", broken)
    source = home / "seized.zip"
    source.write_bytes(buffer.getvalue())
    assert box.cases is not None
    box.cases.ingest(
        IngestRequest(
            source=source,
            case_number=CASE,
            reason=REASON,
            requester=Requester(box.users[Role.INVESTIGATOR]),
            galleries=(OFFICE,),
            source_label="seized phone.zip",
        )
    )
    source.unlink()
    case_id = box.cases.list_cases()[0].case_id
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(browse, "PAGE_CLUSTERS", PER_PAGE)
        with serving(box.app, box.settings, free_port()) as url:
            yield url, box, case_id
    box.close()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def page_of(chromium: Browser, url: str, role: Role, box: Box) -> Page:
    page = chromium.new_context(ignore_https_errors=True).new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(f"{url}/login")
    page.get_by_label("User name").fill(box.users[role])
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    return page


def work_on_case(page: Page, url: str) -> None:
    page.goto(f"{url}/context")
    page.get_by_label("Case number").fill(CASE)
    page.get_by_label("Reason").fill(REASON)
    page.get_by_role("button", name="Continue").click()
    expect(page.get_by_role("heading", name="Which case are you working on?")).to_have_count(0)


def no_sideways_scrolling(page: Page) -> None:
    page.set_viewport_size({"width": TABLET, "height": 1000})
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= TABLET, f"{page.url} is {width} px wide at {TABLET} px"


def test_a_case_page_puts_leads_above_the_threshold_first_and_filters_and_pages(
    served: tuple[str, Box, str], chromium: Browser
) -> None:
    url, box, case_id = served
    page = page_of(chromium, url, Role.INVESTIGATOR, box)
    work_on_case(page, url)
    page.goto(f"{url}/cases/{case_id}")
    summary = page.locator("#lead-summary")
    expect(summary).to_contain_text("have a lead above the threshold")
    matched = int(re.search(r"(\d+) of \d+ cluster", summary.inner_text()).group(1))  # type: ignore[union-attr]
    assert matched >= 1, "the enrolled people's photos should give leads above the threshold"
    clusters = page.locator("section.cluster")
    expect(clusters.first.locator("h3")).to_contain_text("above the threshold")
    # By default only leads above the threshold are listed; the weaker are counted.
    assert page.locator("table.candidates tr.below").count() == 0
    assert page.locator("table.candidates tr.above").count() >= 1
    expect(page.get_by_text(re.compile(r"weaker lead\(s\) below the threshold"))).not_to_have_count(
        0
    )
    # A cluster's best faces pass the quality gate.
    best = page.locator("ul.thumbs figure").filter(
        has=page.locator('img:not([alt*="below the quality gate"])')
    )
    assert best.count() >= 1
    for caption in best.locator("figcaption").all_inner_texts():
        quality = float(re.search(r"quality (\d\.\d\d)", caption).group(1))  # type: ignore[union-attr]
        assert quality >= BEST_MIN_QUALITY, caption
    expect(page.get_by_text(re.compile(r"Page 1 of \d+"))).to_be_visible()
    no_sideways_scrolling(page)

    page.set_viewport_size({"width": 1280, "height": 1000})
    page.get_by_label("Leads shown").select_option("all")
    page.get_by_role("button", name="Show").click()
    expect(page).to_have_url(re.compile(r"leads=all"))
    assert page.locator("table.candidates tr.below").count() >= 1
    for table in page.locator("table.candidates").all():
        kinds = table.locator("tbody tr").evaluate_all("rows => rows.map(r => r.className)")
        assert kinds == sorted(kinds), "leads above the threshold come before those below"
    first_page = page.locator("section.cluster h3").all_inner_texts()
    page.get_by_role("link", name="Next clusters").click()
    expect(page.get_by_text(re.compile(r"Page 2 of \d+"))).to_be_visible()
    expect(page).to_have_url(re.compile(r"leads=all.*page=2|page=2.*leads=all"))
    assert not set(page.locator("section.cluster h3").all_inner_texts()) & set(first_page)

    page.get_by_label("Leads shown").select_option("below")
    page.get_by_role("button", name="Show").click()
    assert page.locator("table.candidates tr.above").count() == 0
    # The unreadable photo's reason is a sentence that says what to do.
    reason = page.locator("td", has_text="damaged or incomplete").first.inner_text()
    assert reason.startswith("This image is damaged") and reason.endswith(".")
    assert "bytes not processed" not in page.content()


def test_the_report_shows_each_lead_beside_its_enrolled_photo(
    served: tuple[str, Box, str],
) -> None:
    _, box, case_id = served
    browser, csrf = sign_in(box, Role.INVESTIGATOR)
    reply = browser.post("/context", data={"csrf_token": csrf, "case": CASE, "reason": REASON})
    assert reply.status_code == 303
    before = box.audit.last_seq
    report = browser.get(f"/cases/{case_id}/report.html")
    assert report.status_code == 200
    html = report.text
    enrolled = html.count('alt="enrolled photo" src="data:image/jpeg;base64,')
    assert enrolled >= 1 and enrolled == html.count('alt="case face"')
    assert "bytes not processed" not in html
    made = [
        r.event
        for r in box.audit.query(limit=10)
        if r.seq > before and r.event.action is AuditAction.CASE_REPORT
    ]
    assert len(made) == 1 and made[0].case == CASE
    assert "enrolled photos of" in (made[0].detail or "")


def test_the_audit_log_finds_cases_by_the_start_of_their_number_times_on_one_line(
    served: tuple[str, Box, str], chromium: Browser
) -> None:
    url, box, _ = served
    page = page_of(chromium, url, Role.SUPERVISOR, box)
    page.goto(f"{url}/audit")
    page.get_by_label("Case number, or its beginning").fill("vid-2026")  # any letter case
    page.get_by_role("button", name="Filter").click()
    cases = set(page.locator("table.audit td.case").all_inner_texts())
    assert cases == {CASE}, cases
    when = page.locator("table.audit td.when").first
    expect(when).to_have_text(re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$"))
    lines = when.evaluate(
        "td => { const r = document.createRange(); r.selectNodeContents(td);"
        " return r.getClientRects().length; }"
    )
    assert lines == 1, "the time wraps"
    page.get_by_label("Case number, or its beginning").fill("VID-2027")
    page.get_by_role("button", name="Filter").click()
    expect(page.get_by_text("No record matches.")).to_be_visible()
    no_sideways_scrolling(page)


def test_erasure_has_its_own_confirmation_page_and_no_button_in_a_table(
    served: tuple[str, Box, str], chromium: Browser, lfw_dir: Path
) -> None:
    url, box, _ = served
    person = "Amelie_Mauresmo"
    image = photos(lfw_dir / "images" / person)[0].read_bytes()
    subject = box.service.enroll(
        OFFICE,
        display_name="Subject Expired",
        legal_basis="test",
        enrolled_by="setup",
        image_bytes=image,
        face_index=central_face(box.service, image),
        retention_until=date.today() - timedelta(days=1),
    ).subject.subject_id
    page = page_of(chromium, url, Role.SUPERVISOR, box)
    page.goto(f"{url}/retention")
    assert page.locator("table button").count() == 0
    page.get_by_role("link", name=f"Erase subject {subject}").click()
    expect(
        page.get_by_role("heading", name="Erase a subject past its retention date")
    ).to_be_visible()
    no_sideways_scrolling(page)
    page.set_viewport_size({"width": 1280, "height": 1000})
    before = box.audit.last_seq
    page.get_by_role("button", name=f"Erase subject {subject}").click()  # box not ticked
    expect(
        page.get_by_role("heading", name="Erase a subject past its retention date")
    ).to_be_visible()
    assert all(r.seq <= before for r in box.audit.query(limit=5))  # the browser refused
    page.get_by_label(re.compile("I confirm")).check()
    page.get_by_role("button", name=f"Erase subject {subject}").click()
    expect(page.get_by_role("status")).to_contain_text(f"Subject {subject} erased")
    erased = [
        r.event
        for r in box.audit.query(limit=10)
        if r.seq > before and r.event.action is AuditAction.DELETE_SUBJECT
    ]
    assert len(erased) == 1 and erased[0].subject_id == subject

    admin = page_of(chromium, url, Role.ADMIN, box)
    admin.goto(f"{url}/admin/galleries")
    assert admin.locator("table button, table .danger").count() == 0
    admin.get_by_role("link", name=f"Erase gallery {OFFICE}").click()
    expect(admin).to_have_url(re.compile(rf"/admin/galleries/{OFFICE}/delete$"))
    no_sideways_scrolling(admin)
    admin.goto(f"{url}/admin/users")
    role_help = admin.locator("#role-help")
    expect(role_help).to_contain_text("Searches faces")
    assert "subjects:read" not in admin.content()  # no raw permission strings
    no_sideways_scrolling(admin)


def test_health_speaks_in_human_units_and_errors_in_sentences(
    served: tuple[str, Box, str], chromium: Browser, lfw_dir: Path
) -> None:
    url, box, _ = served
    box.clock.advance(3 * 86400 + 2 * 3600 + 5)
    page = page_of(chromium, url, Role.TECHNICIAN, box)
    page.goto(f"{url}/health")
    facts = page.locator("dl.facts").first
    expect(facts).to_contain_text("Service up for3 days 2 hours")
    expect(facts).to_contain_text(re.compile(r"Memory[\d.]+ [MGT]B free of [\d.]+ [MGT]B"))
    expect(facts).to_contain_text(re.compile(r"Memory the service uses[\d.]+ [kMG]B"))
    assert not re.search(r"\d s</dd>", page.content())
    no_sideways_scrolling(page)

    browser, csrf = sign_in(box, Role.INVESTIGATOR)
    person, _, probe = PEOPLE[1]
    photo = lfw_image(lfw_dir, person, probe).read_bytes()[:3000]  # cut off on the way
    reply = browser.post(
        "/enrol",
        data={
            "csrf_token": csrf,
            "gallery": OFFICE,
            "display_name": "Broken",
            "legal_basis": "warrant 17/2025",
        },
        files={"photo": ("broken.jpg", photo)},
    )
    error = re.search(r'<p class="error" role="alert">([^<]+)</p>', reply.text)
    assert error, reply.text[:500]
    message = error.group(1)
    # A sentence: the stylesheet capitalises an error's first letter; the page ends it.
    assert message.startswith("the photo is damaged or incomplete") and message.endswith(".")
    assert "use a complete copy" in message and "not processed" not in message
