"""The investigator's day, as a person does it, in Debian's Chromium driven by Playwright.

The box is made by `edgeid init` (HTTPS certificate, first admin with a one-time password),
served over TLS by uvicorn on a free loopback port, with LFW faces enrolled through the real
pipeline. One browser session: the admin changes the one-time password and adds an
investigator and a supervisor; the supervisor approves the investigator's gallery access (the
two-person rule); the investigator searches a real photo with a case number and a reason,
opens the match's comparison view and confirms the lead there; the supervisor finds the search
on the audit page.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright
from web_support import (
    OFFICE,
    PEOPLE,
    central_face,
    free_port,
    lfw_image,
    loaded_widths,
    populate,
    serving,
)

from edgeid.cli import main
from edgeid.runtime.audit import AuditLog
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.gallery.service import GalleryService
from edgeid.runtime.inference.pipeline import FacePipeline
from edgeid.runtime.web.app import create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CASE = "VID-2025-0117"
REASON = "identify the child in seized image 4 of exhibit 12"
# The flow waits on pages, never on the clock; this only bounds a hung page.
PAGE_TIMEOUT_MS = 60_000


def init_box(home: Path) -> dict[str, str]:
    """`edgeid init` as the technician runs it; its JSON report."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["init", "--home", str(home), "--json"]) == 0
    report: dict[str, str] = json.loads(out.getvalue())
    return report


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, lfw_dir: Path, models_dir: Path
) -> Iterator[tuple[str, dict[str, str], int]]:
    """The served box's URL, `edgeid init`'s report, and which face of the probe photo is
    the enrolled person (LFW centres its person; others may show at the edges)."""
    home = tmp_path_factory.mktemp("flow")
    report = init_box(home)
    settings = load_settings(home)
    assert settings.web.tls_cert, "edgeid init made no certificate"
    pipeline = FacePipeline.load(models_dir)
    with GalleryService.open(home, settings, pipeline=pipeline) as service:
        populate(service, lfw_dir)
        person, _, probe = PEOPLE[0]
        face = central_face(service, lfw_image(lfw_dir, person, probe).read_bytes())
        with AuditLog.open(home, service.store.keyring) as audit:
            app = create_app(
                home,
                settings,
                galleries=service,
                audit=audit,
                version="test",
                models_dir=models_dir,
            )
            with serving(app, settings, free_port()) as url:
                yield url, report, face + 1


def sign_in(page: Page, url: str, user: str, password: str) -> None:
    page.goto(f"{url}/login")
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


def choose_password(page: Page, once: str, new: str) -> None:
    expect(page.get_by_role("heading", name="Choose your password")).to_be_visible()
    page.get_by_label("Current one-time password").fill(once)
    page.get_by_label("New password (at least 12 characters)").fill(new)
    page.get_by_label("New password again").fill(new)
    page.get_by_role("button", name="Change password").click()
    expect(page.get_by_role("status")).to_have_text("Password changed.")


def add_user(page: Page, url: str, name: str, role: str, gallery: str | None) -> str:
    page.goto(f"{url}/admin/users")
    form = page.locator("form[action='/admin/users']")
    form.get_by_label("User name").fill(name)
    form.get_by_label("Role").select_option(role)
    if gallery:
        form.get_by_label(gallery).check()
        form.get_by_label(re.compile(r"^Reason")).fill(f"{name} joins the unit using {gallery}")
    form.get_by_role("button", name="Add user").click()
    expect(page.get_by_role("heading", name=f"User {name} created")).to_be_visible()
    if gallery:
        expect(page.get_by_role("status")).to_contain_text(f"give {name} access to {gallery}")
    return page.locator("code.token").inner_text()


def test_search_confirm_a_lead_and_find_it_in_the_audit(
    served: tuple[str, dict[str, str], int], lfw_dir: Path
) -> None:
    url, report, face = served
    person, _, probe = PEOPLE[0]  # enrolled as "Subject 1"; the probe is another photo
    photo = lfw_image(lfw_dir, person, probe)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(ignore_https_errors=True)
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        page = context.new_page()
        try:
            # The admin's first sign-in: the one-time password from `edgeid init` must go.
            sign_in(page, url, report["admin"], report["one_time_password"])
            choose_password(page, report["one_time_password"], "admin passphrase 1")
            cookies = {c["name"]: c for c in context.cookies()}
            session = cookies["__Host-edgeid-session"]
            assert session["secure"] and session["httpOnly"] and session["sameSite"] == "Strict"
            investigator_once = add_user(page, url, "ivy", "investigator", OFFICE)
            supervisor_once = add_user(page, url, "sam", "supervisor", None)
            page.get_by_role("button", name="Sign out").click()

            # The supervisor approves the investigator's gallery (a second person).
            sign_in(page, url, "sam", supervisor_once)
            choose_password(page, supervisor_once, "supervisor passphrase")
            page.get_by_role("link", name="Approvals").click()
            row = page.locator("table.approvals tbody tr")
            expect(row).to_contain_text(f"give ivy access to {OFFICE}")
            row.get_by_role("button", name="Approve").click()
            expect(page.get_by_role("status")).to_contain_text("Approved and done")
            page.get_by_role("button", name="Sign out").click()

            # The investigator: password, then case and reason before any photo.
            sign_in(page, url, "ivy", investigator_once)
            choose_password(page, investigator_once, "investigator passphrase")
            page.goto(f"{url}/search")
            expect(page.get_by_label(re.compile(r"^Photo"))).to_have_count(0)
            page.get_by_label("Case number").fill(CASE)
            page.get_by_label("Reason for this search").fill(REASON)
            page.get_by_label("Apparent age of the person in the photo").select_option("child")
            page.get_by_role("button", name="Continue to the photo").click()
            page.get_by_label(re.compile(r"^Photo")).set_input_files(str(photo))
            page.get_by_role("button", name="Find faces").click()
            expect(page.get_by_role("heading", name="Faces in the photo")).to_be_visible()
            faces = page.locator("table.faces tbody tr")
            assert faces.count() >= 1
            expect(page.locator("svg.photo rect.facebox")).to_have_count(faces.count())
            page.get_by_role("button", name=f"Search with face {face}", exact=True).click()

            # Identification (the default): the match by name, its strength in words, the
            # child-reliability note; a decision lives only in the comparison view.
            expect(
                page.get_by_role("heading", name=re.compile(f"^Identification: face {face}"))
            ).to_be_visible()
            expect(page.get_by_role("note")).to_contain_text("children aged 0-12")
            first = page.locator("li.result").nth(0)
            expect(first).to_contain_text("Subject 1")
            expect(first).to_contain_text("strong")
            expect(first).to_contain_text(
                re.compile(r"A stranger \(children aged 0-12\) scores this high about 1 in")
            )
            expect(page.get_by_role("img", name=f"Probe face {face}")).to_be_visible()
            expect(page.get_by_role("button", name=re.compile("Lead confirmed"))).to_have_count(0)
            loaded = loaded_widths(page.locator("main img"))
            assert loaded and all(width > 0 for width in loaded), "an image did not load"
            first.get_by_role("link", name="Compare candidate 1").click()

            expect(
                page.get_by_role("heading", name="Compare candidate 1: Subject 1")
            ).to_be_visible()
            expect(page.get_by_role("img", name=re.compile("^Probe face"))).to_be_visible()
            expect(
                page.get_by_role("img", name=re.compile("^Enrolled photo 1 of 1"))
            ).to_be_visible()
            loaded = loaded_widths(page.locator(".comparison img"))
            assert loaded == [450, 450], f"the comparison's faces are not large: {loaded}"
            page.get_by_role("link", name="Show the alignment marks").click()
            expect(page.get_by_role("link", name="Hide the alignment marks")).to_be_visible()
            page.get_by_role("button", name="Lead confirmed").click()
            expect(page.get_by_role("status").first).to_have_text("Recorded: lead confirmed.")
            expect(page.locator("section")).to_contain_text("Recorded: lead confirmed by ivy")
            page.get_by_role("button", name="Sign out").click()

            # The supervisor finds the search and the decision by case number.
            sign_in(page, url, "sam", "supervisor passphrase")
            page.goto(f"{url}/audit")
            page.get_by_label("Case number").fill(CASE)
            page.get_by_role("button", name="Filter").click()
            records = page.locator("table.audit tbody tr")
            expect(records).to_have_count(3)  # the search, the comparison opened, the decision
            decision, opened, search = records.nth(0), records.nth(1), records.nth(2)
            expect(opened).to_contain_text("subject_viewed")
            expect(search).to_contain_text("search")
            expect(search).to_contain_text("ivy")
            expect(search).to_contain_text(REASON)
            expect(search).to_contain_text("probe sha256")
            expect(decision).to_contain_text("lead confirmed")
        finally:
            context.close()
            browser.close()
