"""The audit log's API on real files and real crypto: append, reopen, query, refusals,
durability and coexistence with the gallery store's keyring.

The only fakes are FileWriters that report a full disk or spy on the order of writes.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from edgeid.runtime.audit import (
    AuditAction,
    AuditBusyError,
    AuditEvent,
    AuditInputError,
    AuditLog,
    AuditTamperedError,
    Candidate,
    VerifyReport,
    VerifyStatus,
    audit_dir,
    verify_chain,
)
from edgeid.runtime.audit.frames import FRAME_MAGIC, ScanState, scan_frames
from edgeid.runtime.audit.layout import AUDIT_KEY_SCOPE, CREATING_MARKER, HEAD_FILE, LOG_FILE
from edgeid.runtime.compat import UTC
from edgeid.runtime.errors import BadInputError, DiskFullError
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.identity.device_key import ensure_device_key
from edgeid.runtime.vault.key_choice import keys_dir
from edgeid.runtime.vault.keys import KeyFileProvider

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
PROBE = hashlib.sha256(b"probe image bytes").hexdigest()


class Clock:
    """Each reading one minute after the last: records get distinct, known times."""

    def __init__(self, start: datetime = T0, step: timedelta = timedelta(minutes=1)) -> None:
        self.now, self.step = start - step, step

    def __call__(self) -> datetime:
        self.now += self.step
        return self.now


def search(user: str = "officer-7", case: str = "2024/117", **extra: object) -> AuditEvent:
    fields: dict[str, object] = {
        "user": user,
        "role": "investigator",
        "action": AuditAction.SEARCH,
        "case": case,
        "reason": "identify the child in seized image set 4",
        "gallery": "missing-persons",
        "probe_sha256": PROBE,
        "candidates": [Candidate("a" * 32, "b" * 32, 0.71, "strong", 1)],
    }
    fields.update(extra)
    return AuditEvent(**fields)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[GalleryStore]:
    ensure_device_key(tmp_path)
    with GalleryStore(tmp_path, KeyFileProvider(keys_dir(tmp_path))) as opened:
        yield opened


def open_log(store: GalleryStore, **kwargs: object) -> AuditLog:
    return AuditLog.open(store.root.parent, store.keyring, **kwargs)  # type: ignore[arg-type]


def created(store: GalleryStore) -> GalleryStore:
    """Create the log first, so that a test's clock is read by its appends only."""
    open_log(store).close()
    return store


def log_bytes(home: Path) -> bytes:
    return (audit_dir(home) / LOG_FILE).read_bytes()


def verify(home: Path) -> VerifyReport:
    from edgeid.runtime.identity.device_key import load_device_key

    return verify_chain(audit_dir(home), load_device_key(home).public_key())


# -- append, reopen, query -------------------------------------------------------------------


def test_append_reopen_and_query_round_trip(store: GalleryStore) -> None:
    home = store.root.parent
    with open_log(created(store), clock=Clock()) as log:
        first = log.append(search())
        second = log.append(search(user="officer-9", case="VID-17-0042", decision=None))
        login = log.append(AuditEvent("sup-1", "supervisor", AuditAction.LOGIN, detail="from x"))
    assert (first.seq, second.seq, login.seq) == (1, 2, 3)
    assert first.time == T0 and login.time == T0 + timedelta(minutes=2)

    with open_log(store, clock=Clock(T0 + timedelta(days=1))) as log:
        assert log.last_seq == 3
        fourth = log.append(search(case="2024/118"))
        assert fourth.seq == 4  # numbering continues across a reopen
        newest_first = log.query()
    assert [r.seq for r in newest_first] == [4, 3, 2, 1]
    again = newest_first[3]
    assert again.event == first.event and again.time == first.time
    assert again.chain_hash == first.chain_hash
    assert again.event.candidates == (Candidate("a" * 32, "b" * 32, 0.71, "strong", 1),)
    assert verify(home).status is VerifyStatus.OK


def test_query_filters_by_user_case_action_and_date(store: GalleryStore) -> None:
    clock = Clock(step=timedelta(hours=12))
    with open_log(created(store), clock=clock) as log:
        for i in range(6):  # 09:00, 21:00 on May 1, 2, 3
            log.append(search(user=f"officer-{i % 2}", case=f"C-{i % 3}"))
        log.append(AuditEvent("officer-0", "investigator", AuditAction.LOGOUT))  # May 4 09:00
        assert [r.seq for r in log.query(user="officer-0")] == [7, 5, 3, 1]
        assert [r.seq for r in log.query(case="C-1")] == [5, 2]
        assert [r.seq for r in log.query(case=" C-1 ")] == [5, 2]  # trimmed like the records
        assert [r.seq for r in log.query(action=AuditAction.LOGOUT)] == [7]
        may2 = datetime(2024, 5, 2, tzinfo=UTC)
        in_may2 = log.query(since=may2, until=may2 + timedelta(days=1))
        assert [r.seq for r in in_may2] == [4, 3]
        naive = log.query(since=datetime(2024, 5, 2), until=datetime(2024, 5, 3))
        assert [r.seq for r in naive] == [4, 3]  # naive times are UTC
        assert [r.seq for r in log.query(user="officer-0", case="C-0")] == [1]
        page1 = log.query(limit=3)
        page2 = log.query(limit=3, before_seq=page1[-1].seq)
        assert [r.seq for r in page1 + page2] == [7, 6, 5, 4, 3, 2]
        with pytest.raises(AuditInputError):
            log.query(limit=0)


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"case": None}, "case number is missing"),
        ({"case": "   "}, "case number is blank"),
        ({"reason": None}, "reason is missing"),
        ({"reason": ""}, "reason is blank"),
        ({"probe_sha256": None}, "probe image's sha256"),
        ({"probe_sha256": "not-a-hash"}, "64 lower-case hex"),
        ({"case": "2024/117\x1b[2J"}, "control characters"),
        ({"user": ""}, "user is blank"),
        ({"role": "Investigator!"}, "role"),
        ({"action": "teleport"}, "unknown audit action"),
        ({"candidates": [Candidate("x" * 32, "y", float("nan"), "weak", 1)]}, "finite"),
        ({"candidates": [Candidate("x" * 32, "y", 0.5, "weak", 0)]}, "rank"),
        ({"candidates": [Candidate("Jane Doe", "y", 0.5, "weak", 1)]}, "subject_id"),
    ],
)
def test_bad_events_are_refused_and_nothing_is_written(
    store: GalleryStore, change: dict[str, object], words: str
) -> None:
    home = store.root.parent
    with open_log(store) as log:
        log.append(search())
        before = log_bytes(home), (audit_dir(home) / HEAD_FILE).read_bytes()
        with pytest.raises(AuditInputError, match=words) as caught:
            log.append(search(**change))
        assert isinstance(caught.value, BadInputError)  # the CLI and web map it to "bad input"
        assert (log_bytes(home), (audit_dir(home) / HEAD_FILE).read_bytes()) == before
        assert log.last_seq == 1
        assert "2024/117" not in str(caught.value)  # errors never echo what was given


def test_decision_needs_a_case_but_a_login_needs_none(store: GalleryStore) -> None:
    with open_log(store) as log:
        with pytest.raises(AuditInputError, match="case number"):
            log.append(AuditEvent("officer-7", "investigator", AuditAction.DECISION))
        log.append(AuditEvent("officer-7", "investigator", AuditAction.LOGIN))
        log.append(
            AuditEvent("officer-7", "investigator", AuditAction.DECISION, case="2024/117",
                       decision="lead confirmed", subject_id="a" * 32)
        )  # fmt: skip
        assert log.last_seq == 2


def test_no_plaintext_of_cases_reasons_or_users_on_disk(store: GalleryStore) -> None:
    home = store.root.parent
    secrets = ["CASE-ZX-90417", "reason-words-qwertyuiop", "officer-uniqname", "gallery-lmnop"]
    with open_log(store) as log:
        for _ in range(3):
            log.append(
                search(user=secrets[2], case=secrets[0], reason=secrets[1], gallery=secrets[3])
            )
        # The test is not vacuous: the log does hold these, as ciphertext.
        assert {r.event.case for r in log.query()} == {secrets[0]}
    files = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.name == LOG_FILE for p in files)
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            for form in (
                secret.encode(),
                secret.encode().hex().encode(),
                secret.encode("utf-16-le"),
            ):
                assert form not in data, f"{secret!r} in clear in {path.name}"


# -- one writer, durability ------------------------------------------------------------------


def test_one_writer_at_a_time_and_verify_needs_no_lock(store: GalleryStore) -> None:
    home = store.root.parent
    with open_log(store) as log:
        log.append(search())
        with pytest.raises(AuditBusyError, match="already open"):
            open_log(store)
        assert verify(home).status is VerifyStatus.OK
    with open_log(store) as log:  # the lock went with the first writer
        assert log.last_seq == 1


class SpyWriter:
    """Records the order of writes and fsyncs; optionally fails with ENOSPC."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail_when: bytes | None = None  # fail writes whose data starts with this

    def write(self, fd: int, data: bytes) -> int:
        if self.fail_when is not None and data.startswith(self.fail_when):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.calls.append("frame" if data.startswith(FRAME_MAGIC) else "head")
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        self.calls.append("fsync")
        os.fsync(fd)


def test_append_returns_after_the_frame_and_the_signed_head_are_fsynced(
    store: GalleryStore,
) -> None:
    spy = SpyWriter()
    with open_log(store, writer=spy, checkpoint_every=1000) as log:
        spy.calls.clear()
        log.append(search())
        assert spy.calls == ["frame", "fsync", "head", "fsync"]


@pytest.mark.parametrize("failing", [FRAME_MAGIC, b"{"], ids=["frame", "head"])
def test_disk_full_loses_nothing_and_the_log_stays_verifiable(
    store: GalleryStore, failing: bytes
) -> None:
    home = store.root.parent
    spy = SpyWriter()
    with open_log(store, writer=spy) as log:
        log.append(search())
        before = log_bytes(home)
        spy.fail_when = failing
        with pytest.raises(DiskFullError, match="disk full"):
            log.append(search(case="never-recorded"))
        assert log_bytes(home) == before and log.last_seq == 1
        report = verify(home)
        assert report.status is VerifyStatus.OK and report.unsigned_records == 0
        spy.fail_when = None
        assert log.append(search()).seq == 2
        assert [r.event.case for r in log.query()] == ["2024/117", "2024/117"]


def test_checkpoints_every_n_records_and_on_close(store: GalleryStore) -> None:
    home = store.root.parent
    with open_log(store, checkpoint_every=3) as log:
        for _ in range(7):
            log.append(search())
        assert verify(home).checkpoints == 2
    report = verify(home)
    assert report.checkpoints == 3 and report.records == 7
    with open_log(store, checkpoint_every=3):
        pass  # nothing new: no empty checkpoint
    assert verify(home).checkpoints == 3


# -- refusing to build on a bad log, recovering from a crash -----------------------------------


def frames_of(home: Path) -> list[tuple[int, int]]:
    with open(audit_dir(home) / LOG_FILE, "rb") as stream:
        return [(f.offset, f.size) for f in scan_frames(stream, ScanState())]


def test_a_tampered_log_is_refused_and_left_as_evidence(store: GalleryStore) -> None:
    home = store.root.parent
    with open_log(store) as log:
        for _ in range(3):
            log.append(search())
    offset, size = frames_of(home)[1][0], frames_of(home)[1][1]
    path = audit_dir(home) / LOG_FILE
    data = bytearray(path.read_bytes())
    data[offset + size - 5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(AuditTamperedError, match="at record 2"):
        open_log(store)
    assert path.read_bytes() == bytes(data)  # nothing appended, nothing repaired


def test_a_deleted_log_is_not_silently_replaced(store: GalleryStore) -> None:
    home = store.root.parent
    with open_log(store) as log:
        log.append(search())
    (audit_dir(home) / LOG_FILE).unlink()
    (audit_dir(home) / HEAD_FILE).unlink()
    with pytest.raises(AuditTamperedError, match="deleted or moved"):
        open_log(store)
    from edgeid.runtime.identity.device_key import load_device_key

    report = verify_chain(audit_dir(home), load_device_key(home).public_key(), expect_log=True)
    assert report.status is VerifyStatus.MISSING and not report.ok


def test_a_crash_while_creating_the_log_is_finished_on_the_next_open(
    store: GalleryStore,
) -> None:
    """The keyring got the audit key, then the box died before the log file existed."""
    home = store.root.parent
    audit_dir(home).mkdir(mode=0o700)
    (audit_dir(home) / CREATING_MARKER).write_bytes(b"")
    store.keyring.new_data_key(AUDIT_KEY_SCOPE)
    with open_log(store) as log:
        assert log.append(search()).seq == 1
    assert not (audit_dir(home) / CREATING_MARKER).exists()
    assert verify(home).status is VerifyStatus.OK


def test_a_torn_tail_is_cut_and_the_recovery_recorded(store: GalleryStore) -> None:
    home = store.root.parent
    with open_log(store) as log:
        log.append(search())
        log.append(search())
    path = audit_dir(home) / LOG_FILE
    whole = path.read_bytes()
    offset, size = frames_of(home)[1]
    path.write_bytes(whole + whole[offset : offset + size // 2])  # half a frame, as a crash leaves
    report = verify(home)
    assert report.status is VerifyStatus.TORN_TAIL and report.ok
    assert report.torn_tail_bytes == size // 2
    with open_log(store) as log:
        recovered = log.query(limit=1)[0]
        assert recovered.event.action is AuditAction.LOG_RECOVERED
        assert recovered.event.user == "system"
        assert f"torn tail of {size // 2} bytes" in (recovered.event.detail or "")
    assert verify(home).status is VerifyStatus.OK


# -- sharing the device keyring with the galleries ----------------------------------------------


def test_the_audit_key_lives_beside_gallery_keys_and_survives_store_reopen_and_rotation(
    tmp_path: Path,
) -> None:
    """Regression: GalleryStore's crash recovery used to treat every keyring scope as a
    gallery, and would have erased the audit log's key as 'a gallery with no files'."""
    ensure_device_key(tmp_path)
    provider = KeyFileProvider(keys_dir(tmp_path))
    with GalleryStore(tmp_path, provider) as store:
        store.create_gallery("missing-persons")
        with AuditLog.open(tmp_path, store.keyring) as log:
            log.append(search())
    with GalleryStore(tmp_path, provider) as store:
        assert [g.name for g in store.list_galleries()] == ["missing-persons"]
        assert AUDIT_KEY_SCOPE in store.keyring.wrapped_keys()
        store.rotate_kek(KeyFileProvider(keys_dir(tmp_path)))
    with GalleryStore(tmp_path, provider) as store, AuditLog.open(tmp_path, store.keyring) as log:
        assert [r.event.case for r in log.query()] == ["2024/117"]


def test_a_record_forged_onto_the_end_is_not_signed_into_the_chain(store: GalleryStore) -> None:
    """Verify needs no key, so one well-chained frame after the signed head looks like a crash
    between append and head; the writer decrypts it before signing and refuses a forgery."""
    from edgeid.runtime.audit.frames import FrameKind, encode_frame

    home = store.root.parent
    with open_log(store) as log:
        log.append(search())
        log.append(search())
    with open(audit_dir(home) / LOG_FILE, "rb") as stream:
        last = list(scan_frames(stream, ScanState()))[-1]
    forged, _ = encode_frame(FrameKind.EVENT, 3, last.chain_hash, os.urandom(12 + 200))
    with open(audit_dir(home) / LOG_FILE, "ab") as out:
        out.write(forged)
    report = verify(home)
    assert report.ok and report.unsigned_records == 1
    with pytest.raises(AuditTamperedError, match=r"record 3 .* does not decrypt"):
        open_log(store)
