"""`make screenshots`: a PNG of every web page at desktop (1280 px) and tablet (768 px) width,
full length, so a reviewer can look at all of them at once.

The box is the tests' (tests/page_walk.py: LFW faces enrolled through the real pipeline, every
role signed in, a search, a case and a group-photo enrolment set up) in a scratch folder; the
PNGs go to ``$EDGEID_HOME/screenshots`` (not committed). Named ``<role>--<path>-<width>.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from page_walk import walk  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402
from test_web_a11y import DESKTOP_PX, TABLET_PX, open_as  # noqa: E402
from test_web_flow import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

from edgeid.models.build import build_models  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    home = Path(os.environ.get("EDGEID_HOME", REPO / "var"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=home / "screenshots")
    parser.add_argument("--only", default="", help="only pages whose path contains this")
    args = parser.parse_args(argv)
    models = home / "models"
    build_models(models, home / "wheelhouse")  # a no-op when already built
    args.out.mkdir(parents=True, exist_ok=True)
    written = 0
    with (
        tempfile.TemporaryDirectory(prefix="edgeid-shots-") as scratch,
        walk(Path(scratch), args.data / "lfw-dev", args.data / "scenes", models) as w,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(
            ignore_https_errors=True, viewport={"width": DESKTOP_PX, "height": 900}
        )
        try:
            for visit in w.visits:
                if args.only not in visit.path:
                    continue
                page = open_as(context, w, visit)
                for width in (DESKTOP_PX, TABLET_PX):
                    page.set_viewport_size({"width": width, "height": 900})
                    page.screenshot(path=args.out / f"{visit.name}-{width}.png", full_page=True)
                    written += 1
                page.close()
        finally:
            browser.close()
    print(f"{written} screenshots in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
