"""``AuditLog``: the writer the service holds for its lifetime, and the supervisor's queries.

An ``append`` returns only once its record is durable: the sealed frame is written and
fsynced (file and folder), then the signed head is replaced atomically. Every
``checkpoint_every`` records, and on ``close``, a signed checkpoint frame joins the chain.

Opening verifies the whole chain first. A log that fails is refused (``AuditTamperedError``):
nothing is built on top of tampered records. What a crash leaves is repaired and itself
recorded as a ``log_recovered`` record: a torn tail is cut off, and a frame written just
before the crash but never signed is signed.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeid.runtime.audit.errors import (
    AuditBusyError,
    AuditError,
    AuditInputError,
    AuditTamperedError,
)
from edgeid.runtime.audit.events import (
    SYSTEM_USER,
    AuditAction,
    AuditEvent,
    AuditRecord,
    as_utc,
    check_event,
)
from edgeid.runtime.audit.frames import (
    ID_BYTES,
    FrameKind,
    LogHeader,
    encode_checkpoint,
    encode_frame,
    read_frame_at,
)
from edgeid.runtime.audit.layout import (
    AUDIT_KEY_SCOPE,
    CREATING_MARKER,
    HEAD_FILE,
    LOCK_FILE,
    LOG_FILE,
    audit_dir,
)
from edgeid.runtime.audit.sealing import open_event, seal_event
from edgeid.runtime.audit.signing import Head, sign_checkpoint, sign_head, write_head
from edgeid.runtime.audit.verify import ChainState, VerifyReport, inspect_chain
from edgeid.runtime.errors import StorageWriteError
from edgeid.runtime.identity.device_key import ensure_device_key, load_device_key
from edgeid.runtime.storage.durable import (
    FileWriter,
    OsFileWriter,
    fsync_directory,
    lock_exclusively,
    make_private_dir,
    write_file_atomically,
)
from edgeid.runtime.vault.crypto import Clock, RandomSource, system_random, utc_now
from edgeid.runtime.vault.errors import VaultError
from edgeid.runtime.vault.framed_log import LogAppender
from edgeid.runtime.vault.keys import Keyring

logger = logging.getLogger(__name__)

# A rewritten stretch of records is pinned down to at most this many; the cost is one
# 125-byte frame and one signature per this many records.
CHECKPOINT_EVERY = 100
DEFAULT_QUERY_LIMIT = 100
MAX_QUERY_LIMIT = 10_000  # one supervisor page or one CSV; larger reads go through export


@dataclass(frozen=True)
class RecordFilter:
    """Which records a query or an export wants; ``since`` inclusive, ``until`` exclusive."""

    user: str | None = None
    case: str | None = None
    action: AuditAction | None = None
    since: datetime | None = None
    until: datetime | None = None
    # Case numbers beginning with this, any letter case ("VID-2026" finds VID-2026/0300 and
    # vid-2026-17): a supervisor rarely has a whole case number to hand.
    case_prefix: str | None = None

    def describe(self) -> str:
        """The filters as an audit record of a view or an export states them."""
        parts = [
            f"{name} {value}"
            for name, value in (
                ("user", self.user),
                ("case", self.case),
                ("case starting", self.case_prefix),
                ("action", self.action),
                ("since", self.since.isoformat() if self.since else None),
                ("until", self.until.isoformat() if self.until else None),
            )
            if value
        ]
        return "filters: " + (", ".join(parts) if parts else "none")

    def normalised(self) -> RecordFilter:
        try:
            action = None if self.action is None else AuditAction(self.action)
        except ValueError:
            raise AuditInputError("unknown audit action to filter by") from None
        return RecordFilter(
            user=self.user.strip() if self.user else None,
            case=self.case.strip() if self.case else None,
            action=action,
            since=None if self.since is None else as_utc(self.since),
            until=None if self.until is None else as_utc(self.until),
            case_prefix=self.case_prefix.strip().casefold() if self.case_prefix else None,
        )

    def matches(self, record: AuditRecord) -> bool:
        event = record.event
        return (
            (self.user is None or event.user == self.user)
            and (self.case is None or event.case == self.case)
            and (
                self.case_prefix is None
                or (event.case or "").casefold().startswith(self.case_prefix.casefold())
            )
            and (self.action is None or event.action == self.action)
            and (self.since is None or record.time >= self.since)
            and (self.until is None or record.time < self.until)
        )


def _missing_log(directory: Path) -> AuditTamperedError:
    return AuditTamperedError(
        f"no audit log at {directory / LOG_FILE}, but the keyring holds the key of one: it was "
        "deleted or moved; restore it from the box's backup"
    )


class AuditLog:
    """The box's one audit log, open for appending by one process (an exclusive lock)."""

    def __init__(
        self,
        directory: Path,
        state: ChainState,
        key: bytes,
        signer: Ed25519PrivateKey,
        lock_fd: int,
        *,
        clock: Clock,
        random: RandomSource,
        writer: FileWriter,
        checkpoint_every: int,
    ) -> None:
        self.directory = directory
        self._state = state
        self._key = key
        self._signer = signer
        self._lock_fd: int | None = lock_fd
        self._clock = clock
        self._random = random
        self._writer = writer
        self._checkpoint_every = checkpoint_every
        self._mutex = threading.Lock()
        self._path = directory / LOG_FILE
        self._appender = LogAppender(self._path, state.valid_end, "the audit log", writer)
        self._head: Head | None = state.head

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        home: Path,
        keyring: Keyring,
        *,
        signer: Ed25519PrivateKey | None = None,
        clock: Clock = utc_now,
        random: RandomSource = system_random,
        writer: FileWriter | None = None,
        checkpoint_every: int = CHECKPOINT_EVERY,
    ) -> AuditLog:
        """Open (or on first use create) ``<home>/audit``, verifying the chain first.

        ``keyring`` holds the log's data key (the GalleryStore's, in the service); ``signer``
        defaults to the device key under ``<home>/identity``.
        """
        if checkpoint_every < 1:
            raise AuditInputError("checkpoint_every must be 1 or more")
        directory = audit_dir(home)
        writer = writer or OsFileWriter()
        make_private_dir(directory)
        lock_fd = lock_exclusively(
            directory / LOCK_FILE,
            lambda: AuditBusyError(
                f"the audit log under {directory} is already open for writing (edgeid serve?); "
                "use that process, or stop it first"
            ),
        )
        try:
            if not (directory / LOG_FILE).exists():
                if keyring.key_ids(AUDIT_KEY_SCOPE) and not (directory / CREATING_MARKER).exists():
                    raise _missing_log(directory)
                signer = signer or ensure_device_key(home)
                _create_log(directory, keyring, signer, clock, random, writer)
            signer = signer or load_device_key(home)
            report, state = inspect_chain(directory, signer.public_key(), index=True)
            if not report.ok or state is None:
                raise AuditTamperedError(
                    f"the audit log fails verification at record {report.first_bad_seq}: "
                    f"{report.problem}; nothing was appended; keep {directory} as evidence and "
                    "run edgeid audit verify"
                )
            try:
                key = keyring.data_key(AUDIT_KEY_SCOPE, state.header.key_id.hex())
            except VaultError:
                raise AuditError(
                    f"the keyring holds no key for the audit log under {directory}; restore the "
                    "keyring from the box's backup"
                ) from None
            log = cls(
                directory, state, key, signer, lock_fd, clock=clock, random=random,
                writer=writer, checkpoint_every=checkpoint_every,
            )  # fmt: skip
            log._recover(report)
            (directory / CREATING_MARKER).unlink(missing_ok=True)
            return log
        except BaseException:
            os.close(lock_fd)
            raise

    def _recover(self, report: VerifyReport) -> None:
        """Repair what a crash left, and say so in the log itself."""
        st = self._state
        notes = []
        if report.torn_tail_bytes:
            try:
                os.truncate(self._path, st.valid_end)
                fd = os.open(self._path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise StorageWriteError(f"cutting the torn tail of {self._path}: {exc}") from exc
            notes.append(
                f"dropped a torn tail of {report.torn_tail_bytes} bytes after record {st.seq} "
                "(an append cut short by a crash, never acknowledged)"
            )
            logger.warning("audit log: %s", notes[-1])
        if report.unsigned_records and st.event_offsets:
            # Verify needs no key, so it cannot tell a record cut short of its signature from
            # one forged onto the end; only ours decrypts. Check before signing it.
            fd = os.open(self._path, os.O_RDONLY)
            try:
                last = read_frame_at(fd, st.event_offsets[-1])
            finally:
                os.close(fd)
            if last.end == st.valid_end:
                open_event(self._key, st.header, last)
        if report.unsigned_records:
            notes.append(
                f"signed the last frame (record {st.seq}), written just before a crash and "
                "never acknowledged"
            )
            logger.warning("audit log: %s", notes[-1])
        if self._head is None or self._head.frames != st.frames:
            self._write_head(self._clock())
        if notes:
            self.append(
                AuditEvent(
                    user=SYSTEM_USER,
                    role=SYSTEM_USER,
                    action=AuditAction.LOG_RECOVERED,
                    detail="; ".join(notes),
                )
            )

    # -- reading ---------------------------------------------------------------------------

    @property
    def log_id(self) -> str:
        return self._state.header.log_id.hex()

    @property
    def last_seq(self) -> int:
        """The number of the newest record (0 for an empty log)."""
        return self._state.seq

    def query(
        self,
        *,
        user: str | None = None,
        case: str | None = None,
        action: AuditAction | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = DEFAULT_QUERY_LIMIT,
        before_seq: int | None = None,
        case_prefix: str | None = None,
    ) -> list[AuditRecord]:
        """Records matching every filter given, newest first, at most ``limit``.

        ``since`` is inclusive, ``until`` exclusive (naive times are UTC); ``before_seq``
        pages backwards: pass the last ``seq`` of the previous page.
        """
        if isinstance(limit, bool) or not 1 <= limit <= MAX_QUERY_LIMIT:
            raise AuditInputError(f"limit must be 1..{MAX_QUERY_LIMIT}")
        wanted = RecordFilter(user, case, action, since, until, case_prefix).normalised()
        with self._mutex:
            self._require_open()
            count = self._state.seq
        offsets, header = self._state.event_offsets, self._state.header
        top = count if before_seq is None else max(0, min(count, before_seq - 1))
        found: list[AuditRecord] = []
        fd = os.open(self._path, os.O_RDONLY)
        try:
            for index in range(top - 1, -1, -1):
                frame = read_frame_at(fd, offsets[index])
                if frame.kind != FrameKind.EVENT or frame.seq != index + 1:
                    raise AuditTamperedError(
                        f"audit record {index + 1} moved in {self._path} while the service was "
                        "running; run edgeid audit verify"
                    )
                record = open_event(self._key, header, frame)
                if wanted.matches(record):
                    found.append(record)
                    if len(found) == limit:
                        break
        finally:
            os.close(fd)
        return found

    # -- writing ---------------------------------------------------------------------------

    def append(self, event: AuditEvent) -> AuditRecord:
        """Record ``event``; return once it is durable and signed into the head.

        Refuses (``AuditInputError``, nothing written) a search without a case number, a reason
        or the probe's sha256, and any malformed field. A failed write raises
        ``StorageWriteError`` and leaves the log as it was.
        """
        checked = check_event(event)
        with self._mutex:
            self._require_open()
            st = self._state
            seq = st.seq + 1
            now = as_utc(self._clock())
            payload = seal_event(
                self._key, st.header, seq, st.chain_hash, now, checked, random=self._random
            )
            frame, chain_hash = encode_frame(FrameKind.EVENT, seq, st.chain_hash, payload)
            offset = self._append_frame(frame, chain_hash, seq, now)
            st.event_offsets.append(offset)
            st.events_since_checkpoint += 1
            if st.events_since_checkpoint >= self._checkpoint_every:
                self._checkpoint_quietly(now)
            return AuditRecord(seq, now, checked, chain_hash.hex())

    def checkpoint(self) -> None:
        """Sign the chain into the log now (also done every ``checkpoint_every`` records)."""
        with self._mutex:
            self._require_open()
            if self._state.events_since_checkpoint:
                self._checkpoint(self._clock())

    def close(self) -> None:
        """Sign a final checkpoint and release the writer's lock."""
        with self._mutex:
            if self._lock_fd is None:
                return
            if self._state.events_since_checkpoint:
                self._checkpoint_quietly(self._clock())
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _require_open(self) -> None:
        if self._lock_fd is None:
            raise AuditError("the audit log is closed; open it again")

    def _append_frame(self, frame: bytes, chain_hash: bytes, seq: int, now: datetime) -> int:
        """Append durably, then sign the head; if the head cannot be written, take the frame
        back so that the log and the caller agree that nothing happened."""
        st = self._state
        before = (st.frames, st.seq, st.chain_hash, st.valid_end)
        offset = self._appender.append(frame)
        st.frames, st.seq, st.chain_hash, st.valid_end = (
            st.frames + 1, seq, chain_hash, offset + len(frame),
        )  # fmt: skip
        previous_head = self._head
        try:
            self._write_head(now)
        except StorageWriteError:
            self._appender.roll_back_to(offset)
            st.frames, st.seq, st.chain_hash, st.valid_end = before
            if previous_head is not None:
                try:  # in case the new head was renamed into place before the failure
                    write_head(self.directory / HEAD_FILE, previous_head, self._writer)
                except StorageWriteError as exc:
                    logger.warning("audit log: could not restore the previous head: %s", exc)
            raise
        return offset

    def _write_head(self, now: datetime) -> None:
        st = self._state
        head = sign_head(self._signer, st.header.log_id, st.frames, st.seq, st.chain_hash, now)
        write_head(self.directory / HEAD_FILE, head, self._writer)
        self._head = head

    def _checkpoint(self, now: datetime) -> None:
        st = self._state
        signed = sign_checkpoint(self._signer, st.header.log_id, st.seq, st.chain_hash, now)
        frame, chain_hash = encode_frame(
            FrameKind.CHECKPOINT, st.seq, st.chain_hash, encode_checkpoint(signed)
        )
        self._append_frame(frame, chain_hash, st.seq, now)
        st.events_since_checkpoint = 0

    def _checkpoint_quietly(self, now: datetime) -> None:
        """A checkpoint is retried at the next append; its failure fails no caller's action."""
        try:
            self._checkpoint(now)
        except StorageWriteError as exc:
            logger.warning("audit log: checkpoint not written (%s); retrying later", exc)


def _create_log(
    directory: Path,
    keyring: Keyring,
    signer: Ed25519PrivateKey,
    clock: Clock,
    random: RandomSource,
    writer: FileWriter,
) -> None:
    """A new, empty log: marker, data key in the keyring, header, signed empty head.

    The marker tells a crash between the keyring write and the log's creation from a log that
    was deleted later (the keyring then holds its key, and there is no marker).
    """
    write_file_atomically(
        directory / CREATING_MARKER, b"", writer=writer, action="creating the audit log"
    )
    key_id, _ = keyring.new_data_key(AUDIT_KEY_SCOPE)
    header = LogHeader(random(ID_BYTES), bytes.fromhex(key_id))
    write_file_atomically(
        directory / LOG_FILE, header.encode(), writer=writer, action="creating the audit log"
    )
    head = sign_head(signer, header.log_id, 0, 0, header.genesis_hash, clock())
    write_head(directory / HEAD_FILE, head, writer)
    fsync_directory(directory)
    logger.info("created the audit log %s", header.log_id.hex())
