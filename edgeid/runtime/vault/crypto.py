"""AES-256-GCM for sealed records and wrapped keys, and scrypt for passphrases.

Every ciphertext is bound by its associated data to where it belongs: the scope (a gallery,
a case, the audit log or an export), the record kind and id, and the record's version. A record
copied to another scope, another record id or another version fails to open. Every failure to
open raises the same ``DecryptionError`` with no detail, chained to nothing.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from edgeid.runtime.compat import UTC
from edgeid.runtime.vault.errors import DecryptionError, VaultError

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # GCM's native 96-bit nonce; random nonces are safe for 2**32 seals per key
TAG_BYTES = 16  # GCM's full tag, never truncated
RECORD_FORMAT_VERSION = 1  # bumped when the associated-data layout changes
SCRYPT_MIN_LOG2_N = 10  # below this a passphrase is guessed too cheaply to be worth storing
SCRYPT_MAX_LOG2_N = 20  # 1 GiB at r=8: refuse a hostile file that asks for more memory
SCRYPT_MAX_R = 16  # bounds scrypt's memory (128 * n * r bytes) against hostile parameters
SCRYPT_MAX_P = 4  # bounds scrypt's time against hostile parameters
SALT_BYTES = 16  # unique per derivation; 128 bits rules out salt collisions

RandomSource = Callable[[int], bytes]
Clock = Callable[[], datetime]


def system_random(size: int) -> bytes:
    """The operating system's CSPRNG; the default wherever randomness is injectable."""
    return os.urandom(size)


def utc_now() -> datetime:
    """The wall clock in UTC; the default wherever a clock is injectable."""
    return datetime.now(UTC)


class RecordKind(IntEnum):
    """What a sealed record is; part of its associated data, so kinds cannot be swapped."""

    GALLERY = 1
    SUBJECT = 2
    FACE = 3
    THUMBNAIL = 4
    TOMBSTONE = 5
    INDEX = 6
    EXPORT_END = 7


def _field(data: bytes) -> bytes:
    """Length-prefixed, so that no two field lists encode to the same bytes."""
    return struct.pack(">I", len(data)) + data


def record_aad(scope_id: bytes, kind: RecordKind, record_id: bytes, version: int) -> bytes:
    """The associated data binding a record to its scope, kind, id and version."""
    return (
        b"edgeid/record"
        + struct.pack(">HBI", RECORD_FORMAT_VERSION, int(kind), version)
        + _field(scope_id)
        + _field(record_id)
    )


@dataclass(frozen=True)
class Sealed:
    """A nonce and the ciphertext with its tag."""

    nonce: bytes
    ciphertext: bytes


def seal(
    key: bytes, plaintext: bytes, aad: bytes, *, random: RandomSource = system_random
) -> Sealed:
    """Encrypt and authenticate ``plaintext`` under ``key`` with a fresh random nonce."""
    if len(key) != KEY_BYTES:
        raise VaultError(f"an AES-256 key is {KEY_BYTES} bytes, got {len(key)}")
    nonce = random(NONCE_BYTES)
    if len(nonce) != NONCE_BYTES:
        raise VaultError(f"the random source returned {len(nonce)} bytes, not {NONCE_BYTES}")
    return Sealed(nonce, AESGCM(key).encrypt(nonce, plaintext, aad))


def open_sealed(key: bytes, nonce: bytes, ciphertext: bytes | memoryview, aad: bytes) -> bytes:
    """Authenticate and decrypt; any failure at all is the one opaque ``DecryptionError``."""
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except (InvalidTag, ValueError, TypeError, OverflowError):
        pass
    raise DecryptionError()  # outside the except block: no chained cause to leak detail


class RecordCipher:
    """Seals and opens the records of one scope (a gallery or an export) under one key."""

    def __init__(
        self, key: bytes, scope_id: bytes, *, random: RandomSource = system_random
    ) -> None:
        if len(key) != KEY_BYTES:
            raise VaultError(f"an AES-256 key is {KEY_BYTES} bytes, got {len(key)}")
        self._key = key
        self._random = random
        self.scope_id = scope_id

    def seal(self, kind: RecordKind, record_id: bytes, version: int, plaintext: bytes) -> Sealed:
        aad = record_aad(self.scope_id, kind, record_id, version)
        return seal(self._key, plaintext, aad, random=self._random)

    def open(
        self,
        kind: RecordKind,
        record_id: bytes,
        version: int,
        nonce: bytes,
        ciphertext: bytes | memoryview,
    ) -> bytes:
        aad = record_aad(self.scope_id, kind, record_id, version)
        return open_sealed(self._key, nonce, ciphertext, aad)


def wrap_key(
    kek: bytes, key: bytes, context: bytes, *, random: RandomSource = system_random
) -> bytes:
    """Wrap a data key under a key-encryption key: ``nonce || ciphertext || tag``."""
    sealed = seal(kek, key, b"edgeid/wrap" + _field(context), random=random)
    return sealed.nonce + sealed.ciphertext


def unwrap_key(kek: bytes, wrapped: bytes, context: bytes) -> bytes:
    """Unwrap a data key; a wrong KEK or context is ``DecryptionError``."""
    if len(kek) != KEY_BYTES or len(wrapped) != NONCE_BYTES + KEY_BYTES + TAG_BYTES:
        raise DecryptionError()
    aad = b"edgeid/wrap" + _field(context)
    return open_sealed(kek, wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], aad)


@dataclass(frozen=True)
class ScryptParams:
    """scrypt's cost parameters and salt, stored beside whatever they protect."""

    log2_n: int
    r: int
    p: int
    salt: bytes

    def __post_init__(self) -> None:
        if not SCRYPT_MIN_LOG2_N <= self.log2_n <= SCRYPT_MAX_LOG2_N:
            raise VaultError(
                f"scrypt log2(n) must be {SCRYPT_MIN_LOG2_N}..{SCRYPT_MAX_LOG2_N}, "
                f"got {self.log2_n}"
            )
        if not (1 <= self.r <= SCRYPT_MAX_R and 1 <= self.p <= SCRYPT_MAX_P):
            raise VaultError(f"scrypt r={self.r} p={self.p} out of bounds")
        if len(self.salt) < SALT_BYTES:
            raise VaultError(f"scrypt salt must be at least {SALT_BYTES} bytes")

    def to_json(self) -> dict[str, object]:
        return {"log2_n": self.log2_n, "r": self.r, "p": self.p, "salt": self.salt.hex()}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ScryptParams:
        try:
            log2_n, r, p, salt = data["log2_n"], data["r"], data["p"], data["salt"]
            if not (isinstance(log2_n, int) and isinstance(r, int) and isinstance(p, int)):
                raise TypeError("scrypt parameters must be integers")
            if not isinstance(salt, str):
                raise TypeError("scrypt salt must be hex")
            return cls(log2_n, r, p, bytes.fromhex(salt))
        except (KeyError, TypeError, ValueError) as exc:
            raise VaultError(f"malformed scrypt parameters: {exc}") from exc


SCRYPT_DEFAULT_LOG2_N = 17  # 128 MiB and about half a second here: OWASP's scrypt floor
SCRYPT_DEFAULT_R = 8  # scrypt's standard block size
SCRYPT_DEFAULT_P = 1  # no parallelism: the box has few cores


def new_scrypt_params(
    *,
    log2_n: int = SCRYPT_DEFAULT_LOG2_N,
    r: int = SCRYPT_DEFAULT_R,
    p: int = SCRYPT_DEFAULT_P,
    random: RandomSource = system_random,
) -> ScryptParams:
    return ScryptParams(log2_n, r, p, random(SALT_BYTES))


def derive_key(passphrase: str, params: ScryptParams) -> bytes:
    """A 256-bit key from a passphrase; the passphrase must not be empty."""
    if not passphrase:
        raise VaultError("an empty passphrase protects nothing; give a passphrase")
    kdf = Scrypt(salt=params.salt, length=KEY_BYTES, n=2**params.log2_n, r=params.r, p=params.p)
    return kdf.derive(passphrase.encode("utf-8"))
