"""Installing signed updates into A/B slots: refusals, health check, rollback, recovery."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from pathlib import Path

import pytest
from update_box import VECTORS_DIR, Box, make_bundle, snapshot, tree

from edgeid.cli import main
from edgeid.runtime.config.settings import ConfigError, load_settings
from edgeid.runtime.errors import DiskFullError
from edgeid.updater import health
from edgeid.updater.errors import UpdateError
from edgeid.updater.events import UPDATE_APPLIED, UPDATE_ROLLED_BACK, EventOutbox, deliver_events
from edgeid.updater.health import UpdatePolicy
from edgeid.updater.jsonlog import JsonLog
from edgeid.updater.manager import UpdateManager, resume
from edgeid.updater.slots import DirectorySlots
from edgeid.updater.state import Outcome, Phase, StateJournal, UpdateState


class _Killed(BaseException):
    """Stands for the process dying at a crash point (in-process tests)."""


class _DieAt:
    """Crash points that end the operation at a named step, leaving its journal as is."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.passed: list[str] = []

    def __call__(self, name: str) -> None:
        self.passed.append(name)
        if name == self.name:
            raise _Killed(name)


def _cli(box: Box, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main([*args, "--home", str(box.home)])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path / "box")


@pytest.fixture
def two_versions(box: Box, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Box:
    """A box that installed 0.1.0 then 0.2.0: active b (0.2.0), inactive a (0.1.0)."""
    for version in ("0.1.0", "0.2.0"):
        bundle, _ = make_bundle(tmp_path, version)
        status, _, err = _cli(box, capsys, "update", "install", str(bundle))
        assert status == 0, err
    return box


def test_install_switches_and_commits(
    box: Box, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    v1, v1_payload = make_bundle(tmp_path, "1.0.0")
    v2, v2_payload = make_bundle(tmp_path, "2.0.0", extra=2)
    status, out, err = _cli(box, capsys, "update", "install", str(v1))
    assert (status, err) == (0, ""), err
    assert "1.0.0 committed on slot a" in out
    status, out, _ = _cli(box, capsys, "update", "install", str(v2), "--json")
    assert status == 0
    result = json.loads(out)
    assert (result["outcome"], result["from_slot"], result["to_slot"]) == ("committed", "a", "b")
    assert box.active_tree() == tree(v2_payload)
    assert tree(box.slots / "a") == tree(v1_payload)  # the previous version stays, for rollback
    status, out, _ = _cli(box, capsys, "update", "status", "--json")
    report = json.loads(out)
    assert report["active"]["version"] == "2.0.0" and report["good"] == "b"
    assert report["inactive"]["version"] == "1.0.0" and report["pending"] is False
    events = EventOutbox(box.home / "updates").events()
    assert [(e.name, e.fields["version"]) for e in events] == [
        (UPDATE_APPLIED, "1.0.0"),
        (UPDATE_APPLIED, "2.0.0"),
    ]


@pytest.mark.parametrize(
    ("bundle_name", "error"),
    [
        ("tampered-payload", "does not match its manifest hash"),
        ("wrong-key", "does not verify against any trusted update key"),
        ("unsigned", "is not signed"),
        ("wrong-hardware", "this box is generic-test"),
        ("downgrade", "is not newer than the installed 0.2.0; pass --allow-downgrade"),
    ],
)
def test_refused_bundle_leaves_every_slot_byte_for_byte(
    two_versions: Box,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    bundle_name: str,
    error: str,
) -> None:
    box = two_versions
    if bundle_name == "wrong-hardware":
        bundle, _ = make_bundle(tmp_path, "1.0.0", hardware="jetson-orin-nx")
    elif bundle_name == "downgrade":
        bundle, _ = make_bundle(tmp_path, "0.0.9")
    else:
        bundle = VECTORS_DIR / f"{bundle_name}.bundle"  # version 1.0.0: an upgrade otherwise
    slots_before = snapshot(box.slots)
    journal_before = (box.home / "updates" / "journal.jsonl").read_bytes()
    status, _, err = _cli(box, capsys, "update", "install", str(bundle))
    assert status == 2
    assert err.startswith("edgeid: error: ") and err.count("\n") == 1 and error in err
    assert snapshot(box.slots) == slots_before
    assert (box.home / "updates" / "journal.jsonl").read_bytes() == journal_before


def test_valid_vector_and_permitted_downgrade_do_install(
    two_versions: Box, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The controls for the refusals above: the same box takes a good bundle, and a downgrade
    when it is permitted."""
    box = two_versions
    status, _, err = _cli(box, capsys, "update", "install", str(VECTORS_DIR / "valid.bundle"))
    assert status == 0, err
    old, old_payload = make_bundle(tmp_path, "0.0.9")
    assert _cli(box, capsys, "update", "install", str(old))[0] == 2
    status, _, err = _cli(box, capsys, "update", "install", str(old), "--allow-downgrade")
    assert status == 0, err
    assert box.active_tree() == tree(old_payload)


def test_failed_health_check_rolls_back_and_reports_it(
    two_versions: Box, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    box = two_versions
    running = box.active_tree()
    bad, _ = make_bundle(tmp_path, "0.3.0", healthy=False)
    status, _, err = _cli(box, capsys, "update", "install", str(bad))
    assert status == 1
    assert err.count("\n") == 1 and "rolled back to 0.2.0 on slot b" in err
    assert "embedder output differs from the reference" in err  # the check's own words
    assert box.active_tree() == running
    assert os.readlink(box.slots / "good") == "b"
    # The failed version is no rollback target: its slot counts as empty.
    assert UpdateManager.for_home(box.home).status()["inactive"]["version"] is None
    status, _, err = _cli(box, capsys, "update", "rollback")
    assert status == 1 and "slot a holds no complete version to roll back to" in err
    received: list[tuple[str, dict[str, str]]] = []
    cursor = box.home / "telemetry-cursor"
    delivered = deliver_events(box.home / "updates", lambda n, f: received.append((n, f)), cursor)
    assert delivered == 3  # 0.1.0 applied, 0.2.0 applied, 0.3.0 rolled back
    name, fields = received[-1]
    assert name == UPDATE_ROLLED_BACK
    assert (fields["to_version"], fields["version"]) == ("0.3.0", "0.2.0")
    assert "health check failed" in fields["reason"]
    assert deliver_events(box.home / "updates", lambda n, f: received.append((n, f)), cursor) == 0


def test_event_sink_failure_is_retried_not_lost(box: Box, tmp_path: Path) -> None:
    bundle, _ = make_bundle(tmp_path, "1.0.0")
    calls: list[str] = []

    def flaky(name: str, fields: dict[str, str]) -> None:
        calls.append(name)
        if len(calls) == 1:
            raise ConnectionError("broker away")

    manager = UpdateManager.for_home(box.home, on_event=flaky)
    assert manager.install(bundle).ok  # a failing in-process sink does not undo the update
    cursor = tmp_path / "cursor"
    assert deliver_events(box.home / "updates", flaky, cursor) == 1
    assert deliver_events(box.home / "updates", flaky, cursor) == 0


def test_restart_runs_on_the_new_slot_and_again_after_a_rollback(tmp_path: Path) -> None:
    log = tmp_path / "restarts.log"
    box = Box(tmp_path / "box", restart_command=["sh", "-c", f"echo {{slot}} >> {log}"])
    manager = UpdateManager.for_home(box.home)
    manager.install(make_bundle(tmp_path, "1.0.0")[0])
    manager.install(make_bundle(tmp_path, "2.0.0", healthy=False)[0])
    slots = box.slots
    assert log.read_text().split() == [str(slots / "a"), str(slots / "b"), str(slots / "a")]


def test_service_that_does_not_restart_is_rolled_back(tmp_path: Path) -> None:
    box = Box(tmp_path / "box", restart_command=["sh", "-c", "case {slot} in */b) exit 3;; esac"])
    manager = UpdateManager.for_home(box.home)
    assert manager.install(make_bundle(tmp_path, "1.0.0")[0]).ok
    result = manager.install(make_bundle(tmp_path, "2.0.0")[0])
    assert result.outcome is Outcome.ROLLED_BACK
    assert "the service did not restart: sh exited 3" in (result.state.reason or "")
    assert DirectorySlots(box.home).active() == "a"


def test_first_install_that_fails_leaves_no_slot_active(box: Box, tmp_path: Path) -> None:
    manager = UpdateManager.for_home(box.home)
    result = manager.install(make_bundle(tmp_path, "1.0.0", healthy=False)[0])
    assert result.outcome is Outcome.ROLLED_BACK
    assert manager.status()["active"] is None
    assert not (box.slots / "current").exists()


def _on_trial(box: Box, tmp_path: Path, version: str, healthy: bool) -> UpdateManager:
    """Install ``version`` and stop it dead once it is switched and restarted."""
    stopper = _DieAt("journal: trial")
    manager = UpdateManager(box.home, _policy(box), crash=stopper)
    with pytest.raises(_Killed):
        manager.install(make_bundle(tmp_path, version, healthy=healthy)[0])
    assert UpdateManager.for_home(box.home).journal.load().phase is Phase.TRIAL
    return UpdateManager.for_home(box.home)


def _policy(box: Box) -> UpdatePolicy:
    return UpdatePolicy.from_settings(load_settings(box.home).updates)


def test_operator_commit_skips_the_health_check(two_versions: Box, tmp_path: Path) -> None:
    manager = _on_trial(two_versions, tmp_path, "0.3.0", healthy=False)
    result = manager.commit()
    assert result is not None and result.ok and result.state.reason == "committed by the operator"
    assert manager.installed_version() == "0.3.0" and manager.slots.good() == "a"
    assert manager.commit() is None  # nothing on trial any more


def test_operator_rollback_from_trial(two_versions: Box, tmp_path: Path) -> None:
    before = two_versions.active_tree()
    manager = _on_trial(two_versions, tmp_path, "0.3.0", healthy=True)
    result = manager.rollback()
    assert result.outcome is Outcome.ROLLED_BACK
    assert two_versions.active_tree() == before


def test_operator_rollback_to_the_previous_version(
    two_versions: Box, capsys: pytest.CaptureFixture[str]
) -> None:
    box = two_versions
    previous = tree(box.slots / "a")
    status, _, err = _cli(box, capsys, "update", "rollback")
    assert status == 0, err
    assert box.active_tree() == previous and os.readlink(box.slots / "good") == "a"
    assert EventOutbox(box.home / "updates").events()[-1].name == UPDATE_ROLLED_BACK
    # Back again to 0.2.0; then damage it while inactive: rollback refuses to run it.
    assert _cli(box, capsys, "update", "rollback")[0] == 0
    (box.slots / "a" / "VERSION").write_text("0.1.0-patched-by-hand\n")
    status, _, err = _cli(box, capsys, "update", "rollback")
    assert status == 1 and "slot a no longer matches its manifest (VERSION does not match" in err


def test_rollback_needs_a_complete_other_slot(box: Box, tmp_path: Path) -> None:
    manager = UpdateManager.for_home(box.home)
    manager.install(make_bundle(tmp_path, "1.0.0")[0])
    with pytest.raises(UpdateError, match="slot b holds no complete version"):
        manager.rollback()


def test_trial_interrupted_too_often_is_rolled_back(two_versions: Box, tmp_path: Path) -> None:
    """A health check that keeps taking the box down with it (attempts counted in the
    journal) ends in a rollback, not in a boot loop."""
    manager = _on_trial(two_versions, tmp_path, "0.3.0", healthy=True)
    state = manager.journal.load()
    manager.journal.append(dataclasses.replace(state, attempts=3))
    result = manager.resume()
    assert result is not None and result.outcome is Outcome.ROLLED_BACK
    assert "interrupted 3 times" in (result.state.reason or "")
    assert manager.installed_version() == "0.2.0"


def test_one_operation_at_a_time(two_versions: Box, tmp_path: Path) -> None:
    manager = _on_trial(two_versions, tmp_path, "0.3.0", healthy=True)
    fd = os.open(two_versions.home / "updates" / "lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another live update process holds it
    try:
        with pytest.raises(UpdateError, match="another edgeid update operation is running"):
            manager.resume()
        assert manager.resume(at_start=True) is None  # start-up leaves a live update alone
        assert manager.journal.load().phase is Phase.TRIAL
    finally:
        os.close(fd)
    result = manager.resume()
    assert result is not None and result.ok


def test_interrupted_update_blocks_a_new_install_until_resumed(
    two_versions: Box, tmp_path: Path
) -> None:
    manager = _on_trial(two_versions, tmp_path, "0.3.0", healthy=True)
    with pytest.raises(UpdateError, match="run edgeid update resume first"):
        manager.install(make_bundle(tmp_path, "0.4.0")[0])
    assert manager.status()["hint"].endswith("run edgeid update resume")


def test_resume_with_nothing_pending_writes_nothing(tmp_path: Path) -> None:
    """At start-up the service may run it inside its sandbox: an idle box is only read."""
    home = tmp_path / "box"
    home.mkdir()
    assert resume(home) is None
    assert list(home.iterdir()) == []  # not even the updates folder or its lock file


def test_failed_write_abandons_the_update(two_versions: Box, tmp_path: Path) -> None:
    class FullDisk(DirectorySlots):
        def write(self, slot: str, bundle: object) -> None:  # type: ignore[override]
            raise DiskFullError("writing slot a failed: disk full; free space and retry")

    box = two_versions
    before = box.active_tree()
    manager = UpdateManager(box.home, _policy(box), slots=FullDisk(box.home))
    with pytest.raises(DiskFullError):
        manager.install(make_bundle(tmp_path, "0.3.0")[0])
    state = manager.journal.load()
    assert (state.phase, state.outcome) == (Phase.IDLE, Outcome.ABORTED)
    assert box.active_tree() == before and not (box.slots / "a.json").exists()


def test_default_health_check_is_the_new_versions_selftest(tmp_path: Path) -> None:
    policy = UpdatePolicy(hardware_id="generic-test")
    slot = tmp_path / "slot"
    assert policy.health_argv(slot, tmp_path) is None  # no edgeid in the slot: no check
    (slot / "bin").mkdir(parents=True)
    (slot / "bin" / "edgeid").write_text("#!/bin/sh\n")
    assert policy.health_argv(slot, tmp_path) == [
        str(slot / "bin" / "edgeid"), "provision", "selftest", "--home", str(tmp_path)
    ]  # fmt: skip


def test_update_without_a_health_check_is_not_committed(tmp_path: Path) -> None:
    home = tmp_path / "box"
    Box(home)
    (home / "edgeid.toml").write_text('[updates]\nhardware_id = "generic-test"\n')
    result = UpdateManager.for_home(home).install(make_bundle(tmp_path, "1.0.0")[0])
    assert result.outcome is Outcome.ROLLED_BACK
    assert "no health check" in (result.state.reason or "")


def test_bad_updates_settings_name_the_key(tmp_path: Path) -> None:
    (tmp_path / "edgeid.toml").write_text('[updates]\nhardware_id = "Jetson Orin"\n')
    with pytest.raises(ConfigError, match=r"updates\.hardware_id"):
        load_settings(tmp_path)


def test_journal_survives_a_torn_last_line(tmp_path: Path) -> None:
    journal = StateJournal(tmp_path)
    journal.append(UpdateState(phase=Phase.TRIAL, to_slot="b"))
    path = tmp_path / "journal.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"sha256":"0000","record":{"phase":"comm')  # power cut mid-write
    assert journal.load().phase is Phase.TRIAL
    journal.append(UpdateState(phase=Phase.IDLE, outcome=Outcome.COMMITTED))
    assert journal.load().outcome is Outcome.COMMITTED
    assert [s.phase for s in journal.history()] == [Phase.TRIAL, Phase.IDLE]
    assert path.read_bytes().startswith(whole) and path.read_bytes().count(b"\n") == 2


def test_journal_skips_a_damaged_line(tmp_path: Path) -> None:
    log = JsonLog(tmp_path / "log.jsonl")
    for index in range(3):
        log.append({"n": index})
    lines = (tmp_path / "log.jsonl").read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"n":1', b'"n":7')  # bit rot: the checksum no longer fits
    (tmp_path / "log.jsonl").write_bytes(b"\n".join(lines))
    assert log.records() == [{"n": 0}, {"n": 2}]


def test_resume_and_commit_through_the_cli(
    two_versions: Box, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    box = two_versions
    assert _cli(box, capsys, "update", "resume")[1] == "nothing to resume\n"
    assert _cli(box, capsys, "update", "commit")[1] == "nothing to commit: no update is on trial\n"
    _on_trial(box, tmp_path, "0.3.0", healthy=True)
    status, out, _ = _cli(box, capsys, "update", "status")
    assert "phase:    trial" in out and out.endswith("run edgeid update resume\n")
    status, out, err = _cli(box, capsys, "update", "resume")
    assert (status, err) == (0, "") and out == "0.3.0 committed on slot a (health check passed)\n"


def test_resume_reports_an_abandoned_install(
    two_versions: Box, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manager = UpdateManager(two_versions.home, _policy(two_versions), crash=_DieAt("slot: cleared"))
    with pytest.raises(_Killed):
        manager.install(make_bundle(tmp_path, "0.3.0")[0])
    status, out, _ = _cli(two_versions, capsys, "update", "resume", "--json")
    result = json.loads(out)
    assert status == 0 and result["outcome"] == "aborted"
    assert result["reason"] == "interrupted while writing slot a"
    assert UpdateManager.for_home(two_versions.home).installed_version() == "0.2.0"


def test_default_restart_and_hardware(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    policy = UpdatePolicy(hardware_id="generic-test")
    monkeypatch.setattr(health, "SYSTEMD_RUNNING", tmp_path / "absent")
    assert policy.restart_argv(tmp_path, tmp_path) == []  # no systemd: nothing to restart
    monkeypatch.setattr(health, "SYSTEMD_RUNNING", tmp_path)
    assert policy.restart_argv(tmp_path, tmp_path) == ["systemctl", "restart", "edgeid.service"]
    monkeypatch.setattr(health.platform, "machine", lambda: "aarch64")
    assert health.detect_hardware_id() == "generic-arm64"
    assert (
        UpdatePolicy.from_settings(load_settings(tmp_path).updates).hardware_id == "generic-arm64"
    )


def test_rolled_back_install_is_one_line_on_stderr(box: Box, tmp_path: Path) -> None:
    """The CLI contract, in a real process (where logging is not captured by pytest)."""
    assert box.cli("update", "install", str(make_bundle(tmp_path, "1.0.0")[0])).returncode == 0
    run = box.cli("update", "install", str(make_bundle(tmp_path, "1.1.0", healthy=False)[0]))
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("edgeid: error: update not")
    assert "rolled back to 1.0.0 on slot a: health check failed: healthcheck exited 1" in run.stderr
