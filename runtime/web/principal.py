"""Who is asking: a signed-in person (browser session) or an API token, with what it may do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from runtime.accounts.roles import GALLERY_SCOPED, Permission, Role
from runtime.accounts.sessions import Session


@dataclass(frozen=True)
class Principal:
    username: str
    role: Role
    permissions: frozenset[Permission]
    galleries: tuple[str, ...]  # the galleries this user may search, enrol into and read
    via: Literal["session", "token"]
    owner: str  # names this session or token to the in-memory workspace
    session: Session | None = None
    token_id: str | None = None

    def may(self, permission: Permission) -> bool:
        return permission in self.permissions

    def may_use_gallery(self, permission: Permission, gallery: str) -> bool:
        if permission not in self.permissions:
            return False
        return permission not in GALLERY_SCOPED or gallery in self.galleries
