"""Who is asking: a signed-in person (browser session) or an API token, with what it may do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgeid.runtime.accounts.roles import GALLERY_SCOPED, Permission, Role
from edgeid.runtime.accounts.sessions import Session
from edgeid.runtime.audit.actor import Actor


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

    @property
    def actor(self) -> Actor:
        """As the audit log names them; API calls name their token, so a leaked token's use
        can be traced and revoked."""
        via = f"API token {self.token_id}" if self.via == "token" else None
        return Actor(self.username, self.role.value, via)

    @property
    def session_key(self) -> str:
        return self.owner

    def may(self, permission: Permission) -> bool:
        return permission in self.permissions

    def may_use_gallery(self, permission: Permission, gallery: str) -> bool:
        if permission not in self.permissions:
            return False
        return permission not in GALLERY_SCOPED or gallery in self.galleries
