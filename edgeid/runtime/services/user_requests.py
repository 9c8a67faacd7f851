"""What an admin asks for on a user's form (the Users pages, ``/api/v1/users``, ``edgeid
users``), split into what happens at once and what waits for a second person.

Narrowing access (taking galleries away, a role without admin, disabling) happens at once.
Making an admin and adding galleries go through the two-person rule (``approvals.py``); with
dual control on they need a reason, checked before anything changes, so a refused form
changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgeid.runtime.accounts.roles import Role, parse_role
from edgeid.runtime.accounts.users import User
from edgeid.runtime.audit.justification import check_reason
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.services.approvals import Approvals, Outcome
from edgeid.runtime.services.caller import Caller
from edgeid.runtime.services.proposals import Proposal


@dataclass(frozen=True)
class UserChange:
    """The user as they are now (None: a new admin waiting for approval), a one-time password
    when one was made (shown once), and the proposals still waiting."""

    user: User | None
    one_time_password: str | None
    waiting: tuple[Proposal, ...]

    def note(self) -> str:
        """One sentence on what waits, for a page or the CLI ('' when nothing does)."""
        if not self.waiting:
            return ""
        what = "; ".join(f"{p.summary()} (proposal {p.proposal_id})" for p in self.waiting)
        return f"Waiting for a second person's approval: {what}."


def _waiting(outcome: Outcome | None) -> tuple[Proposal, ...]:
    return (outcome.proposal,) if outcome and not outcome.done and outcome.proposal else ()


def create_user(
    approvals: Approvals,
    caller: Caller,
    username: str,
    role: Role | str,
    galleries: Sequence[str],
    *,
    reason: str | None,
    where: str,
) -> UserChange:
    """A new user: at once, with its galleries proposed; an admin only once approved."""
    accounts = approvals.accounts
    accounts.require(caller, where=where, resource=f"user {username}")
    role = parse_role(role) if isinstance(role, str) else role
    accounts.check_new(username)
    names = accounts.known_galleries(galleries)
    if role is Role.ADMIN and names:
        raise BadInputError("admins search no gallery; leave the galleries empty for an admin")
    if approvals.dual_control and (role is Role.ADMIN or names):
        reason = check_reason(reason)
    if role is Role.ADMIN:
        outcome = approvals.create_admin(caller, username, reason=reason, where=where)
        return UserChange(outcome.user, outcome.one_time_password, _waiting(outcome))
    user, password = accounts.create_user(caller, username, role, where=where)
    if not names:
        return UserChange(user, password, ())
    granted = approvals.grant_galleries(caller, username, names, reason=reason, where=where)
    now = accounts.users.require(username)
    return UserChange(now, password, _waiting(granted))


def update_user(
    approvals: Approvals,
    caller: Caller,
    username: str,
    *,
    role: Role | str | None = None,
    galleries: Sequence[str] | None = None,
    disabled: bool | None = None,
    reason: str | None = None,
    where: str,
) -> UserChange:
    """Apply a user form: what narrows access at once, what widens it through approvals."""
    accounts = approvals.accounts
    accounts.require(caller, where=where, resource=f"user {username}")
    before = accounts.users.require(username)
    new_role = (parse_role(role) if isinstance(role, str) else role) if role else None
    names = accounts.known_galleries(galleries) if galleries is not None else None
    added = [g for g in names if g not in before.galleries] if names is not None else []
    removed = [g for g in before.galleries if g not in names] if names is not None else []
    role_changes = new_role is not None and new_role is not before.role
    promote = role_changes and new_role is Role.ADMIN
    if role_changes:
        accounts.refuse_self(caller, username, what="change the role", where=where)
    if added:
        accounts.refuse_self(caller, username, what="grant gallery access", where=where)
    if approvals.dual_control and (added or promote):
        reason = check_reason(reason)
    if removed:
        accounts.revoke_galleries(caller, username, removed, where=where)
    if role_changes and not promote and new_role is not None:
        accounts.change_role(caller, username, new_role, where=where)
    if disabled is True:
        accounts.disable(caller, username, where=where)
    elif disabled is False:
        accounts.enable(caller, username, where=where)
    waiting: tuple[Proposal, ...] = ()
    if promote:
        waiting += _waiting(approvals.promote_admin(caller, username, reason=reason, where=where))
    if added:
        waiting += _waiting(
            approvals.grant_galleries(caller, username, added, reason=reason, where=where)
        )
    return UserChange(accounts.users.require(username), None, waiting)
