"""Checking the chain and its signatures without any decryption key.

``verify_chain`` reads ``audit.log`` and ``head.json``: every frame's checksum, the sequence
numbers, each frame's previous hash, each checkpoint's signature, and that the signed head
matches the log (nothing cut off the end, no older head put back). It reports the first
record that cannot be vouched for, and tells a torn tail (a crash during an append that was
never acknowledged) from tampering. It takes no lock, so it runs while the service appends.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeid.runtime.audit.errors import AuditNotFoundError
from edgeid.runtime.audit.frames import (
    HEADER_BYTES,
    BadFrameError,
    FrameKind,
    LogHeader,
    ScanState,
    decode_checkpoint,
    parse_header,
    scan_frames,
)
from edgeid.runtime.audit.layout import HEAD_FILE, LOG_FILE
from edgeid.runtime.audit.signing import Head, HeadFormatError, checkpoint_verifies, parse_head
from edgeid.runtime.compat import StrEnum
from edgeid.runtime.identity.device_key import fingerprint

# The service may append between our reading head.json and the log; re-read that many times
# before calling an older head tampering (each append takes milliseconds, a scan much longer
# only on very large logs).
HEAD_RACE_RETRIES = 3


class VerifyStatus(StrEnum):
    OK = "ok"
    TORN_TAIL = "torn_tail"  # intact, plus the remains of an append cut short by a crash
    TAMPERED = "tampered"
    MISSING = "missing"  # no log where the keyring says there was one


@dataclass(frozen=True)
class VerifyReport:
    status: VerifyStatus
    log: str
    key_fingerprint: str
    log_id: str | None = None
    records: int = 0  # the last record number read in order
    checkpoints: int = 0  # checkpoints whose signature verified
    head_seq: int | None = None  # the last record head.json signs
    chain_hash: str | None = None  # after the last whole frame read
    first_bad_seq: int | None = None
    reason: str | None = None  # a short code: checksum, missing_record, stale_head, ...
    problem: str | None = None
    torn_tail_bytes: int = 0
    unsigned_records: int = 0  # frames after the signed head: at most one, after a crash

    @property
    def ok(self) -> bool:
        return self.status in (VerifyStatus.OK, VerifyStatus.TORN_TAIL)

    def to_json(self) -> dict[str, object]:
        return {
            "status": str(self.status),
            "ok": self.ok,
            "log": self.log,
            "log_id": self.log_id,
            "records": self.records,
            "checkpoints": self.checkpoints,
            "head_seq": self.head_seq,
            "chain_hash": self.chain_hash,
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
            "problem": self.problem,
            "torn_tail_bytes": self.torn_tail_bytes,
            "unsigned_records": self.unsigned_records,
            "key_fingerprint": self.key_fingerprint,
        }


@dataclass
class ChainState:
    """Where the chain stands after a scan: what the writer continues from."""

    header: LogHeader
    head: Head | None
    frames: int = 0
    seq: int = 0
    chain_hash: bytes = b""
    valid_end: int = HEADER_BYTES
    events_since_checkpoint: int = 0
    event_offsets: array[int] = field(default_factory=lambda: array("Q"))


def _read_optional(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def inspect_chain(
    directory: Path, public_key: Ed25519PublicKey, *, index: bool = False
) -> tuple[VerifyReport, ChainState | None]:
    """The report and, where the header could be read, the chain's state (``index``: with the
    offset of every event frame, for the writer's queries)."""
    head_path = directory / HEAD_FILE
    for _ in range(HEAD_RACE_RETRIES):
        head_raw = _read_optional(head_path)
        report, state = _inspect(directory / LOG_FILE, head_raw, public_key, index)
        if report.reason != "stale_head" or _read_optional(head_path) == head_raw:
            break
    return report, state


def verify_chain(
    directory: Path, public_key: Ed25519PublicKey, *, expect_log: bool = False
) -> VerifyReport:
    """Check the audit log in ``directory`` against the device's public key; no key needed.

    A missing log is ``AuditNotFoundError``, or a ``MISSING`` report when ``expect_log`` (the
    keyring holds the key of a log, so one existed).
    """
    if not (directory / LOG_FILE).exists():
        if expect_log:
            return VerifyReport(
                VerifyStatus.MISSING,
                str(directory / LOG_FILE),
                fingerprint(public_key),
                reason="log_missing",
                problem=f"no audit log at {directory / LOG_FILE}, but the keyring holds the key "
                "of one: it was deleted or moved; restore it from a backup",
            )
        raise AuditNotFoundError(
            f"no audit log under {directory}; the service creates it on first start, or check "
            "--home"
        )
    return inspect_chain(directory, public_key)[0]


def _inspect(
    log_path: Path, head_raw: bytes | None, public_key: Ed25519PublicKey, index: bool
) -> tuple[VerifyReport, ChainState | None]:
    fp = fingerprint(public_key)
    with open(log_path, "rb") as stream:
        end = os.fstat(stream.fileno()).st_size
        try:
            header = parse_header(stream.read(HEADER_BYTES))
        except BadFrameError as exc:
            problem = f"the audit log's {exc.reason}: it was altered or damaged"
            report = VerifyReport(
                VerifyStatus.TAMPERED, str(log_path), fp, first_bad_seq=1, reason="header",
                problem=problem,
            )  # fmt: skip
            return report, None
        head: Head | None = None
        head_error: str | None = None
        if head_raw is not None:
            try:
                head = parse_head(head_raw)
            except HeadFormatError as exc:
                head_error = str(exc)
        scan = _Scan(header, head, public_key, index)
        scan.run(stream, end)
    return scan.report(log_path, fp, head_error), scan.state


class _Scan:
    """One pass over the frames, stopping at the first that breaks the chain."""

    def __init__(
        self, header: LogHeader, head: Head | None, public_key: Ed25519PublicKey, index: bool
    ) -> None:
        self.header = header
        self.head = head
        self.public_key = public_key
        self.index = index
        self.state = ChainState(header, head, chain_hash=header.genesis_hash)
        self.checkpoints = 0
        self.last_signed_seq = 0  # the last record a verified checkpoint covers
        self.scan = ScanState()
        self.bad: tuple[int | None, str, str] | None = None  # first bad seq, reason, problem
        # The chain as it stood after head.frames frames: hash, last seq, last signed seq.
        self.at_head: tuple[bytes, int, int] | None = None
        self._note_head_position()

    def _note_head_position(self) -> None:
        st = self.state
        if self.head is not None and st.frames == self.head.frames:
            self.at_head = (st.chain_hash, st.seq, self.last_signed_seq)

    def run(self, stream: BinaryIO, end: int) -> None:
        st = self.state
        previous_kind: FrameKind | None = None
        try:
            for frame in scan_frames(stream, self.scan, end=end):
                expected = st.seq + 1
                if frame.kind == FrameKind.EVENT:
                    if frame.seq != expected:
                        self.bad = _out_of_order(frame.seq, expected, frame.offset)
                        return
                    if frame.prev_hash != st.chain_hash:
                        # The link before this record is broken: the record before it was
                        # changed (its checksum rebuilt), or this one was moved here.
                        first = st.seq if previous_kind == FrameKind.EVENT and st.seq else expected
                        self.bad = (
                            first,
                            "chain_broken",
                            f"record {expected} (byte {frame.offset}) does not hold the chain "
                            f"hash of the frame before it: record {first} was altered, or "
                            "records were moved",
                        )
                        return
                    st.seq = frame.seq
                    st.events_since_checkpoint += 1
                    if self.index:
                        st.event_offsets.append(frame.offset)
                else:
                    if frame.seq != st.seq or frame.prev_hash != st.chain_hash:
                        self.bad = (
                            expected,
                            "misplaced_checkpoint",
                            f"the checkpoint at byte {frame.offset} claims record {frame.seq} but "
                            f"follows record {st.seq}: it was copied or moved there",
                        )
                        return
                    cp = decode_checkpoint(frame)
                    if not checkpoint_verifies(
                        self.public_key, self.header.log_id, frame.seq, frame.prev_hash, cp
                    ):
                        self.bad = (
                            self.last_signed_seq + 1,
                            "bad_checkpoint",
                            f"records {self.last_signed_seq + 1}..{frame.seq} do not match the "
                            f"signed checkpoint after record {frame.seq} (byte {frame.offset}): "
                            "altered with the chain rebuilt, or signed by another key",
                        )
                        return
                    self.checkpoints += 1
                    self.last_signed_seq = frame.seq
                    st.events_since_checkpoint = 0
                previous_kind = frame.kind
                st.chain_hash = frame.chain_hash
                st.frames += 1
                st.valid_end = frame.end
                self._note_head_position()
        except BadFrameError as exc:
            expected = st.seq + 1
            self.bad = (
                expected,
                "checksum",
                f"record {expected}: the {exc}: it was altered or damaged",
            )

    def report(self, log_path: Path, fp: str, head_error: str | None) -> VerifyReport:
        st, head = self.state, self.head
        base = VerifyReport(
            VerifyStatus.OK,
            str(log_path),
            fp,
            log_id=self.header.log_id.hex(),
            records=st.seq,
            checkpoints=self.checkpoints,
            head_seq=head.seq if head is not None else None,
            chain_hash=st.chain_hash.hex(),
            torn_tail_bytes=self.scan.torn_bytes,
        )
        bad = self.bad or self._head_problem(head_error)
        if bad is not None:
            first, reason, problem = bad
            return replace(
                base, status=VerifyStatus.TAMPERED, first_bad_seq=first, reason=reason,
                problem=problem,
            )  # fmt: skip
        unsigned = st.frames - head.frames if head is not None else st.frames
        status = VerifyStatus.TORN_TAIL if self.scan.torn_bytes else VerifyStatus.OK
        return replace(base, status=status, unsigned_records=unsigned)

    def _head_problem(self, error: str | None) -> tuple[int | None, str, str] | None:
        st, head = self.state, self.head
        # Records no checkpoint vouches for; None when a checkpoint covers the last record and
        # only the head file itself is bad.
        unsigned_from = self.last_signed_seq + 1 if self.last_signed_seq < st.seq else None
        if error is not None:
            return unsigned_from, "head_malformed", f"head.json is malformed ({error}); restore it"
        if head is None:
            if st.frames == 0:
                return None  # a crash while the log was being created: nothing to sign yet
            return unsigned_from, "head_missing", "head.json (the signed chain head) was deleted"
        if head.log_id != self.header.log_id:
            return unsigned_from, "head_mismatch", "head.json belongs to another audit log"
        if not head.verifies(self.public_key):
            return (
                unsigned_from,
                "head_signature",
                "head.json's signature does not verify: forged, or signed by another device key",
            )
        if st.frames < head.frames:
            first = st.seq + 1 if st.seq < head.seq else st.seq
            torn = (
                f" (and {self.scan.torn_bytes} bytes of a partial frame)"
                if self.scan.torn_bytes
                else ""
            )
            return (
                first,
                "truncated",
                f"the log ends after record {st.seq}{torn} but its signed head covers record "
                f"{head.seq} ({head.frames} frames, the log has {st.frames}): the end was cut off",
            )
        assert self.at_head is not None  # the scan passed head.frames frames
        chain_hash, seq, signed = self.at_head
        if chain_hash != head.chain_hash or seq != head.seq:
            return (
                signed + 1,
                "head_mismatch",
                f"records {signed + 1}..{head.seq} do not match the signed head: altered with "
                "the chain rebuilt",
            )
        if st.frames > head.frames + 1:
            return (
                head.seq + 1,
                "stale_head",
                f"the signed head covers record {head.seq} but the log runs to record {st.seq}: "
                "head.json was replaced with an older copy",
            )
        return None


def _out_of_order(found: int, expected: int, offset: int) -> tuple[int, str, str]:
    if found < expected:
        return (
            expected,
            "out_of_order",
            f"record {found} appears again where record {expected} belongs (byte {offset}): "
            "a copy was inserted or records were reordered",
        )
    return (
        expected,
        "missing_record",
        f"record {expected} is missing (record {found} is in its place, byte {offset}): "
        "records were deleted or reordered",
    )
