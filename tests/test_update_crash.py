"""Killed at every step of an install, the box always comes back on a working slot.

The install runs in a real process (what `edgeid update install` calls) that SIGKILLs itself
at its N-th crash point (EDGEID_UPDATE_CRASH_AT, a test hook), for N = 1, 2, … until a run
completes. After each kill, the recovery the unit runs at start-up (``resume``) must leave
the box on a committed slot whose files are, byte for byte, the old version or the new one,
with a passing health check, and exactly one telemetry event for the update once it got as
far as the switch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from update_box import REPO_ROOT, Box, make_bundle, tree

from edgeid.updater.crashpoints import CRASH_ENV
from edgeid.updater.events import UPDATE_APPLIED, UPDATE_ROLLED_BACK, EventOutbox
from edgeid.updater.manager import UpdateManager, resume
from edgeid.updater.slots import DirectorySlots
from edgeid.updater.state import StateJournal

MIN_CRASH_POINTS = 20  # the bar
MAX_CRASH_POINTS = 60  # a run that never completes is a bug, not a longer test
KILLED_AT = re.compile(r"killing this process at (.+)$", re.MULTILINE)


# What `edgeid update install` runs, in a process that imports only the updater: the CLI
# loads every command group, which would make 40-odd runs slow without testing more.
INSTALL = """
import logging, sys
from pathlib import Path
from edgeid.updater.manager import UpdateManager
logging.basicConfig(level=logging.WARNING, format="%(message)s")
result = UpdateManager.for_home(Path(sys.argv[1])).install(Path(sys.argv[2]))
sys.exit(0 if result.ok else 1)
"""


def _install(home: Path, bundle: Path, crash_at: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", INSTALL, str(home), str(bundle)],
        cwd=REPO_ROOT,
        env=os.environ | {CRASH_ENV: str(crash_at)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _status(home: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "edgeid", "update", "status", "--json", "--home", str(home)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report: dict[str, object] = json.loads(done.stdout)
    return report


@pytest.mark.parametrize("healthy", [True, False], ids=["new-version-healthy", "new-version-sick"])
def test_killed_at_every_step_of_an_install(tmp_path: Path, healthy: bool) -> None:
    template = Box(tmp_path / "template")
    old_bundle, old_payload = make_bundle(tmp_path, "1.0.0", extra=2)
    assert UpdateManager.for_home(template.home).install(old_bundle).ok
    new_bundle, new_payload = make_bundle(tmp_path, "2.0.0", healthy=healthy, extra=2)
    old, new = tree(old_payload), tree(new_payload)
    assert old != new

    points: list[str] = []
    for crash_at in range(1, MAX_CRASH_POINTS + 1):
        home = tmp_path / f"box-{crash_at}"
        shutil.copytree(template.home, home, symlinks=True)
        run = _install(home, new_bundle, crash_at)
        if run.returncode != -signal.SIGKILL:
            break  # it ran to the end: every crash point before has been tried
        found = KILLED_AT.search(run.stderr)
        assert found, run.stderr
        points.append(found.group(1))
        where = f"killed at #{crash_at} ({points[-1]})"

        if points[-1] == "journal: trial" and healthy:  # status tells the technician
            assert _status(home)["hint"] == "an update was interrupted; run edgeid update resume"
        resume(home, at_start=True)  # what the unit's ExecStartPre runs at the next start

        assert not StateJournal(home / "updates").load().pending, where
        slots = DirectorySlots(home)
        assert slots.active() is not None and slots.active() == slots.good(), where
        switched = "current: switched" in points
        assert tree(home / "slots" / "current") == (new if healthy and switched else old), where
        assert slots.check(slots.active()) == [], where
        check = subprocess.run([home / "slots" / "current" / "bin" / "healthcheck"], check=False)
        assert check.returncode == 0, where
        events = [
            e for e in EventOutbox(home / "updates").events() if e.fields["to_version"] == "2.0.0"
        ]
        if switched:
            assert [e.name for e in events] == [
                UPDATE_APPLIED if healthy else UPDATE_ROLLED_BACK
            ], where
        else:
            assert events == [], where
        shutil.rmtree(home)
    else:
        pytest.fail(f"install never completed in {MAX_CRASH_POINTS} runs")

    assert run.returncode == (0 if healthy else 1), run.stderr
    assert len(points) >= MIN_CRASH_POINTS, points
    assert points[0] == "journal: writing" and points[-1] == "journal: idle"
