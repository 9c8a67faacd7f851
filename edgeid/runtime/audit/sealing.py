"""Sealing an event into a frame payload and opening it again (AES-256-GCM).

The associated data binds the ciphertext to its log, data key, sequence number and the chain
hash before it, so a record copied into another log, renumbered or moved along the chain fails
to open even where someone rebuilt the chain's hashes around it.
"""

from __future__ import annotations

import json
import struct
from datetime import datetime

from edgeid.runtime.audit.errors import AuditTamperedError
from edgeid.runtime.audit.events import (
    AuditEvent,
    AuditRecord,
    as_utc,
    event_from_json,
    event_to_json,
)
from edgeid.runtime.audit.frames import NONCE_BYTES, Frame, FrameKind, LogHeader
from edgeid.runtime.vault.crypto import RandomSource, open_sealed, seal
from edgeid.runtime.vault.errors import DecryptionError

PLAINTEXT_VERSION = 1


def record_aad(header: LogHeader, seq: int, prev_hash: bytes) -> bytes:
    return (
        b"edgeid/audit/record"
        + struct.pack(">HQ", PLAINTEXT_VERSION, seq)
        + header.log_id
        + header.key_id
        + prev_hash
    )


def seal_event(
    key: bytes,
    header: LogHeader,
    seq: int,
    prev_hash: bytes,
    time: datetime,
    event: AuditEvent,
    *,
    random: RandomSource,
) -> bytes:
    """The event payload of a frame: nonce and ciphertext."""
    document = {"v": PLAINTEXT_VERSION, "time": as_utc(time).isoformat(), **event_to_json(event)}
    plaintext = json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")
    sealed = seal(key, plaintext, record_aad(header, seq, prev_hash), random=random)
    return sealed.nonce + sealed.ciphertext


def open_event(key: bytes, header: LogHeader, frame: Frame) -> AuditRecord:
    """Decrypt an event frame; a frame that does not open names only its sequence number."""
    if frame.kind != FrameKind.EVENT:
        raise ValueError("not an event frame")
    nonce, ciphertext = frame.payload[:NONCE_BYTES], frame.payload[NONCE_BYTES:]
    try:
        plaintext = open_sealed(
            key, nonce, ciphertext, record_aad(header, frame.seq, frame.prev_hash)
        )
    except DecryptionError:
        raise AuditTamperedError(
            f"audit record {frame.seq} (byte {frame.offset}) does not decrypt: it was forged or "
            "altered, or the keyring is not this log's; run edgeid audit verify"
        ) from None
    document = json.loads(plaintext)
    time = datetime.fromisoformat(document.pop("time"))
    return AuditRecord(frame.seq, time, event_from_json(document), frame.chain_hash.hex())
