"""Result modes, the comparison view and the search history, as an investigator uses them in
Debian's Chromium (Playwright), against the app served over TLS by uvicorn.

A stranger's search in identification mode shows no face and no name; investigation mode is
recorded and reveals a name only when a candidate is opened; confirming a candidate below the
threshold without a note is refused; a search survives signing out and in, and is listed on
its case page.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright
from test_search_history import ingest_case, stranger
from test_web_flow import CHROMIUM, CHROMIUM_ARGS, PAGE_TIMEOUT_MS
from web_support import (
    PASSWORD,
    Box,
    build_box,
    central_face,
    free_port,
    loaded_widths,
    serving,
    sign_in,
    tls_settings,
)

from edgeid.runtime.accounts.roles import Role
from edgeid.runtime.audit import AuditAction

CASE = "FLOW-2026/14"
REASON = "identify the person in exhibit 14, photo 3"
NAMED = re.compile(r"Subject [0-9X]")


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, lfw_dir: Path, models_dir: Path
) -> Iterator[tuple[Box, str]]:
    home = tmp_path_factory.mktemp("results-flow")
    box = build_box(home, lfw_dir, models_dir, tls_settings(home))
    try:
        with serving(box.app, box.settings, free_port()) as url:
            yield box, url
    finally:
        box.close()


def sign_in_page(page: Page, url: str, user: str) -> None:
    page.goto(f"{url}/login")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()


def search(page: Page, url: str, photo: Path, mode: str, face: int) -> None:
    page.goto(f"{url}/search")
    page.get_by_label("Case number").fill(CASE)
    page.get_by_label("Reason for this search").fill(REASON)
    page.get_by_label("Apparent age of the person in the photo").select_option("adult")
    page.get_by_label(mode).check()
    page.get_by_role("button", name="Continue to the photo").click()
    page.get_by_label(re.compile(r"^Photo")).set_input_files(str(photo))
    page.get_by_role("button", name="Find faces").click()
    page.get_by_role("button", name=f"Search with face {face}", exact=True).click()


def test_modes_comparison_and_history_in_chromium(
    served: tuple[Box, str], lfw_dir: Path, tmp_path: Path
) -> None:
    box, url = served
    photo = tmp_path / "stranger.jpg"
    photo.write_bytes(stranger(lfw_dir))
    face = central_face(box.service, photo.read_bytes()) + 1
    user = box.users[Role.INVESTIGATOR]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(ignore_https_errors=True)
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        page = context.new_page()
        try:
            sign_in_page(page, url, user)

            # Identification (the default) of a stranger: "no match" and nothing else.
            search(page, url, photo, "Identification", face)
            expect(page.get_by_role("status")).to_contain_text("No match in 3 enrolled face(s).")
            main = page.locator("main")
            assert not NAMED.search(main.inner_text()), "a name was shown"
            expect(main.locator("img[src*='/thumbnail.jpg']")).to_have_count(0)
            expect(
                main.get_by_role("link", name=re.compile("^(Compare|Open) candidate"))
            ).to_have_count(0)

            # Investigation: chosen, recorded; faces first, every row not a match claim.
            seq = box.audit.query(limit=1)[0].seq
            search(page, url, photo, "Investigation", face)
            expect(page.get_by_role("heading", name=re.compile("^Investigation"))).to_be_visible()
            rows = page.locator("ol.results li.result")
            expect(rows).to_have_count(3)
            for i in range(3):
                expect(rows.nth(i)).to_contain_text("Not a match claim.")
                expect(rows.nth(i)).to_contain_text("scores this high")
            assert not NAMED.search(main.inner_text()), "an investigation named a candidate"
            widths = loaded_widths(rows.locator("img"))
            assert len(widths) == 3 and all(w > 0 for w in widths), widths
            (recorded,) = [
                r
                for r in box.audit.query(limit=50)
                if r.seq > seq and r.event.action is AuditAction.SEARCH
            ]
            assert "mode investigation" in (recorded.event.detail or "")

            # Opening rank 1 reveals its name (recorded) beside the probe, large.
            rows.nth(0).get_by_role("link", name="Open candidate 1").click()
            expect(page.get_by_role("heading", name=NAMED)).to_be_visible()
            opened = [
                r for r in box.audit.query(limit=50) if r.event.action is AuditAction.SUBJECT_VIEWED
            ]
            assert opened and opened[0].event.case == CASE
            sizes = loaded_widths(page.locator(".comparison img"))
            assert sizes and all(s == 450 for s in sizes), sizes
            page.get_by_role("link", name="Zoom in (full size)").first.click()
            assert loaded_widths(page.locator("img").first) == [900]
            page.go_back()

            # Below the threshold: a confirmation without a note is refused, then accepted.
            expect(page.locator("main")).to_contain_text("Below the threshold")
            page.get_by_role("button", name="Lead confirmed").click()
            expect(page.get_by_role("alert")).to_contain_text("below the threshold")
            expect(page.get_by_role("status")).to_have_count(0)
            page.get_by_label(re.compile("^Note")).fill("same birthmark on the neck as exhibit 14")
            page.get_by_role("button", name="Lead confirmed").click()
            expect(page.get_by_role("status").first).to_have_text("Recorded: lead confirmed.")
            page.get_by_role("button", name="Sign out").click()

            # Signed in again: the searches are in My searches, the decision with them.
            sign_in_page(page, url, user)
            page.get_by_role("link", name="My searches").click()
            history = page.locator("table.history tbody tr")
            expect(history).to_have_count(2)
            expect(history.nth(0)).to_contain_text("Investigation")
            expect(history.nth(0)).to_contain_text("1 confirmed, 0 rejected")
            expect(history.nth(1)).to_contain_text("No match in 3")
            history.nth(0).get_by_role("link").click()
            expect(page.locator("ol.results li.result")).to_have_count(3)
            expect(page.locator("ol.results li.result").nth(0)).to_contain_text(
                "Recorded: lead confirmed"
            )

            # Its case page lists both searches (the case ingested through the same app).
            api, csrf = sign_in(box, Role.INVESTIGATOR)
            case_id = ingest_case(box, api, csrf, lfw_dir, CASE)
            page.goto(f"{url}/context")
            page.get_by_label("Case number").fill(CASE)
            page.get_by_label("Reason").fill(REASON)
            page.get_by_role("button", name="Continue").click()
            page.goto(f"{url}/cases/{case_id}")
            section = page.locator("section", has=page.locator("#case-searches"))
            expect(section.locator("tbody tr")).to_have_count(2)
            expect(section).to_contain_text("Investigation")
            expect(section).to_contain_text(f"lead confirmed (rank 1, {user})")
        finally:
            context.close()
            browser.close()
