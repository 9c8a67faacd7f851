"""Who acts: a signed-in user, an API token's owner, an operating-system user at the CLI, or
the appliance itself. The audit record names the actor; the role says in which capacity."""

from __future__ import annotations

import getpass
from dataclasses import dataclass

OS_ACTOR_PREFIX = "os:"
OS_ROLE = "operator"  # a person at the box's shell: holds the keys, so may do what the CLI does
SYSTEM_ACTOR = "system"


@dataclass(frozen=True)
class Actor:
    """``user``: a user name, ``os:<login>`` or ``system``; ``via``: how they came (an API
    token's id), added to the record so a leaked token's use can be traced."""

    user: str
    role: str
    via: str | None = None


def os_login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def os_actor() -> Actor:
    """The person running an ``edgeid`` command, named by their operating-system login."""
    return Actor(f"{OS_ACTOR_PREFIX}{os_login()}", OS_ROLE)


SYSTEM = Actor(SYSTEM_ACTOR, SYSTEM_ACTOR)
