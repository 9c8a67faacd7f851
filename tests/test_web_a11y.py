"""Every page, opened in Debian's Chromium as a person allowed to see it, passes axe-core's
WCAG 2.1 A and AA rules and fits a 768 px wide tablet without sideways scrolling.

axe-core is the npm package pinned in tests/a11y/package.json; ``make test`` installs it
(`npm ci`). It is evaluated in the page through the DevTools protocol, so the pages keep their
real Content-Security-Policy (no script of theirs, none injected into the document).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from page_walk import Visit, Walk, walk
from playwright.sync_api import BrowserContext, Page, sync_playwright
from test_web_flow import CHROMIUM, CHROMIUM_ARGS, PAGE_TIMEOUT_MS

AXE = Path(__file__).resolve().parent / "a11y" / "node_modules" / "axe-core" / "axe.min.js"
WCAG_21_AA = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
TABLET_PX = 768
DESKTOP_PX = 1280


def open_as(browser_context: BrowserContext, w: Walk, visit: Visit) -> Page:
    browser_context.clear_cookies()
    if visit.role is not None:
        browser_context.add_cookies(
            [{"name": w.cookie_name, "value": w.cookies[visit.role], "url": w.url}]
        )
    page = browser_context.new_page()
    if visit.path.endswith(".html"):
        # A download (the case report): opened as the file it is, once saved.
        answer = page.request.get(w.url + visit.path)
        assert answer.status == visit.status, f"{visit.name}: {answer.status}"
        page.set_content(answer.text())
        return page
    reply = page.goto(w.url + visit.path)
    assert reply is not None
    assert reply.status == visit.status, f"{visit.name}: {reply.status}"
    # Redirected (to sign in, or to state a work context): the page itself was not seen.
    landed = page.url.removeprefix(w.url).split("?")[0]
    assert landed == visit.path, f"{visit.path} went to {landed}"
    return page


def axe_violations(page: Page) -> list[str]:
    page.evaluate(AXE.read_text())
    result = page.evaluate(
        "tags => axe.run(document, {runOnly: {type: 'tag', values: tags}})", WCAG_21_AA
    )
    found = []
    for violation in result["violations"]:
        targets = [" ".join(map(str, node["target"])) for node in violation["nodes"][:3]]
        found.append(f"{violation['id']} ({violation['impact']}): {'; '.join(targets)}")
    return found


def overflow_px(page: Page) -> int:
    width = page.evaluate("document.documentElement.scrollWidth")
    return int(width) - TABLET_PX


@pytest.fixture(scope="module")
def walked(
    tmp_path_factory: pytest.TempPathFactory, lfw_dir: Path, scenes_dir: Path, models_dir: Path
) -> Walk:
    if not AXE.exists():
        pytest.fail(f"axe-core is not installed at {AXE}: run `make test` (it runs npm ci)")
    with walk(tmp_path_factory.mktemp("walk"), lfw_dir, scenes_dir, models_dir) as w:
        yield w  # type: ignore[misc]


def test_every_page_is_walked(walked: Walk) -> None:
    unfilled = walked.unfilled
    assert not unfilled, f"pages the walk cannot open (give page_walk a value): {unfilled}"
    routes = {v.route for v in walked.visits}
    for expected in ("/", "/login", "/searches/{search_id}", "/health", "/audit"):
        assert expected in routes


def test_every_page_passes_axe_and_fits_a_tablet(walked: Walk) -> None:
    problems: dict[str, list[str]] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(
            ignore_https_errors=True, viewport={"width": DESKTOP_PX, "height": 900}
        )
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        try:
            for visit in walked.visits:
                try:
                    page = open_as(context, walked, visit)
                except AssertionError as exc:  # every page's problems, not only the first
                    problems[visit.name] = [str(exc)]
                    continue
                found = axe_violations(page)
                page.set_viewport_size({"width": TABLET_PX, "height": 1024})
                wider = overflow_px(page)
                if wider > 0:
                    found.append(f"scrolls sideways at {TABLET_PX} px: {wider} px too wide")
                if found:
                    problems[f"{visit.name} ({visit.path})"] = found
                page.close()
        finally:
            browser.close()
    assert not problems, json.dumps(problems, indent=1)
