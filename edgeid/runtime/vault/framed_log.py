"""The append-only log file format: a header, then checksummed frames of sealed entries.

Layout (big-endian)::

    header  MAGIC(8) format(u16) scope_id(16) key_id(16) crc32(u32)
    frame   FRAME_MAGIC(4) body_len(u32) body_crc(u32) head_crc(u32) body
    body    count(u16) entry*
    entry   kind(u8) record_id(16) version(u32) nonce(12) ct_len(u32) ciphertext

Only random ids, kinds, versions and sizes are in the clear; every ciphertext is AES-256-GCM
bound to its scope, kind, id and version. A frame is all-or-nothing: a batch of entries (a
subject with its faces) either lands whole or is a torn tail.

The header's format is 1 everywhere except in a gallery records log that starts with batch
records (``store.py``): that one says 2, with the same layout, so that a build which does not
know batch records refuses the file by its header instead of misreading it. ``read_header``
accepts only format 1 unless its caller names the formats it reads.

Reading tells apart the two ways a log goes wrong. A torn tail (the file ends inside a
frame, or in zeros, as after a kill -9 or a power cut during an unacknowledged append) is
dropped with a warning. A frame that is complete but fails a checksum (a bit flip, an edit)
raises ``CorruptDataError``: it is never used and never silently skipped.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edgeid.runtime.storage.durable import (
    PRIVATE_FILE_MODE,
    FileWriter,
    OsFileWriter,
    fsync_directory,
    write_all,
    write_error,
)
from edgeid.runtime.vault.crypto import NONCE_BYTES, RecordKind
from edgeid.runtime.vault.errors import CorruptDataError

logger = logging.getLogger(__name__)

LOG_MAGIC = b"EDGEIDLG"
FRAME_MAGIC = b"EGFR"
LOG_FORMAT_VERSION = 1
BATCHED_LOG_FORMAT = 2  # a records log that begins with batch records (see store.py)
ID_BYTES = 16  # random 128-bit ids: unguessable and collision-free
_HEADER = struct.Struct(">8sH16s16s")
HEADER_BYTES = _HEADER.size + 4
_FRAME_HEAD = struct.Struct(">4sII")
FRAME_HEAD_BYTES = _FRAME_HEAD.size + 4
_ENTRY_HEAD = struct.Struct(f">B{ID_BYTES}sI{NONCE_BYTES}sI")
MAX_FRAME_BYTES = 256 << 20  # a frame is one enrolment; larger is a damaged length, not data
MAX_ENTRIES_PER_FRAME = 0xFFFF  # the u16 count


@dataclass(frozen=True)
class Entry:
    """One sealed record as stored: its clear header fields and its ciphertext."""

    kind: RecordKind
    record_id: bytes
    version: int
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class Frame:
    offset: int
    size: int
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class LogHeader:
    scope_id: bytes
    key_id: bytes
    format: int = LOG_FORMAT_VERSION


def encode_header(header: LogHeader) -> bytes:
    head = _HEADER.pack(LOG_MAGIC, header.format, header.scope_id, header.key_id)
    return head + struct.pack(">I", zlib.crc32(head))


def encode_frame(entries: Sequence[Entry]) -> bytes:
    if not 0 < len(entries) <= MAX_ENTRIES_PER_FRAME:
        raise ValueError(f"a frame holds 1..{MAX_ENTRIES_PER_FRAME} entries")
    parts = [struct.pack(">H", len(entries))]
    for e in entries:
        parts.append(
            _ENTRY_HEAD.pack(int(e.kind), e.record_id, e.version, e.nonce, len(e.ciphertext))
        )
        parts.append(e.ciphertext)
    body = b"".join(parts)
    head = _FRAME_HEAD.pack(FRAME_MAGIC, len(body), zlib.crc32(body))
    return head + struct.pack(">I", zlib.crc32(head)) + body


def _decode_body(body: bytes, where: str) -> tuple[Entry, ...]:
    try:
        (count,) = struct.unpack_from(">H", body, 0)
        pos = 2
        entries = []
        for _ in range(count):
            kind, record_id, version, nonce, ct_len = _ENTRY_HEAD.unpack_from(body, pos)
            pos += _ENTRY_HEAD.size
            if pos + ct_len > len(body):
                raise ValueError("entry overruns its frame")
            ciphertext = body[pos : pos + ct_len]
            entries.append(Entry(RecordKind(kind), record_id, version, nonce, ciphertext))
            pos += ct_len
        if pos != len(body):
            raise ValueError("trailing bytes in frame")
    except (struct.error, ValueError) as exc:
        raise CorruptDataError(f"{where}: malformed frame ({exc})") from None
    return tuple(entries)


def read_header(
    stream: BinaryIO, where: str, *, formats: tuple[int, ...] = (LOG_FORMAT_VERSION,)
) -> LogHeader:
    """The checked header; a format outside ``formats`` is refused with a message to update."""
    raw = stream.read(HEADER_BYTES)
    if len(raw) != HEADER_BYTES:
        raise CorruptDataError(f"{where}: file header is truncated; restore from a backup")
    (crc,) = struct.unpack_from(">I", raw, _HEADER.size)
    magic, version, scope_id, key_id = _HEADER.unpack_from(raw, 0)
    if magic != LOG_MAGIC or zlib.crc32(raw[: _HEADER.size]) != crc:
        raise CorruptDataError(f"{where}: file header fails its checksum; restore from a backup")
    if version not in formats:
        readable = ", ".join(str(f) for f in formats)
        raise CorruptDataError(
            f"{where}: log format {version} is not supported (this build reads "
            f"{readable}); update edgeid"
        )
    return LogHeader(scope_id, key_id, version)


def _rest_is_zero(stream: BinaryIO) -> bool:
    while chunk := stream.read(1 << 16):
        if chunk.count(0) != len(chunk):
            return False
    return True


@dataclass
class ScanState:
    """Where the last whole frame ends, and how many bytes of torn tail follow it."""

    valid_end: int = HEADER_BYTES
    torn_bytes: int = 0


def scan_frames(
    stream: BinaryIO, where: str, state: ScanState, *, start: int = HEADER_BYTES
) -> Iterator[Frame]:
    """Yield every whole frame from ``start`` (just after the header); record a torn tail."""
    offset = start
    state.valid_end = start
    stream.seek(offset)
    file_end = os.fstat(stream.fileno()).st_size
    while offset < file_end:
        remaining = file_end - offset
        head = stream.read(FRAME_HEAD_BYTES)
        zeros = head.count(0) == len(head)
        torn = len(head) < FRAME_HEAD_BYTES or (zeros and _rest_is_zero(stream))
        if not torn:
            magic, body_len, body_crc = _FRAME_HEAD.unpack_from(head, 0)
            (head_crc,) = struct.unpack_from(">I", head, _FRAME_HEAD.size)
            if magic != FRAME_MAGIC or zlib.crc32(head[: _FRAME_HEAD.size]) != head_crc:
                raise CorruptDataError(
                    f"{where}: frame header at byte {offset} fails its checksum; the file was "
                    "altered or damaged; restore it from a backup"
                )
            if body_len > MAX_FRAME_BYTES:
                raise CorruptDataError(f"{where}: frame at byte {offset} is {body_len} bytes")
            torn = FRAME_HEAD_BYTES + body_len > remaining
        if torn:
            state.torn_bytes = remaining
            # A crash mid-append leaves this, and nothing acknowledged is lost; a file cut
            # short leaves it too, and then the store says what is missing and how to repair.
            logger.warning(
                "%s: a torn tail of %d bytes at byte %d (an append cut short by a crash, or "
                "the file was truncated); reading what precedes it",
                where,
                remaining,
                offset,
            )
            return
        body = stream.read(body_len)
        if zlib.crc32(body) != body_crc:
            raise CorruptDataError(
                f"{where}: frame at byte {offset} fails its checksum; the file was altered or "
                "damaged; restore it from a backup"
            )
        size = FRAME_HEAD_BYTES + body_len
        yield Frame(offset, size, _decode_body(body, where))
        offset += size
        state.valid_end = offset


@dataclass(frozen=True)
class DamagedSpan:
    """Bytes of a log that hold no whole, checksummed frame (what a salvage skips)."""

    offset: int
    size: int
    # The entries as read, when the frame's head held and its body still parses: their ids
    # and kinds (in the clear) name what was lost; their ciphertexts are not to be trusted.
    entries: tuple[Entry, ...] = ()


def salvage_frames(stream: BinaryIO, *, start: int = HEADER_BYTES) -> Iterator[Frame | DamagedSpan]:
    """Every frame that passes its checksums, and the damaged spans between them: for repair
    and scrub, which must go on past damage where ``scan_frames`` stops.

    A frame whose head is intact but whose body fails is skipped by its stated length; a
    damaged head is skipped to the next frame magic whose head checksum holds.
    """
    stream.seek(0, os.SEEK_END)
    file_end = stream.tell()
    offset = start
    while offset < file_end:
        stream.seek(offset)
        head = stream.read(FRAME_HEAD_BYTES)
        frame = _frame_at(stream, offset, head, file_end)
        if frame is not None:
            yield frame
            offset += frame.size
            continue
        if head.count(0) == len(head):  # a zero-filled torn tail is no damage
            stream.seek(offset)
            if _rest_is_zero(stream):
                return
        skip = _next_frame(stream, offset + 1, file_end)
        entries: tuple[Entry, ...] = ()
        if _head_ok(head):  # skip by the stated length when it lands on a frame or the end
            (body_len,) = struct.unpack_from(">I", head, 4)
            stated = offset + FRAME_HEAD_BYTES + body_len
            if stated <= file_end and (stated == file_end or _head_at(stream, stated)):
                skip = stated
                stream.seek(offset + FRAME_HEAD_BYTES)
                try:
                    entries = _decode_body(stream.read(body_len), "salvage")
                except CorruptDataError:
                    entries = ()
        yield DamagedSpan(offset, skip - offset, entries)
        offset = skip


def _head_ok(head: bytes) -> bool:
    if len(head) != FRAME_HEAD_BYTES:
        return False
    magic, body_len, _ = _FRAME_HEAD.unpack_from(head, 0)
    (head_crc,) = struct.unpack_from(">I", head, _FRAME_HEAD.size)
    return bool(
        magic == FRAME_MAGIC
        and zlib.crc32(head[: _FRAME_HEAD.size]) == head_crc
        and body_len <= MAX_FRAME_BYTES
    )


def _head_at(stream: BinaryIO, offset: int) -> bool:
    stream.seek(offset)
    return _head_ok(stream.read(FRAME_HEAD_BYTES))


def _frame_at(stream: BinaryIO, offset: int, head: bytes, file_end: int) -> Frame | None:
    """The whole, checked frame at ``offset``, or None."""
    if not _head_ok(head):
        return None
    _, body_len, body_crc = _FRAME_HEAD.unpack_from(head, 0)
    if offset + FRAME_HEAD_BYTES + body_len > file_end:
        return None
    body = stream.read(body_len)
    if zlib.crc32(body) != body_crc:
        return None
    try:
        return Frame(offset, FRAME_HEAD_BYTES + body_len, _decode_body(body, "salvage"))
    except CorruptDataError:
        return None


def _next_frame(stream: BinaryIO, offset: int, file_end: int) -> int:
    """Where the next plausible frame head starts after ``offset``, or the file's end."""
    chunk_bytes = 1 << 16
    while offset < file_end:
        stream.seek(offset)
        chunk = stream.read(chunk_bytes + FRAME_HEAD_BYTES)
        at = chunk.find(FRAME_MAGIC)
        while at != -1 and at < chunk_bytes:
            if _head_ok(chunk[at : at + FRAME_HEAD_BYTES]) or (
                len(chunk) - at < FRAME_HEAD_BYTES and _head_at(stream, offset + at)
            ):
                return offset + at
            at = chunk.find(FRAME_MAGIC, at + 1)
        offset += chunk_bytes
    return file_end


def read_frame_at(path: Path, offset: int, where: str) -> Frame:
    """Read and check one frame at a known offset (a thumbnail)."""
    with open(path, "rb") as stream:
        return read_frame(stream, offset, where)


def read_frame(stream: BinaryIO, offset: int, where: str) -> Frame:
    """``read_frame_at`` on an open file: for reading many frames (a compaction)."""
    stream.seek(offset)
    head = stream.read(FRAME_HEAD_BYTES)
    if len(head) != FRAME_HEAD_BYTES:
        raise CorruptDataError(f"{where}: frame at byte {offset} is missing")
    magic, body_len, body_crc = _FRAME_HEAD.unpack_from(head, 0)
    (head_crc,) = struct.unpack_from(">I", head, _FRAME_HEAD.size)
    if magic != FRAME_MAGIC or zlib.crc32(head[: _FRAME_HEAD.size]) != head_crc:
        raise CorruptDataError(f"{where}: frame header at byte {offset} fails its checksum")
    body = stream.read(body_len)
    if len(body) != body_len or zlib.crc32(body) != body_crc:
        raise CorruptDataError(f"{where}: frame at byte {offset} fails its checksum")
    return Frame(offset, FRAME_HEAD_BYTES + body_len, _decode_body(body, where))


def create_log(
    path: Path, header: LogHeader, writer: FileWriter, where: str, *, frames: bytes = b""
) -> None:
    """Write a new log of a header and its first frames, durably (temp file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
        try:
            write_all(writer, fd, encode_header(header) + frames)
            writer.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(f"creating {where}", str(path.parent), exc) from exc


class LogAppender:
    """Appends frames durably: write, fsync file, fsync folder; rolls back what fails."""

    def __init__(self, path: Path, valid_end: int, where: str, writer: FileWriter | None = None):
        self.path = path
        self.valid_end = valid_end
        self._where = where
        self._writer = writer or OsFileWriter()

    def append(self, frame: bytes) -> int:
        """Append one encoded frame; return its offset once it is durable."""
        offset = self.valid_end
        fd = os.open(self.path, os.O_WRONLY)
        try:
            try:
                if os.fstat(fd).st_size != offset:
                    os.ftruncate(fd, offset)  # drop a torn tail before building on it
                os.lseek(fd, offset, os.SEEK_SET)
                write_all(self._writer, fd, frame)
                self._writer.fsync(fd)
                fsync_directory(self.path.parent)
            except OSError as exc:
                self._roll_back(fd, offset)
                raise write_error(f"writing to {self._where}", str(self.path.parent), exc) from exc
        finally:
            os.close(fd)
        self.valid_end = offset + len(frame)
        return offset

    def roll_back_to(self, offset: int) -> None:
        """Forget appends after ``offset`` (acknowledged by this appender but not used)."""
        fd = os.open(self.path, os.O_WRONLY)
        try:
            self._roll_back(fd, offset)
        finally:
            os.close(fd)
        self.valid_end = offset

    def _roll_back(self, fd: int, offset: int) -> None:
        """Cut the file back to its last acknowledged frame; if even that fails, a reader
        will see a torn tail and drop it."""
        try:
            os.ftruncate(fd, offset)
            os.fsync(fd)
        except OSError as exc:
            logger.warning(
                "%s: could not roll back a failed append (%s); it will be read as a torn tail",
                self._where,
                exc.strerror,
            )
