"""Every CLI door to personal data is accountable: `edgeid gallery`, `case` and `audit export`
go through the service layer as `os:<login>`, write their audit record (exactly one, or the
documented number), and refuse a missing or malformed case number or reason before anything is
revealed, recorded or changed. Real LFW photos, a real state directory, the real audit log."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest

from edgeid.cli import main
from edgeid.runtime.audit import AuditAction, AuditEvent, AuditLog
from edgeid.runtime.audit.actor import os_actor
from edgeid.runtime.cases.store import CaseStore
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.inference.pipeline import EMBEDDER_MODEL
from edgeid.runtime.vault.key_choice import provider_for

GALLERY = "wanted"
CASE = "CLI-2025/0042"
REASON = "identify the man in the CCTV still"
NAMES = ("Canary Quillon Vexmarrow", "Canary Odalys Brennquist")  # never printed unless asked
PASSPHRASE = "correct horse battery staple"
REPO = Path(__file__).resolve().parent.parent
ACTOR = os_actor()


@dataclass(frozen=True)
class Box:
    home: Path
    subjects: tuple[str, ...]  # subject ids, in NAMES order
    probe: Path  # another photo of NAMES[0]
    stranger: Path  # someone not enrolled
    media: Path  # a folder: the probe and the stranger


@pytest.fixture(scope="module")
def photos(lfw_dir: Path, models_dir: Path) -> list[list[Path]]:
    """Three LFW people (sorted: the same every run) with two single-face photos each."""
    from edgeid.runtime.inference.image_decode import load_image
    from edgeid.runtime.inference.pipeline import FacePipeline

    pipeline = FacePipeline.load(models_dir, with_embedder=False)
    chosen: list[list[Path]] = []
    for folder in sorted((lfw_dir / "images").iterdir()):
        ones = [p for p in sorted(folder.glob("*.jpg")) if len(pipeline.detect(load_image(p))) == 1]
        if len(ones) >= 2:
            chosen.append(ones[:2])
        if len(chosen) == 3:
            return chosen
    pytest.fail("LFW dev has fewer than three people with two single-face photos")


def cli(capsys: pytest.CaptureFixture[str], home: Path, *argv: str | Path) -> tuple[int, str, str]:
    """One in-process `edgeid` call: exit code, stdout, stderr."""
    capsys.readouterr()
    words = [str(a) for a in argv]
    code = main([*words[:2], "--home", str(home), *words[2:]])
    out, err = capsys.readouterr()
    return code, out, err


def records(home: Path) -> list[AuditEvent]:
    """Every event in the box's audit log, oldest first (read without adding any)."""
    with (
        GalleryStore(home, provider_for(home, load_settings(home).keys)) as store,
        AuditLog.open(home, store.keyring) as log,
    ):
        return [r.event for r in reversed(log.query(limit=10_000))]


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, photos: list[list[Path]]
) -> Box:
    root = tmp_path_factory.mktemp("box")
    home = root / "home"
    home.mkdir()
    (home / "models").symlink_to(models_dir)
    subjects = []
    assert main(["gallery", "create", GALLERY, "--home", str(home)]) == 0
    for name, person in zip(NAMES, photos, strict=False):  # as a real process, once
        argv = ["gallery", "enroll", GALLERY, str(person[0]), "--home", str(home), "--json",
                "--name", name, "--legal-basis", "warrant W-9/2025"]  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "edgeid", *argv], capture_output=True, text=True, cwd=REPO
        )
        assert done.returncode == 0, done.stderr
        subjects.append(json.loads(done.stdout)["subject_id"])
    media = root / "media"
    media.mkdir()
    shutil.copy(photos[0][1], media / "still.jpg")
    shutil.copy(photos[2][0], media / "other.jpg")
    return Box(home, tuple(subjects), photos[0][1], photos[2][0], media)


@pytest.fixture
def box(built: Box, tmp_path: Path) -> Box:
    """A private copy of the built box (the models stay a link)."""
    home = tmp_path / "home"
    shutil.copytree(built.home, home, symlinks=True)
    return Box(home, built.subjects, built.probe, built.stranger, built.media)


def added(home: Path, before: int) -> list[AuditEvent]:
    return records(home)[before:]


def by_os_user(events: list[AuditEvent]) -> None:
    for event in events:
        assert (event.user, event.role) == (ACTOR.user, "operator"), event


# -- search: no justification, no name; with one, a record oversight can export ---------------


@pytest.mark.parametrize(
    "justification",
    [
        [],
        ["--case", CASE],
        ["--reason", REASON],
        ["--case", CASE, "--reason", "look"],  # shorter than the rule's ten characters
        ["--case", "no/such\tcase", "--reason", REASON],  # a control character
        ["--case=.x", "--reason", REASON],  # must start with a letter or digit
    ],
    ids=["none", "no-reason", "no-case", "short-reason", "control-char", "bad-start"],
)
@pytest.mark.parametrize("command", ["search", "verify", "subjects"])
def test_without_a_valid_case_and_reason_nothing_is_revealed_or_recorded(
    box: Box, capsys: pytest.CaptureFixture[str], command: str, justification: list[str]
) -> None:
    argv: list[str | Path] = {
        "search": ["gallery", "search", box.probe, "--gallery", GALLERY],
        "verify": ["gallery", "verify", box.probe, "--gallery", GALLERY,
                   "--subject", box.subjects[0]],
        "subjects": ["gallery", "subjects", GALLERY],
    }[command]  # fmt: skip
    before = len(records(box.home))
    for extra in ([], ["--json"]):
        code, out, err = cli(capsys, box.home, *argv, *justification, *extra)
        assert code == 2 and out == "", (out, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("edgeid: error: ")
        assert "case number" in err or "reason" in err
        assert not any(name in out + err for name in NAMES)
        assert not any(subject in out for subject in box.subjects)
    assert len(records(box.home)) == before


def test_a_search_is_recorded_as_the_os_user_and_audit_export_by_case_shows_it(
    box: Box, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    before = len(records(box.home))
    code, out, err = cli(
        capsys, box.home, "gallery", "search", box.probe, "--gallery", GALLERY,
        "--case", CASE, "--reason", REASON,
    )  # fmt: skip
    assert code == 0, err
    assert NAMES[0] in out  # the name is shown once the search is accounted for
    (search,) = added(box.home, before)
    assert search.action is AuditAction.SEARCH
    assert (search.user, search.role) == (ACTOR.user, "operator")
    assert ACTOR.user.startswith("os:")

    export = tmp_path / "oversight.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "edgeid", "audit", "export", "--home", str(box.home),
         "--case", CASE, "--output", str(export)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    (shown,) = [line for line in lines if line["type"] == "record"]
    assert shown["action"] == "search" and shown["user"] == ACTOR.user
    assert shown["role"] == "operator"
    assert (shown["case"], shown["reason"], shown["gallery"]) == (CASE, REASON, GALLERY)
    assert shown["probe_sha256"] == hashlib.sha256(box.probe.read_bytes()).hexdigest()
    assert shown["candidates"][0]["subject_id"] == box.subjects[0]
    assert not any(name in export.read_text() for name in NAMES)  # ids in the log, never names
    # The export itself is recorded (after the search; not under the case: it names none).
    *_, exported = records(box.home)
    assert exported.action is AuditAction.AUDIT_EXPORTED and exported.user == ACTOR.user
    assert exported.case is None and f"case {CASE}" in (exported.detail or "")


# -- every other door: exactly one record with the right action --------------------------------

Argv = Callable[[Box, Path], list[str | Path]]
JUSTIFIED = ["--case", CASE, "--reason", REASON]


def _backup(box: Box, tmp_path: Path) -> Path:
    backup = tmp_path / "wanted.bak"
    argv = ("gallery", "export", GALLERY, "--out", backup, *JUSTIFIED)
    assert main([*map(str, argv[:2]), "--home", str(box.home), *map(str, argv[2:])]) == 0
    return backup


ONE_RECORD: list[tuple[str, Argv, AuditAction]] = [
    ("create", lambda b, t: ["gallery", "create", "second"], AuditAction.GALLERY_CREATED),
    (
        "subjects",
        lambda b, t: ["gallery", "subjects", GALLERY, *JUSTIFIED],
        AuditAction.SUBJECTS_LISTED,
    ),
    (
        "enroll",
        lambda b, t: ["gallery", "enroll", GALLERY, b.stranger, "--name", "Canary Third",
                      "--legal-basis", "court order 17"],
        AuditAction.ENROLL,
    ),
    (
        "add-photo",
        lambda b, t: ["gallery", "add-photo", GALLERY, b.subjects[0], b.probe, "--age", "40"],
        AuditAction.FACE_ADDED,
    ),
    (
        "edit",
        lambda b, t: ["gallery", "edit", GALLERY, b.subjects[0], "--notes", "seen in 2026",
                      *JUSTIFIED],
        AuditAction.SUBJECT_EDITED,
    ),
    (
        "verify",
        lambda b, t: ["gallery", "verify", b.probe, "--gallery", GALLERY,
                      "--subject", b.subjects[0], *JUSTIFIED],
        AuditAction.VERIFY,
    ),
    (
        "delete-subject",
        lambda b, t: ["gallery", "delete", GALLERY, "--subject", b.subjects[1],
                      "--reason", "erasure ordered by the court"],
        AuditAction.DELETE_SUBJECT,
    ),
    (
        "delete-gallery",
        lambda b, t: ["gallery", "delete", GALLERY, "--yes", "--reason", "the operation is over"],
        AuditAction.CHANGE_PROPOSED,  # a whole gallery is erased by two people (test_approvals)
    ),
    (
        "export",
        lambda b, t: ["gallery", "export", GALLERY, "--out", t / "g.bak", *JUSTIFIED],
        AuditAction.GALLERY_EXPORTED,
    ),
    (
        "import",
        lambda b, t: ["gallery", "import", _backup(b, t), "--name", "restored",
                      "--reason", "restore onto the spare box"],
        AuditAction.GALLERY_IMPORTED,
    ),
    ("re-embed", lambda b, t: ["gallery", "re-embed", GALLERY], AuditAction.GALLERY_RE_EMBEDDED),
    ("rotate-key", lambda b, t: ["gallery", "rotate-key"], AuditAction.KEYS_ROTATED),
    (
        "audit-export",
        lambda b, t: ["audit", "export", "--output", t / "a.jsonl", "--action", "enroll"],
        AuditAction.AUDIT_EXPORTED,
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "action"), [(a, b) for _, a, b in ONE_RECORD], ids=[i for i, _, _ in ONE_RECORD]
)
def test_each_command_writes_exactly_one_record_as_the_os_user(
    box: Box,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: Argv,
    action: AuditAction,
) -> None:
    monkeypatch.setenv("EDGEID_BACKUP_PASSPHRASE", PASSPHRASE)
    words = argv(box, tmp_path)  # may prepare (a backup to import), recorded before the count
    before = len(records(box.home))
    code, _, err = cli(capsys, box.home, *words)
    assert code == 0, err
    new = added(box.home, before)
    assert [e.action for e in new] == [action], new
    by_os_user(new)
    (event,) = new
    if action in (
        AuditAction.SUBJECTS_LISTED,
        AuditAction.VERIFY,
        AuditAction.GALLERY_EXPORTED,
        AuditAction.SUBJECT_EDITED,
    ):
        assert (event.case, event.reason) == (CASE, REASON)
    if action is AuditAction.SUBJECT_EDITED:
        assert event.detail == "changed: notes"  # which fields, never their values
    if action is AuditAction.FACE_ADDED:
        assert "age at capture 40" in (event.detail or "")
    if action is AuditAction.ENROLL:
        assert "court order 17" in (event.detail or "")  # the legal basis
    if action in (
        AuditAction.DELETE_SUBJECT,
        AuditAction.GALLERY_DELETED,
        AuditAction.CHANGE_PROPOSED,
        AuditAction.GALLERY_IMPORTED,
    ):
        # Regression: the services put these reasons only in the detail, the log refused the
        # record for want of its reason field, and every erasure and import failed.
        assert event.reason and event.reason == words[-1]


@pytest.mark.parametrize(
    "argv",
    [["gallery", "list"], ["case", "list"], ["audit", "verify"]],
    ids=["gallery-list", "case-list", "audit-verify"],
)
def test_what_reveals_only_names_and_counts_is_not_recorded(
    box: Box, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    before = len(records(box.home))
    code, out, err = cli(capsys, box.home, *argv)
    assert code == 0, err
    assert not any(name in out for name in NAMES)
    assert len(records(box.home)) == before


def test_enrolment_records_the_os_user_as_enroller_and_refuses_by(
    box: Box, capsys: pytest.CaptureFixture[str]
) -> None:
    before = len(records(box.home))
    enroll = ["gallery", "enroll", GALLERY, box.stranger, "--name", "Canary Third",
              "--legal-basis", "court order 17"]  # fmt: skip
    code, _, err = cli(capsys, box.home, *enroll, "--by", "somebody-else")
    assert code == 2 and "--by was removed" in err
    assert len(records(box.home)) == before
    code, out, err = cli(capsys, box.home, *enroll, "--json")
    assert code == 0, err
    subject = json.loads(out)["subject_id"]
    code, out, err = cli(capsys, box.home, "gallery", "subjects", GALLERY, *JUSTIFIED, "--json")
    assert code == 0, err
    (row,) = [r for r in json.loads(out) if r["subject_id"] == subject]
    assert row["enrolled_by"] == ACTOR.user


# -- a refused justification changes nothing ----------------------------------------------------


def _counts(home: Path, capsys: pytest.CaptureFixture[str]) -> tuple[object, object]:
    code, galleries, err = cli(capsys, home, "gallery", "list", "--json")
    assert code == 0, err
    code, cases, err = cli(capsys, home, "case", "list", "--json")
    assert code == 0, err
    return json.loads(galleries), [c["case"] for c in json.loads(cases)]


REFUSED: list[tuple[str, Argv]] = [
    ("delete-subject-short", lambda b, t: ["gallery", "delete", GALLERY,
                                           "--subject", b.subjects[0], "--reason", "gone"]),
    ("delete-subject-none", lambda b, t: ["gallery", "delete", GALLERY,
                                          "--subject", b.subjects[0]]),
    ("delete-gallery-none", lambda b, t: ["gallery", "delete", GALLERY, "--yes"]),
    ("export-no-case", lambda b, t: ["gallery", "export", GALLERY, "--out", t / "g.bak",
                                     "--reason", REASON]),
    ("import-no-reason", lambda b, t: ["gallery", "import", _backup(b, t), "--name", "again"]),
    ("ingest-bad-case", lambda b, t: ["case", "ingest", b.media, "--case", "?", "--reason", REASON,
                                      "--no-progress"]),
    ("ingest-short-reason", lambda b, t: ["case", "ingest", b.media, "--case", CASE,
                                          "--reason", "phone", "--no-progress"]),
    ("show-no-reason", lambda b, t: ["case", "show", "K-1"]),
    ("report-short", lambda b, t: ["case", "report", "K-1", "--out", t / "r.html",
                                   "--reason", "court"]),
    ("purge-no-reason", lambda b, t: ["case", "purge", "K-1", "--yes"]),
    ("purge-expired-short", lambda b, t: ["case", "purge", "--expired", "--yes",
                                          "--reason", "old"]),
]  # fmt: skip


@pytest.fixture
def with_case(box: Box, capsys: pytest.CaptureFixture[str]) -> Box:
    code, _, err = cli(capsys, box.home, "case", "ingest", box.media, "--case", "K-1",
                       "--reason", REASON, "--no-progress")  # fmt: skip
    assert code == 0, err
    return box


@pytest.mark.parametrize("argv", [a for _, a in REFUSED], ids=[i for i, _ in REFUSED])
def test_a_refused_justification_changes_nothing(
    with_case: Box,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    argv: Argv,
) -> None:
    box = with_case
    monkeypatch.setenv("EDGEID_BACKUP_PASSPHRASE", PASSPHRASE)
    words = argv(box, tmp_path)
    state = _counts(box.home, capsys)
    before = len(records(box.home))
    code, out, err = cli(capsys, box.home, *words)
    assert code == 2 and out == "", (out, err)
    assert len(err.strip().splitlines()) == 1 and ("reason" in err or "case number" in err), err
    assert len(records(box.home)) == before
    assert _counts(box.home, capsys) == state
    assert not (tmp_path / "g.bak").exists() and not (tmp_path / "r.html").exists()


# -- cases ---------------------------------------------------------------------------------------


def test_case_ingest_is_recorded_before_its_searches_and_as_the_os_user(
    box: Box, capsys: pytest.CaptureFixture[str]
) -> None:
    before = len(records(box.home))
    code, out, err = cli(capsys, box.home, "case", "ingest", box.media, "--case", CASE,
                         "--reason", REASON, "--galleries", GALLERY,
                         "--no-progress", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["clusters"] == 2
    new = added(box.home, before)
    # One record for the ingest, then one per cluster searched (two people: two clusters).
    assert [e.action for e in new] == [AuditAction.CASE_INGESTED] + [AuditAction.SEARCH] * 2
    by_os_user(new)
    assert all((e.case, e.reason, e.gallery) == (CASE, REASON, GALLERY) for e in new)
    assert str(box.media) in (new[0].detail or "")


def test_case_show_report_and_purge_each_write_one_record(
    with_case: Box, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    box = with_case
    why = "prepare the file for the prosecutor"
    steps: list[tuple[list[str | Path], AuditAction]] = [
        (["case", "show", "K-1", "--reason", why], AuditAction.CASE_VIEWED),
        (["case", "report", "K-1", "--out", tmp_path / "r.html", "--reason", why],
         AuditAction.CASE_REPORT),
        # No retention date: an early purge, proposed for a second person (test_approvals.py).
        (["case", "purge", "K-1", "--yes", "--reason", "case closed by the court"],
         AuditAction.CHANGE_PROPOSED),
    ]  # fmt: skip
    for argv, action in steps:
        before = len(records(box.home))
        code, out, err = cli(capsys, box.home, *argv)
        assert code == 0, err
        new = added(box.home, before)
        assert [e.action for e in new] == [action], argv
        by_os_user(new)
        if action is not AuditAction.CHANGE_PROPOSED:
            assert (new[0].case, new[0].reason) == ("K-1", why)
        else:
            assert (new[0].case, new[0].reason) == ("K-1", "case closed by the court")
    assert (tmp_path / "r.html").exists()
    code, out, _ = cli(capsys, box.home, "case", "list", "--json")
    assert code == 0 and [c["case"] for c in json.loads(out)] == ["K-1"]  # waits for approval


def test_purging_expired_cases_records_each_with_the_reason(
    with_case: Box, capsys: pytest.CaptureFixture[str]
) -> None:
    box = with_case
    with (
        GalleryStore(box.home, provider_for(box.home, load_settings(box.home).keys)) as store,
        CaseStore(box.home, store.keyring) as cases,
    ):
        for number in ("OLD-1", "OLD-2"):
            cases.create(number, created_by="a", model_id=EMBEDDER_MODEL,
                         retention_until=date(2001, 1, 1))  # fmt: skip
    before = len(records(box.home))
    code, out, err = cli(capsys, box.home, "case", "purge", "--expired", "--yes",
                         "--reason", "retention period is over", "--json")  # fmt: skip
    assert code == 0, err
    assert sorted(json.loads(out)["purged"]) == ["OLD-1", "OLD-2"]
    new = added(box.home, before)
    assert [e.action for e in new] == [AuditAction.CASE_PURGED] * 2
    by_os_user(new)
    assert all("past its retention date" in (e.detail or "") for e in new)
    assert all(e.reason == "retention period is over" for e in new)


# -- users ---------------------------------------------------------------------------------------


def test_users_changes_are_recorded_as_the_os_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "box"
    assert main(["init", "--home", str(home)]) == 0
    before = len(records(home))
    code, _, err = cli(capsys, home, "users", "add", "ivy", "--role", "investigator")
    assert code == 0, err
    (event,) = added(home, before)
    assert event.action is AuditAction.USER_CREATED
    assert (event.user, event.role) == (ACTOR.user, "operator")
    assert "OS user" not in (event.detail or "")  # the actor names them now
    before = len(records(home))
    code, _, err = cli(capsys, home, "users", "reset-password", "ivy")
    assert code == 0, err
    (reset,) = added(home, before)
    assert reset.action is AuditAction.PASSWORD_CHANGED
    assert (reset.user, reset.role) == (ACTOR.user, "operator")
