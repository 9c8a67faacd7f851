"""Signatures by the device key over the chain: in-log checkpoints and the head file.

A checkpoint frame signs (log id, last event number, chain hash before it, time) every
``CHECKPOINT_EVERY`` events and on a clean close. The head file ``head.json`` signs the chain
after every append and is replaced atomically: it says how many frames the log holds and
their final chain hash, so cutting records off the end is caught even after the last
checkpoint.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeid.runtime.audit.frames import HASH_BYTES, ID_BYTES, Checkpoint
from edgeid.runtime.compat import UTC
from edgeid.runtime.identity.device_key import fingerprint
from edgeid.runtime.storage.durable import FileWriter, write_file_atomically

HEAD_FORMAT = "edgeid-audit-head"
HEAD_VERSION = 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def to_us(moment: datetime) -> int:
    """Microseconds since the epoch, exactly (no float rounding)."""
    return (moment.astimezone(UTC) - _EPOCH) // _MICROSECOND


def from_us(us: int) -> datetime:
    return _EPOCH + us * _MICROSECOND


def verifies(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


# -- checkpoints ---------------------------------------------------------------------------


def _checkpoint_message(log_id: bytes, seq: int, prev_hash: bytes, signed_at_us: int) -> bytes:
    return (
        b"edgeid/audit/checkpoint/v1" + log_id + struct.pack(">QQ", seq, signed_at_us) + prev_hash
    )


def sign_checkpoint(
    key: Ed25519PrivateKey, log_id: bytes, seq: int, prev_hash: bytes, now: datetime
) -> Checkpoint:
    us = to_us(now)
    return Checkpoint(us, key.sign(_checkpoint_message(log_id, seq, prev_hash, us)))


def checkpoint_verifies(
    public_key: Ed25519PublicKey, log_id: bytes, seq: int, prev_hash: bytes, cp: Checkpoint
) -> bool:
    message = _checkpoint_message(log_id, seq, prev_hash, cp.signed_at_us)
    return verifies(public_key, cp.signature, message)


# -- the head file -------------------------------------------------------------------------


class HeadFormatError(ValueError):
    """head.json is not a head this build reads."""


@dataclass(frozen=True)
class Head:
    """The signed state of the chain: ``frames`` frames, the last event ``seq``, and the chain
    hash after the last frame."""

    log_id: bytes
    frames: int
    seq: int
    chain_hash: bytes
    signed_at_us: int
    key_fingerprint: str
    signature: bytes

    def message(self) -> bytes:
        return (
            b"edgeid/audit/head/v1"
            + self.log_id
            + struct.pack(">QQQ", self.frames, self.seq, self.signed_at_us)
            + self.chain_hash
        )

    def verifies(self, public_key: Ed25519PublicKey) -> bool:
        return verifies(public_key, self.signature, self.message())

    def to_json(self) -> dict[str, object]:
        return {
            "format": HEAD_FORMAT,
            "version": HEAD_VERSION,
            "log_id": self.log_id.hex(),
            "frames": self.frames,
            "seq": self.seq,
            "chain_hash": self.chain_hash.hex(),
            "signed_at": from_us(self.signed_at_us).isoformat(),
            "signed_at_us": self.signed_at_us,
            "key_fingerprint": self.key_fingerprint,
            "signature": self.signature.hex(),
        }


def sign_head(
    key: Ed25519PrivateKey, log_id: bytes, frames: int, seq: int, chain_hash: bytes, now: datetime
) -> Head:
    unsigned = Head(log_id, frames, seq, chain_hash, to_us(now), fingerprint(key), b"")
    return Head(
        log_id, frames, seq, chain_hash, unsigned.signed_at_us, unsigned.key_fingerprint,
        key.sign(unsigned.message()),
    )  # fmt: skip


def write_head(path: Path, head: Head, writer: FileWriter | None) -> None:
    data = json.dumps(head.to_json(), indent=1, sort_keys=True).encode() + b"\n"
    write_file_atomically(path, data, writer=writer, action="writing the audit head")


def parse_head(raw: bytes) -> Head:
    """A head from ``head.json``'s bytes, or ``HeadFormatError``."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("not an object")
        if (data.get("format"), data.get("version")) != (HEAD_FORMAT, HEAD_VERSION):
            raise ValueError(f"not an {HEAD_FORMAT} v{HEAD_VERSION}")
        frames, seq, us = data["frames"], data["seq"], data["signed_at_us"]
        if not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (frames, seq, us)
        ):
            raise TypeError("counts must be whole numbers")
        if data.get("signed_at") != from_us(us).isoformat():
            raise ValueError("signed_at does not match the signed time")
        log_id = bytes.fromhex(str(data["log_id"]))
        chain_hash = bytes.fromhex(str(data["chain_hash"]))
        if len(log_id) != ID_BYTES or len(chain_hash) != HASH_BYTES:
            raise ValueError("wrong id or hash length")
        return Head(
            log_id, frames, seq, chain_hash, us, str(data["key_fingerprint"]),
            bytes.fromhex(str(data["signature"])),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise HeadFormatError(str(exc)) from None
