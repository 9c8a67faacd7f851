"""Who is calling a service, and what they may do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.audit.actor import OS_ACTOR_PREFIX, Actor, os_actor


class Caller(Protocol):
    """A signed-in user or API token (``edgeid.runtime.web.principal.Principal``) or the person at
    the box's shell (``LocalOperator``)."""

    @property
    def actor(self) -> Actor: ...

    @property
    def session_key(self) -> str:
        """Names this browser session, token or command run (what it was shown is kept per
        key, so a thumbnail already revealed on a recorded page is not recorded again)."""
        ...

    def may(self, permission: Permission) -> bool: ...

    def may_use_gallery(self, permission: Permission, gallery: str) -> bool: ...


@dataclass(frozen=True)
class LocalOperator:
    """The person running ``edgeid`` on the box. They hold the key provider and the state
    directory, so access checks would protect nothing; accountability still holds: every
    command is recorded under ``os:<login>`` with the case and reason it was given."""

    actor: Actor

    @classmethod
    def current(cls) -> LocalOperator:
        return cls(os_actor())

    @property
    def session_key(self) -> str:
        return f"cli:{self.actor.user}"

    def may(self, permission: Permission) -> bool:
        return True

    def may_use_gallery(self, permission: Permission, gallery: str) -> bool:
        return True


def same_person(a: str, b: str) -> bool:
    """Two actors' users are one person: ``os:alice`` at the shell is ``alice`` on the web (the
    two-person rule and "nobody grants themselves access" compare people, not accounts)."""
    return a.removeprefix(OS_ACTOR_PREFIX) == b.removeprefix(OS_ACTOR_PREFIX)
