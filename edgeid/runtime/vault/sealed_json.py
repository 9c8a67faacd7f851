"""One JSON document sealed in one file: the small stores' envelope (proposals, kept searches).

The file is ``{"format", "version", "key_id", "nonce", "ciphertext"}`` (hex), AES-256-GCM under
a data key of the keyring's ``scope``, bound by the caller's associated data to what the file
is (its kind, version, key and, where the store holds several, its name): a file renamed or
copied from another store does not open. Reading sorts failures into three named errors so
each store can say what the operator should do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from edgeid.runtime.storage.durable import make_private_dir, write_file_atomically
from edgeid.runtime.vault.crypto import RandomSource, open_sealed, seal, system_random
from edgeid.runtime.vault.errors import DecryptionError, VaultError


class ScopedKeys(Protocol):
    """The part of ``edgeid.runtime.vault.keys.Keyring`` a sealed file uses."""

    def key_ids(self, gallery_id: str) -> list[str]: ...

    def data_key(self, gallery_id: str, key_id: str) -> bytes: ...


class SealedFileUnreadable(VaultError):
    """The file is there but cannot be read as an envelope (I/O error, not JSON)."""


class SealedFileAltered(VaultError):
    """The envelope does not open: altered, renamed, or sealed on another box."""


class SealedFileMalformed(VaultError):
    """The envelope opens, or is of another format or version, but its content is not valid."""


Aad = Callable[[str], bytes]  # key id -> the associated data this file is bound to


def write_sealed_json(
    path: Path,
    document: Any,
    *,
    keys: ScopedKeys,
    scope: str,
    file_format: str,
    version: int,
    aad: Aad,
    action: str,
    random: RandomSource = system_random,
) -> None:
    """Seal ``document`` (JSON) under the scope's newest data key and replace ``path``."""
    key_id = keys.key_ids(scope)[0]
    plain = json.dumps(document, sort_keys=True).encode()
    sealed = seal(keys.data_key(scope, key_id), plain, aad(key_id), random=random)
    envelope = {
        "format": file_format,
        "version": version,
        "key_id": key_id,
        "nonce": sealed.nonce.hex(),
        "ciphertext": sealed.ciphertext.hex(),
    }
    make_private_dir(path.parent)
    write_file_atomically(
        path, json.dumps(envelope, sort_keys=True).encode() + b"\n", action=action
    )


def read_sealed_json(
    path: Path, *, keys: ScopedKeys, scope: str, file_format: str, version: int, aad: Aad
) -> Any:
    """The document ``path`` holds, or None when there is no such file."""
    try:
        envelope = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SealedFileUnreadable(type(exc).__name__) from exc
    try:
        if envelope.get("format") != file_format or envelope.get("version") != version:
            raise ValueError("format")
        key_id = str(envelope["key_id"])
        plain = open_sealed(
            keys.data_key(scope, key_id),
            bytes.fromhex(envelope["nonce"]),
            bytes.fromhex(envelope["ciphertext"]),
            aad(key_id),
        )
        return json.loads(plain)
    except DecryptionError:
        raise SealedFileAltered() from None
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise SealedFileMalformed(type(exc).__name__) from exc
