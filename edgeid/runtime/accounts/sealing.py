"""The sealed accounts file: ``users.json`` and ``tokens.json`` hold no name in clear.

Each entry (a user, a token) is sealed on its own with AES-256-GCM and filed under a keyed
hash of its name (HMAC-SHA256), so that a user name typed at sign-in finds its entry without
opening the others, and the file tells nobody who has an account. A tag over the whole file
(HMAC-SHA256) binds the entries together: none can be dropped, duplicated or carried over
from an older copy of the file without the file failing to open. Replacing the whole file with
an older copy of itself is not detected (as with any file the box keeps no counter for).

The three keys (sealing, lookup, file tag) are derived with HKDF-SHA256 from one data key
in the keyring's ``accounts`` scope, a named scope like the audit log's: a KEK rotation
re-wraps it with the rest, a gallery's crash recovery leaves it alone, a factory reset
erases it. Entry plaintexts are padded to a multiple of ``PAD_BYTES`` so that a ciphertext's
length does not give away the length of a name.

Layout (JSON, keys sorted)::

    {"format": "edgeid-accounts", "version": 2, "kind": "users", "key_id": "<32 hex>",
     "entries": {"<hmac hex>": "<base64 nonce || ciphertext || tag>", ...},
     "tag": "<hmac hex over the canonical JSON of the other five fields>"}

Version 1 was the same data in clear; ``legacy_items`` reads it for the one-time migration.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgeid.runtime.errors import EdgeidError
from edgeid.runtime.vault.crypto import KEY_BYTES, NONCE_BYTES, RandomSource, open_sealed, seal
from edgeid.runtime.vault.errors import DecryptionError
from edgeid.runtime.vault.keys import Keyring

logger = logging.getLogger(__name__)

ACCOUNTS_KEY_SCOPE = "accounts"  # not a gallery scope (random hex): gallery recovery skips it
FILE_FORMAT = "edgeid-accounts"
FILE_VERSION = 2  # version 1 held the same entries in clear
LEGACY_VERSION = 1
PAD_BYTES = 64  # hides a name's length to within this many bytes; entries are small anyway
LOOKUP_HEX_CHARS = 64  # HMAC-SHA256
MAX_FILE_BYTES = 64 << 20  # far beyond any office's users; refuses a hostile giant file


class AccountsFileError(EdgeidError):
    """An accounts file is unreadable, malformed, altered, or sealed under another key."""


@dataclass(frozen=True)
class AccountsKey:
    """The accounts scope's data key, as the three keys derived from it."""

    key_id: str
    seal_key: bytes = field(repr=False)
    lookup_key: bytes = field(repr=False)
    tag_key: bytes = field(repr=False)

    @classmethod
    def derive(cls, key_id: str, data_key: bytes) -> AccountsKey:
        if len(data_key) != KEY_BYTES:
            raise AccountsFileError(f"the accounts key must be {KEY_BYTES} bytes")

        def expand(purpose: bytes) -> bytes:
            info = b"edgeid/accounts/v%d/" % FILE_VERSION + purpose
            return HKDF(hashes.SHA256(), KEY_BYTES, salt=None, info=info).derive(data_key)

        return cls(key_id, expand(b"seal"), expand(b"lookup"), expand(b"file-tag"))

    def lookup(self, kind: str, name: str) -> str:
        """The keyed hash a name is filed under; a different value in each kind of file."""
        message = _field(kind.encode()) + _field(name.encode("utf-8"))
        return hmac.new(self.lookup_key, message, hashlib.sha256).hexdigest()


def accounts_key(keyring: Keyring) -> AccountsKey:
    """The box's accounts key, made on first use.

    Only for the process that holds the galleries' lock (``edgeid serve``, or a command
    while it is stopped): a keyring opened beside a running service is read-only, because
    the service would write its own copy back without the new key.
    """
    found = existing_accounts_key(keyring)
    if found is not None:
        return found
    key_id, key = keyring.new_data_key(ACCOUNTS_KEY_SCOPE)
    logger.info("created the accounts key %s", key_id[:8])
    return AccountsKey.derive(key_id, key)


def existing_accounts_key(keyring: Keyring) -> AccountsKey | None:
    """The accounts key if the keyring holds one; never changes the keyring."""
    key_ids = keyring.key_ids(ACCOUNTS_KEY_SCOPE)
    if not key_ids:
        return None
    if len(key_ids) > 1:
        raise AccountsFileError(
            f"the keyring {keyring.path} holds {len(key_ids)} accounts keys, not one; restore "
            "it from the box's backup"
        )
    return AccountsKey.derive(key_ids[0], keyring.data_key(ACCOUNTS_KEY_SCOPE, key_ids[0]))


# -- the format ----------------------------------------------------------------------------


def _field(data: bytes) -> bytes:
    """Length-prefixed, so that no two field lists encode to the same bytes."""
    return struct.pack(">I", len(data)) + data


def entry_aad(kind: str, key_id: str, lookup: str) -> bytes:
    """Binds an entry to its file's kind, its key and the name it is filed under."""
    return (
        b"edgeid/accounts/entry"
        + struct.pack(">H", FILE_VERSION)
        + _field(kind.encode())
        + _field(key_id.encode())
        + _field(lookup.encode())
    )


def _canonical(document: Mapping[str, object]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def file_tag(key: AccountsKey, body: Mapping[str, object]) -> str:
    return hmac.new(key.tag_key, b"edgeid/accounts/file" + _canonical(body), "sha256").hexdigest()


def _padded(item: Mapping[str, Any]) -> bytes:
    plain = _canonical(item)
    return plain + b" " * (-len(plain) % PAD_BYTES)  # JSON ignores trailing spaces


def seal_file(
    key: AccountsKey,
    kind: str,
    items: Mapping[str, Mapping[str, Any]],
    *,
    random: RandomSource,
) -> bytes:
    """The file's bytes for ``items`` (name -> entry); sealed in the order of their hashes,
    so that the same key, items and randomness give the same bytes."""
    by_lookup = {key.lookup(kind, name): item for name, item in items.items()}
    entries = {}
    for lookup in sorted(by_lookup):
        sealed = seal(
            key.seal_key,
            _padded(by_lookup[lookup]),
            entry_aad(kind, key.key_id, lookup),
            random=random,
        )
        entries[lookup] = base64.b64encode(sealed.nonce + sealed.ciphertext).decode()
    body: dict[str, object] = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "kind": kind,
        "key_id": key.key_id,
        "entries": entries,
    }
    return json.dumps({**body, "tag": file_tag(key, body)}, indent=1, sort_keys=True).encode()


def parse(data: bytes, where: Path) -> dict[str, Any]:
    """The file as JSON (sealed or legacy), or an error naming it."""
    if len(data) > MAX_FILE_BYTES:
        raise AccountsFileError(f"{where} is {len(data)} bytes; restore it from a backup")
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise AccountsFileError(f"{where} is not JSON; restore it from a backup") from None
    if not isinstance(document, dict):
        raise AccountsFileError(f"{where} is not an accounts file; restore it from a backup")
    return document


def is_legacy(document: Mapping[str, Any]) -> bool:
    return "format" not in document and document.get("version") == LEGACY_VERSION


def legacy_items(document: Mapping[str, Any], list_key: str, where: Path) -> list[dict[str, Any]]:
    """The entries of a version 1 (plaintext) file."""
    items = document.get(list_key)
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise AccountsFileError(f"{where} has no list {list_key!r}; restore it from a backup")
    return items


def open_file(
    key: AccountsKey, kind: str, document: Mapping[str, Any], where: Path
) -> dict[str, bytes]:
    """Check a sealed file's header and tag; its entries (hash -> sealed bytes), unopened."""
    if (document.get("format"), document.get("version"), document.get("kind")) != (
        FILE_FORMAT,
        FILE_VERSION,
        kind,
    ):
        raise AccountsFileError(
            f"{where} is not a sealed {kind} file (format {FILE_FORMAT} v{FILE_VERSION}); "
            "restore it from a backup"
        )
    key_id = document.get("key_id")
    if key_id != key.key_id:
        raise AccountsFileError(
            f"{where} is sealed under accounts key {str(key_id)[:8]}, but the keyring holds "
            f"{key.key_id[:8]}: restore the keyring (or the file) from the box's backup"
        )
    entries = document.get("entries")
    tag = document.get("tag")
    body = {k: v for k, v in document.items() if k != "tag"}
    if (
        not isinstance(entries, dict)
        or not isinstance(tag, str)
        or set(body) != {"format", "version", "kind", "key_id", "entries"}
        or not hmac.compare_digest(tag.encode(), file_tag(key, body).encode())
    ):
        raise _altered(where)
    out = {}
    for lookup, blob in entries.items():
        if not isinstance(blob, str) or len(lookup) != LOOKUP_HEX_CHARS:
            raise _altered(where)
        try:
            out[lookup] = base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            raise _altered(where) from None
    return out


def open_entry(
    key: AccountsKey, kind: str, lookup: str, sealed: bytes, where: Path
) -> dict[str, Any]:
    """One entry's fields; it must be the entry of the name it is filed under."""
    try:
        plain = open_sealed(
            key.seal_key,
            sealed[:NONCE_BYTES],
            sealed[NONCE_BYTES:],
            entry_aad(kind, key.key_id, lookup),
        )
    except DecryptionError:
        raise _altered(where) from None
    try:
        item = json.loads(plain)
    except ValueError:
        item = None
    if not isinstance(item, dict):
        raise _altered(where)
    return item


def _altered(where: Path) -> AccountsFileError:
    return AccountsFileError(
        f"{where} does not open: it was altered or damaged, or sealed on another box; "
        "restore it from the box's backup"
    )
