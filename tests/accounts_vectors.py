"""Known-answer vectors for the sealed accounts files (``edgeid/runtime/accounts/sealing.py``).

    .venv/bin/python tests/accounts_vectors.py tests/vectors/accounts

writes a valid ``users.json`` and ``tokens.json`` sealed under a fixed key with fixed
randomness, the ways a users file can be wrong, a plaintext file of the previous version,
and ``expected.json`` (for each ``users-*.json``: a piece of the error opening it gives, or
null where it opens). ``tests/test_accounts_sealing.py`` regenerates the set and compares it
byte for byte with the committed copy, so the files and this script cannot drift apart.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeid.runtime.accounts.sealing import AccountsKey, file_tag, seal_file

VECTORS_DIR = Path(__file__).parent / "vectors" / "accounts"
KEY_ID = "0123456789abcdef0123456789abcdef"
DATA_KEY = bytes(range(32))
OTHER_KEY_ID = "fedcba9876543210fedcba9876543210"
SEED = b"edgeid accounts vectors"
# Passwords of the two users (argon2id hashes below): the test signs in with them.
PASSWORDS = {"vera.vector": "vector passphrase one", "otto.vector": "vector passphrase two"}
USERS: dict[str, dict[str, Any]] = {
    "vera.vector": {
        "username": "vera.vector",
        "role": "admin",
        "password_hash": "$argon2id$v=19$m=65536,t=3,p=4$z+FCL8oNIP8QPkaNpLz3nQ$"
        "PnzaOLUeZvO7n4Y+949ZOG4YfvXLPwOEtWqG7xOv3z0",
        "must_change_password": False,
        "galleries": [],
        "disabled": False,
        "created_at": "2025-01-01T00:00:00+00:00",
        "password_changed_at": "2025-01-02T00:00:00+00:00",
    },
    "otto.vector": {
        "username": "otto.vector",
        "role": "investigator",
        "password_hash": "$argon2id$v=19$m=65536,t=3,p=4$zxpGogo+dE2RyBJpqpv9cA$"
        "ToCDzMb9IvS7CL+zAjJEk7KVEBJ+W12pX9uG9FY9BsE",
        "must_change_password": False,
        "galleries": ["Vector Gallery Ω"],
        "disabled": False,
        "created_at": "2025-01-01T00:00:00+00:00",
        "password_changed_at": "2025-01-03T00:00:00+00:00",
    },
}
TOKENS: dict[str, dict[str, Any]] = {
    "00112233445566ff": {
        "token_id": "00112233445566ff",
        "username": "otto.vector",
        "name": "vector script",
        "scopes": ["search"],
        "created_at": "2025-01-01T00:00:00+00:00",
        "expires_at": "2025-04-01T00:00:00+00:00",
        "revoked_at": None,
        "secret_sha256": hashlib.sha256(b"vector-secret").hexdigest(),
    }
}


def key(key_id: str = KEY_ID) -> AccountsKey:
    return AccountsKey.derive(key_id, DATA_KEY)


def fixed_random(seed: bytes = SEED) -> Callable[[int], bytes]:
    """A deterministic stand-in for os.urandom: SHA-256 of the seed and a counter."""
    counter = [0]

    def take(size: int) -> bytes:
        out = b""
        while len(out) < size:
            counter[0] += 1
            out += hashlib.sha256(seed + counter[0].to_bytes(8, "big")).digest()
        return out[:size]

    return take


def sealed(kind: str, items: dict[str, dict[str, Any]], key_id: str = KEY_ID) -> bytes:
    return seal_file(key(key_id), kind, items, random=fixed_random())


def _retagged(document: dict[str, Any]) -> bytes:
    """``document`` with a correct file tag: the fault then lies in an entry."""
    body = {k: v for k, v in document.items() if k != "tag"}
    return json.dumps({**body, "tag": file_tag(key(), body)}, indent=1, sort_keys=True).encode()


def _flip(blob: str, at: int) -> str:
    raw = bytearray(base64.b64decode(blob))
    raw[at] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def generate(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    users = sealed("users", USERS)
    vectors: dict[str, tuple[bytes, str | None]] = {}
    document = json.loads(users)
    lookups = sorted(document["entries"])

    flipped = json.loads(users)
    flipped["entries"][lookups[0]] = _flip(flipped["entries"][lookups[0]], 20)
    vectors["users-entry-flipped"] = (json.dumps(flipped, indent=1, sort_keys=True).encode(), "")
    vectors["users-entry-flipped-retagged"] = (_retagged(flipped), "")
    moved = json.loads(users)
    moved["entries"][lookups[0]], moved["entries"][lookups[1]] = (
        moved["entries"][lookups[1]],
        moved["entries"][lookups[0]],
    )
    vectors["users-entries-swapped-retagged"] = (_retagged(moved), "")
    dropped = json.loads(users)
    del dropped["entries"][lookups[0]]
    vectors["users-entry-dropped"] = (json.dumps(dropped, indent=1, sort_keys=True).encode(), "")
    vectors["users-other-key"] = (sealed("users", USERS, OTHER_KEY_ID), "sealed under accounts key")
    vectors["users-from-tokens"] = (sealed("tokens", TOKENS), "is not a sealed users file")
    vectors["users-not-json"] = (users[: len(users) // 2], "is not JSON")
    plaintext = {"version": 1, "users": list(USERS.values())}
    vectors["users-v1-plaintext"] = (json.dumps(plaintext, indent=1).encode(), None)

    (directory / "users.json").write_bytes(users)
    (directory / "tokens.json").write_bytes(sealed("tokens", TOKENS))
    expected: dict[str, str | None] = {}
    for name, (data, error) in vectors.items():
        (directory / f"{name}.json").write_bytes(data)
        expected[name] = "does not open" if error == "" else error
    (directory / "expected.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else VECTORS_DIR)
