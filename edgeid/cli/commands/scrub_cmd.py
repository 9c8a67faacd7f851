"""`edgeid scrub`: read every sealed file of the box and report each object OK or DAMAGED.

Nothing is written and nothing personal is shown (ids, file names and counts only); exit 1
when anything is damaged, with the command that repairs it. Stop `edgeid serve` first: the
galleries are opened by one process at a time.
"""

from __future__ import annotations

import argparse

from edgeid.cli import EXIT_FAILED, EXIT_OK, emit
from edgeid.cli.options import Subparsers
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.services.scrub import scrub
from edgeid.runtime.vault.key_choice import provider_for


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.home_dir)
    with GalleryStore(args.home_dir, provider_for(args.home_dir, settings.keys)) as store:
        checked = scrub(args.home_dir, store)
    damaged = [c for c in checked if not c.ok]
    lines = [
        f"{'OK' if c.ok else 'DAMAGED':8} {c.kind:10} {c.name}"
        + (f": {c.problem}" if c.problem else "")
        for c in checked
    ]
    lines.append(f"{len(checked)} objects checked, {len(damaged)} damaged")
    payload = {
        "checked": len(checked),
        "damaged": len(damaged),
        "objects": [
            {"kind": c.kind, "name": c.name, "ok": c.ok, "problem": c.problem} for c in checked
        ],
    }
    emit(args, payload, "\n".join(lines))
    return EXIT_FAILED if damaged else EXIT_OK


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "scrub", parents=[common], help="verify every sealed file; report damage (no writes)"
    )
    p.set_defaults(handler=run)
