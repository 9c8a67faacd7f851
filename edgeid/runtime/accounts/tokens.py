"""Scoped, revocable API tokens, stored as hashes in ``<home>/accounts/tokens.json``, whose
entries (owner, label, scopes) are sealed under the keyring's ``accounts`` scope.

A token reads ``edgeid_<id>_<secret>``; the id finds the entry, and only the sha256 of the
secret is kept. The secret carries 256 random bits, so a fast hash suffices: no one can guess
their way to a preimage, and checking a token costs no argon2 time per API call. A token's
scopes are a subset of its owner's permissions at creation, and what it may do is always
those scopes within the owner's *current* permissions, so demoting or disabling a user
shrinks or stops their tokens at once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from edgeid.runtime.accounts.files import AccountsFileError, SealedFile, accounts_dir, locked
from edgeid.runtime.accounts.roles import Permission, parse_permissions
from edgeid.runtime.accounts.sealing import AccountsKey
from edgeid.runtime.compat import UTC
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.vault.crypto import RandomSource, system_random

TOKENS_FILE = "tokens.json"
TOKEN_PREFIX = "edgeid_"
TOKEN_FORMAT = re.compile(r"edgeid_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
DEFAULT_TTL_DAYS = 90  # a token outliving a quarter is a token someone forgot about
MAX_TTL_DAYS = 365
MAX_TOKEN_NAME_CHARS = 80

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class TokenNotFoundError(BadInputError):
    """No token with that id."""


@dataclass(frozen=True)
class Token:
    token_id: str
    username: str
    name: str
    scopes: frozenset[Permission]
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    secret_sha256: str

    def active(self, now: datetime) -> bool:
        return self.revoked_at is None and now < self.expires_at

    def to_json(self) -> dict[str, Any]:
        return {
            "token_id": self.token_id,
            "username": self.username,
            "name": self.name,
            "scopes": sorted(s.value for s in self.scopes),
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "secret_sha256": self.secret_sha256,
        }

    def public(self) -> dict[str, Any]:
        out = self.to_json()
        del out["secret_sha256"]
        return out


def _token_from(item: dict[str, Any], where: Path) -> Token:
    try:
        revoked = item["revoked_at"]
        return Token(
            token_id=str(item["token_id"]),
            username=str(item["username"]),
            name=str(item["name"]),
            scopes=parse_permissions(list(item["scopes"])),
            created_at=datetime.fromisoformat(item["created_at"]),
            expires_at=datetime.fromisoformat(item["expires_at"]),
            revoked_at=datetime.fromisoformat(revoked) if revoked else None,
            secret_sha256=str(item["secret_sha256"]),
        )
    except (KeyError, TypeError, ValueError, BadInputError) as exc:
        raise AccountsFileError(
            f"{where} holds a malformed token entry; restore it from a backup"
        ) from exc


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


class TokenStore:
    """The box's API tokens; ``key``: the accounts key from the keyring."""

    def __init__(
        self,
        home: Path,
        key: AccountsKey,
        *,
        clock: Clock = _utc_now,
        random: RandomSource = system_random,
    ) -> None:
        self.directory = accounts_dir(home)
        self.path = self.directory / TOKENS_FILE
        self._clock = clock
        self._file = SealedFile(self.path, "tokens", "token_id", key, random=random)

    def _tokens(self) -> dict[str, Token]:
        tokens = (_token_from(item, self.path) for item in self._file.items())
        return {t.token_id: t for t in tokens}

    def _find(self, token_id: str) -> Token | None:
        item = self._file.find(token_id)
        return None if item is None else _token_from(item, self.path)

    def _change(self, change: Callable[[dict[str, Token]], Token]) -> Token:
        with locked(self.directory):
            self._file.reread()
            tokens = self._tokens()
            result = change(tokens)
            tokens[result.token_id] = result
            self._file.write({tid: t.to_json() for tid, t in tokens.items()})
            return result

    def list(self, username: str | None = None) -> list[Token]:
        tokens = self._tokens().values()
        chosen = [t for t in tokens if username is None or t.username == username]
        return sorted(chosen, key=lambda t: (t.username, t.created_at))

    def get(self, token_id: str) -> Token:
        token = self._find(token_id)
        if token is None:
            raise TokenNotFoundError(f"no API token with id {token_id!r}")
        return token

    def create(
        self,
        username: str,
        name: str,
        scopes: Iterable[Permission | str],
        *,
        allowed: frozenset[Permission],
        ttl_days: int = DEFAULT_TTL_DAYS,
    ) -> tuple[Token, str]:
        """A new token and its one-time-shown value; ``allowed``: the owner's permissions."""
        name = name.strip()
        if not name or len(name) > MAX_TOKEN_NAME_CHARS:
            raise BadInputError(f"give the token a name of 1-{MAX_TOKEN_NAME_CHARS} characters")
        wanted = parse_permissions([str(s) for s in scopes])
        if not wanted:
            raise BadInputError("choose at least one scope for the token")
        beyond = wanted - allowed
        if beyond:
            raise BadInputError(
                f"your role does not allow the scope(s) {', '.join(sorted(beyond))}"
            )
        if not 1 <= ttl_days <= MAX_TTL_DAYS:
            raise BadInputError(f"a token lives 1-{MAX_TTL_DAYS} days; got {ttl_days}")
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        now = self._clock()
        token = Token(
            token_id=token_id,
            username=username,
            name=name,
            scopes=wanted,
            created_at=now,
            expires_at=now + timedelta(days=ttl_days),
            revoked_at=None,
            secret_sha256=_digest(secret),
        )
        self._change(lambda _: token)
        return token, f"{TOKEN_PREFIX}{token_id}_{secret}"

    def authenticate(self, presented: str) -> Token | None:
        """The active token ``presented`` names, or None (malformed, unknown, wrong, revoked,
        expired: one answer for all)."""
        match = TOKEN_FORMAT.fullmatch(presented or "")
        if match is None:
            return None
        token = self._find(match.group(1))
        if token is None:
            return None
        if not hmac.compare_digest(token.secret_sha256, _digest(match.group(2))):
            return None
        return token if token.active(self._clock()) else None

    def revoke(self, token_id: str) -> Token:
        def mark(tokens: dict[str, Token]) -> Token:
            if token_id not in tokens:
                raise TokenNotFoundError(f"no API token with id {token_id!r}")
            token = tokens[token_id]
            return token if token.revoked_at else replace(token, revoked_at=self._clock())

        return self._change(mark)
