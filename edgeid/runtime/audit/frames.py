"""The audit log's file format: a header, then a hash chain of checksummed frames.

Layout (big-endian)::

    header      MAGIC(8) format(u16) log_id(16) key_id(16) crc32(u32)
    frame       FRAME_MAGIC(4) body_len(u32) body_crc(u32) head_crc(u32) body
    body        kind(u8) seq(u64) prev_hash(32) payload
    event       payload = nonce(12) ciphertext       (AES-256-GCM, see sealing.py)
    checkpoint  payload = signed_at_us(u64) signature(64)   (ed25519, see signing.py)

A frame's chain hash is sha256(body); each body holds the chain hash of the frame before it
(the first holds sha256 of the header), so the chain is checked without any key. Events are
numbered 1, 2, 3...; a checkpoint carries the number of the last event it covers.

Reading tells a torn tail (the file ends inside a frame, or in zeros: an append cut short by a
crash) from a complete frame that fails its checksum or structure, which is ``BadFrameError``.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import BinaryIO

from edgeid.runtime.audit.errors import AuditError

AUDIT_MAGIC = b"EDGEIDAU"
FRAME_MAGIC = b"EAFR"
FORMAT_VERSION = 1
ID_BYTES = 16  # random 128-bit log id; the keyring's 128-bit data key id
HASH_BYTES = 32  # sha256
NONCE_BYTES = 12
SIGNATURE_BYTES = 64  # ed25519
_HEADER = struct.Struct(f">8sH{ID_BYTES}s{ID_BYTES}s")
HEADER_BYTES = _HEADER.size + 4
_FRAME_HEAD = struct.Struct(">4sII")
FRAME_HEAD_BYTES = _FRAME_HEAD.size + 4
_BODY_HEAD = struct.Struct(f">BQ{HASH_BYTES}s")
_CHECKPOINT = struct.Struct(f">Q{SIGNATURE_BYTES}s")
# A record holds at most ~1000 candidates and a few KB of text; anything near this size is a
# damaged length field, not data.
MAX_FRAME_BYTES = 4 << 20
_GENESIS = b"edgeid/audit/genesis/v1"


class FrameKind(IntEnum):
    EVENT = 1
    CHECKPOINT = 2


class BadFrameError(AuditError):
    """A complete frame that fails its checksum or structure: altered or damaged."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"frame at byte {offset} {reason}")
        self.offset = offset
        self.reason = reason


@dataclass(frozen=True)
class LogHeader:
    log_id: bytes
    key_id: bytes

    def encode(self) -> bytes:
        head = _HEADER.pack(AUDIT_MAGIC, FORMAT_VERSION, self.log_id, self.key_id)
        return head + struct.pack(">I", zlib.crc32(head))

    @property
    def genesis_hash(self) -> bytes:
        """What the first frame holds as its previous hash: binds the chain to this header."""
        return hashlib.sha256(_GENESIS + self.encode()).digest()


def parse_header(raw: bytes) -> LogHeader:
    """The header, or ``BadFrameError`` (offset 0) when it is short, altered or unknown."""
    if len(raw) < HEADER_BYTES:
        raise BadFrameError(0, "is a truncated file header")
    magic, version, log_id, key_id = _HEADER.unpack_from(raw, 0)
    (crc,) = struct.unpack_from(">I", raw, _HEADER.size)
    if magic != AUDIT_MAGIC or zlib.crc32(raw[: _HEADER.size]) != crc:
        raise BadFrameError(0, "is a file header that fails its checksum")
    if version != FORMAT_VERSION:
        raise BadFrameError(
            0, f"is a header of format {version}; this build reads {FORMAT_VERSION}"
        )
    return LogHeader(log_id, key_id)


@dataclass(frozen=True)
class Frame:
    offset: int
    size: int
    kind: FrameKind
    seq: int
    prev_hash: bytes
    payload: bytes
    chain_hash: bytes

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class Checkpoint:
    signed_at_us: int
    signature: bytes


def encode_frame(
    kind: FrameKind, seq: int, prev_hash: bytes, payload: bytes
) -> tuple[bytes, bytes]:
    """The frame's bytes and its chain hash."""
    body = _BODY_HEAD.pack(int(kind), seq, prev_hash) + payload
    head = _FRAME_HEAD.pack(FRAME_MAGIC, len(body), zlib.crc32(body))
    return head + struct.pack(">I", zlib.crc32(head)) + body, hashlib.sha256(body).digest()


def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    return _CHECKPOINT.pack(checkpoint.signed_at_us, checkpoint.signature)


def decode_checkpoint(frame: Frame) -> Checkpoint:
    signed_at_us, signature = _CHECKPOINT.unpack(frame.payload)  # size checked when parsed
    return Checkpoint(signed_at_us, signature)


def _parse_body(offset: int, body: bytes) -> Frame:
    if len(body) < _BODY_HEAD.size:
        raise BadFrameError(offset, "is too short for a record")
    kind, seq, prev_hash = _BODY_HEAD.unpack_from(body, 0)
    payload = body[_BODY_HEAD.size :]
    if kind == FrameKind.EVENT:
        if len(payload) <= NONCE_BYTES:
            raise BadFrameError(offset, "holds an event without ciphertext")
    elif kind == FrameKind.CHECKPOINT:
        if len(payload) != _CHECKPOINT.size:
            raise BadFrameError(offset, "holds a checkpoint of the wrong size")
    else:
        raise BadFrameError(offset, f"has an unknown kind {kind}")
    size = FRAME_HEAD_BYTES + len(body)
    return Frame(
        offset, size, FrameKind(kind), seq, prev_hash, payload, hashlib.sha256(body).digest()
    )


def _check_head(offset: int, head: bytes) -> int:
    magic, body_len, _ = _FRAME_HEAD.unpack_from(head, 0)
    (head_crc,) = struct.unpack_from(">I", head, _FRAME_HEAD.size)
    if magic != FRAME_MAGIC or zlib.crc32(head[: _FRAME_HEAD.size]) != head_crc:
        raise BadFrameError(offset, "has a header that fails its checksum")
    if body_len > MAX_FRAME_BYTES:
        raise BadFrameError(offset, f"claims {body_len} bytes")
    return int(body_len)


def read_frame_at(fd: int, offset: int) -> Frame:
    """One frame at a known offset (a record the writer indexed); it must be whole."""
    head = os.pread(fd, FRAME_HEAD_BYTES, offset)
    if len(head) != FRAME_HEAD_BYTES:
        raise BadFrameError(offset, "is missing")
    body_len = _check_head(offset, head)
    body = os.pread(fd, body_len, offset + FRAME_HEAD_BYTES)
    if len(body) != body_len or zlib.crc32(body) != _FRAME_HEAD.unpack_from(head, 0)[2]:
        raise BadFrameError(offset, "fails its checksum")
    return _parse_body(offset, body)


def _rest_is_zero(stream: BinaryIO, end: int) -> bool:
    while stream.tell() < end:
        chunk = stream.read(min(1 << 16, end - stream.tell()))
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False
    return True


@dataclass
class ScanState:
    """Where the last whole frame ends, and how many bytes of torn tail follow it."""

    valid_end: int = HEADER_BYTES
    torn_bytes: int = 0


def scan_frames(stream: BinaryIO, state: ScanState, *, end: int | None = None) -> Iterator[Frame]:
    """Yield every whole frame after the header, up to ``end`` (the size when the scan began,
    so that a concurrent append is not half read); record a torn tail in ``state``."""
    file_end = os.fstat(stream.fileno()).st_size if end is None else end
    offset = HEADER_BYTES
    state.valid_end, state.torn_bytes = offset, 0
    stream.seek(offset)
    while offset < file_end:
        remaining = file_end - offset
        head = stream.read(min(FRAME_HEAD_BYTES, remaining))
        torn = len(head) < FRAME_HEAD_BYTES or (
            head.count(0) == len(head) and _rest_is_zero(stream, file_end)
        )
        if not torn:
            body_len = _check_head(offset, head)
            torn = FRAME_HEAD_BYTES + body_len > remaining
        if torn:
            state.torn_bytes = remaining
            return
        body = stream.read(body_len)
        if zlib.crc32(body) != _FRAME_HEAD.unpack_from(head, 0)[2]:
            raise BadFrameError(offset, "fails its checksum")
        frame = _parse_body(offset, body)
        yield frame
        offset = frame.end
        state.valid_end = offset
