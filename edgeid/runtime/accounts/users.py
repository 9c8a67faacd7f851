"""Local users: ``<home>/accounts/users.json`` with argon2id hashes, roles and galleries,
sealed under the keyring's ``accounts`` scope (see ``sealing.py``).

A new user (and the first admin that ``edgeid init`` makes) gets a one-time password that
must be changed at first login. Users are disabled, never deleted, so that the audit log's
names keep meaning someone; the last enabled admin cannot be disabled or demoted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from edgeid.runtime.accounts.files import AccountsFileError, SealedFile, accounts_dir, locked
from edgeid.runtime.accounts.passwords import (
    PasswordRuleError,
    check_new_password,
    hash_password,
    needs_rehash,
    one_time_password,
    verify_password,
)
from edgeid.runtime.accounts.roles import Permission, Role, parse_role, permissions_of
from edgeid.runtime.accounts.sealing import AccountsKey
from edgeid.runtime.compat import UTC
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.vault.crypto import RandomSource, system_random

logger = logging.getLogger(__name__)

USERS_FILE = "users.json"
USERNAME = re.compile(r"[a-z][a-z0-9._-]{1,31}")
MAX_GALLERIES_PER_USER = 256  # more than any office holds; bounds the file and the pages
MAX_GALLERY_NAME_CHARS = 200

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class UserNotFoundError(BadInputError):
    """No user of that name."""


class UserExistsError(BadInputError):
    """A user of that name exists already."""


@dataclass(frozen=True)
class User:
    username: str
    role: Role
    password_hash: str
    must_change_password: bool
    galleries: tuple[str, ...]  # the galleries this user may search and enrol into
    disabled: bool
    created_at: datetime
    password_changed_at: datetime

    @property
    def permissions(self) -> frozenset[Permission]:
        return frozenset() if self.disabled else permissions_of(self.role)

    def to_json(self) -> dict[str, Any]:
        return {
            "username": self.username,
            "role": self.role.value,
            "password_hash": self.password_hash,
            "must_change_password": self.must_change_password,
            "galleries": list(self.galleries),
            "disabled": self.disabled,
            "created_at": self.created_at.isoformat(),
            "password_changed_at": self.password_changed_at.isoformat(),
        }

    def public(self) -> dict[str, Any]:
        """What pages and the API show: everything but the hash."""
        out = self.to_json()
        del out["password_hash"]
        return out


def _user_from(item: dict[str, Any], where: Path) -> User:
    try:
        return User(
            username=str(item["username"]),
            role=Role(item["role"]),
            password_hash=str(item["password_hash"]),
            must_change_password=bool(item["must_change_password"]),
            galleries=tuple(str(g) for g in item["galleries"]),
            disabled=bool(item["disabled"]),
            created_at=datetime.fromisoformat(item["created_at"]),
            password_changed_at=datetime.fromisoformat(item["password_changed_at"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AccountsFileError(
            f"{where} holds a malformed user entry; restore it from a backup"
        ) from exc


def check_username(username: str) -> str:
    if not isinstance(username, str) or not USERNAME.fullmatch(username):
        raise BadInputError(
            f"user name {username!r} is not allowed; use 2-32 lower-case letters, digits, "
            "'.', '_' or '-', starting with a letter"
        )
    return username


def check_galleries(galleries: Iterable[str]) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(g.strip() for g in galleries if g.strip()))
    if len(names) > MAX_GALLERIES_PER_USER:
        raise BadInputError(f"more than {MAX_GALLERIES_PER_USER} galleries for one user")
    for name in names:
        if len(name) > MAX_GALLERY_NAME_CHARS:
            raise BadInputError(f"a gallery name is longer than {MAX_GALLERY_NAME_CHARS} chars")
    return names


class UserStore:
    """The box's users; safe to share between threads and with the CLI in another process.

    ``key``: the accounts key from the keyring (``sealing.accounts_key``).
    """

    def __init__(
        self,
        home: Path,
        key: AccountsKey,
        *,
        clock: Clock = _utc_now,
        random: RandomSource = system_random,
    ) -> None:
        self.directory = accounts_dir(home)
        self.path = self.directory / USERS_FILE
        self._clock = clock
        self._file = SealedFile(self.path, "users", "username", key, random=random)

    # -- reading -----------------------------------------------------------------------------

    def _users(self) -> dict[str, User]:
        users = (_user_from(item, self.path) for item in self._file.items())
        return {u.username: u for u in users}

    def list(self) -> list[User]:
        return sorted(self._users().values(), key=lambda u: u.username)

    def get(self, username: str) -> User | None:
        """The user of that name; found by its keyed hash, opening no other user's entry."""
        item = self._file.find(username)
        return None if item is None else _user_from(item, self.path)

    def require(self, username: str) -> User:
        user = self.get(username)
        if user is None:
            raise UserNotFoundError(f"no user named {username!r}; list them with edgeid users")
        return user

    def count(self) -> int:
        return len(self._users())

    # -- changing ------------------------------------------------------------------------------

    def _change(self, change: Callable[[dict[str, User]], User]) -> User:
        """Apply ``change`` to the freshest users under the cross-process lock, then write."""
        with locked(self.directory):
            self._file.reread()  # whatever is on disk now
            users = self._users()
            result = change(users)
            users[result.username] = result
            self._file.write({name: u.to_json() for name, u in users.items()})
            return result

    def create(
        self, username: str, role: Role | str, *, galleries: Iterable[str] = ()
    ) -> tuple[User, str]:
        """A new user with a one-time password, which is returned (and never stored)."""
        check_username(username)
        role = parse_role(role) if isinstance(role, str) else role
        names = check_galleries(galleries)
        password = one_time_password()
        hashed = hash_password(password)

        def add(users: dict[str, User]) -> User:
            if username in users:
                raise UserExistsError(f"a user named {username!r} exists; choose another name")
            now = self._clock()
            return User(username, role, hashed, True, names, False, now, now)

        user = self._change(add)
        logger.info("created a user with the role %s", role.value)  # names stay out of logs
        return user, password

    def authenticate(self, username: str, password: str) -> User | None:
        """The user when the password is right and the user is enabled, else None.

        Takes the same time whether or not the user exists.
        """
        user = self.get(username) if USERNAME.fullmatch(username or "") else None
        ok = verify_password(user.password_hash if user else None, password)
        if not ok or user is None or user.disabled:
            return None
        if needs_rehash(user.password_hash):
            new_hash = hash_password(password)
            user = self._change(lambda users: replace(users[username], password_hash=new_hash))
        return user

    def change_password(self, username: str, old: str, new: str) -> User:
        user = self.authenticate(username, old)
        if user is None:
            raise PasswordRuleError("the current password is wrong; type it again")
        check_new_password(new, username=username)
        if new == old:
            raise PasswordRuleError("the new password is the same as the current one")
        new_hash = hash_password(new)
        return self._change(
            lambda users: replace(
                users[username],
                password_hash=new_hash,
                must_change_password=False,
                password_changed_at=self._clock(),
            )
        )

    def reset_password(self, username: str) -> tuple[User, str]:
        """A new one-time password for a user who forgot theirs (returned, never stored)."""
        self.require(username)
        password = one_time_password()
        new_hash = hash_password(password)
        user = self._change(
            lambda users: replace(
                users[username],
                password_hash=new_hash,
                must_change_password=True,
                password_changed_at=self._clock(),
            )
        )
        return user, password

    def update(
        self,
        username: str,
        *,
        role: Role | str | None = None,
        galleries: Iterable[str] | None = None,
        disabled: bool | None = None,
    ) -> User:
        new_role = parse_role(role) if isinstance(role, str) else role
        names = check_galleries(galleries) if galleries is not None else None

        def edit(users: dict[str, User]) -> User:
            if username not in users:
                raise UserNotFoundError(f"no user named {username!r}")
            user = users[username]
            updated = replace(
                user,
                role=new_role if new_role is not None else user.role,
                galleries=names if names is not None else user.galleries,
                disabled=disabled if disabled is not None else user.disabled,
            )
            was_admin = user.role is Role.ADMIN and not user.disabled
            still_admin = updated.role is Role.ADMIN and not updated.disabled
            others = [
                u
                for u in users.values()
                if u.username != username and u.role is Role.ADMIN and not u.disabled
            ]
            if was_admin and not still_admin and not others:
                raise BadInputError("that would leave no enabled admin; make another admin first")
            return updated

        return self._change(edit)
