"""The first admin: made once, when the box has no user, with a one-time password that must
be changed at first sign-in. One step for `edgeid provision init` and `edgeid init` alike.

It opens the galleries' keyring (taking its writer lock: the service must be stopped), which
seals the accounts files, and records the creation in the audit log as ``os:<login>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeid.runtime.accounts.roles import Role
from edgeid.runtime.accounts.sealing import accounts_key
from edgeid.runtime.accounts.users import UserStore, check_username
from edgeid.runtime.audit import AuditAction, AuditEvent, AuditLog
from edgeid.runtime.audit.actor import os_actor
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.vault.key_choice import provider_for

DEFAULT_ADMIN = "admin"


@dataclass(frozen=True)
class FirstAdmin:
    username: str | None  # None: users existed already, nobody was made
    one_time_password: str | None  # shown once, never stored in clear


def ensure_first_admin(
    home: Path, username: str = DEFAULT_ADMIN, *, passphrase: str | None = None
) -> FirstAdmin:
    """Make ``username`` an admin with a one-time password if the box has no user yet."""
    check_username(username)
    settings = load_settings(home)
    with (
        GalleryStore(home, provider_for(home, settings.keys, passphrase=passphrase)) as store,
        AuditLog.open(home, store.keyring) as log,  # creates the log on first use
    ):
        users = UserStore(home, accounts_key(store.keyring))
        if users.count():
            return FirstAdmin(None, None)
        admin, password = users.create(username, Role.ADMIN)
        actor = os_actor()
        log.append(
            AuditEvent(
                user=actor.user,
                role=actor.role,
                action=AuditAction.USER_CREATED,
                detail=f"user {admin.username}; role admin; first admin",
            )
        )
    return FirstAdmin(admin.username, password)
