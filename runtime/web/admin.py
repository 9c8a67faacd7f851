"""What an admin does to users and galleries, shared by the pages and the API, each change
recorded in the audit log (by the acting admin, naming the user changed)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from runtime.accounts.roles import Role, parse_role
from runtime.accounts.users import User
from runtime.audit import AuditAction
from runtime.errors import BadInputError
from runtime.gallery.records import GalleryInfo
from runtime.web.audit_trail import record
from runtime.web.errors import NotFoundError
from runtime.web.principal import Principal
from runtime.web.state import WebState

# Gallery names appear in page paths and API URLs: no slashes or other characters that would
# need more than percent-encoding of a space.
GALLERY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")


def _known_galleries(state: WebState, names: Sequence[str]) -> list[str]:
    existing = {g.name for g in state.galleries.list_galleries()}
    for name in names:
        if name not in existing:
            raise NotFoundError(f"there is no gallery named {name!r}")
    return list(names)


def create_user(
    state: WebState, principal: Principal, username: str, role: str, galleries: Sequence[str]
) -> tuple[User, str]:
    role_value = parse_role(role)
    user, password = state.users.create(
        username, role_value, galleries=_known_galleries(state, galleries)
    )
    record(
        state,
        principal,
        AuditAction.USER_CREATED,
        detail=f"user {user.username}; role {user.role.value}; galleries {_names(user)}",
    )
    return user, password


def update_user(
    state: WebState,
    principal: Principal,
    username: str,
    *,
    role: str | None = None,
    galleries: Sequence[str] | None = None,
    disabled: bool | None = None,
) -> User:
    before = state.users.require(username)
    new_role: Role | None = parse_role(role) if role else None
    names = _known_galleries(state, galleries) if galleries is not None else None
    after = state.users.update(username, role=new_role, galleries=names, disabled=disabled)
    changes = []
    if after.role is not before.role:
        changes.append(f"role {before.role.value} -> {after.role.value}")
    if after.galleries != before.galleries:
        changes.append(f"galleries {_names(before)} -> {_names(after)}")
    if after.disabled != before.disabled:
        changes.append("disabled" if after.disabled else "enabled")
    if not changes:
        return after
    if after.disabled and not before.disabled:
        state.sessions.end_user(username)
    # The log has no action for "access changed"; role_changed covers role, galleries and
    # enabling, user_deleted covers disabling (users are never removed, see accounts/users.py).
    action = (
        AuditAction.USER_DELETED
        if after.disabled and not before.disabled
        else AuditAction.ROLE_CHANGED
    )
    record(state, principal, action, detail=f"user {username}; " + "; ".join(changes))
    return after


def reset_password(state: WebState, principal: Principal, username: str) -> str:
    _, password = state.users.reset_password(username)
    state.sessions.end_user(username)
    record(
        state,
        principal,
        AuditAction.PASSWORD_CHANGED,
        detail=f"user {username}; reset by an admin to a one-time password",
    )
    return password


def create_gallery(
    state: WebState, principal: Principal, name: str, description: str
) -> GalleryInfo:
    name = name.strip()
    if not GALLERY_NAME.fullmatch(name):
        raise BadInputError(
            "a gallery name is 1-64 letters, digits, spaces, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    info = state.galleries.create_gallery(name, description.strip())
    record(state, principal, AuditAction.GALLERY_CREATED, gallery=info.name)
    return info


def delete_gallery(state: WebState, principal: Principal, name: str) -> None:
    """Erase a gallery and take it off every user's list (a later gallery of the same name
    must not inherit the old one's readers)."""
    state.galleries.gallery(name)  # a missing gallery is refused before anything is recorded
    record(state, principal, AuditAction.GALLERY_DELETED, gallery=name)
    state.galleries.delete_gallery(name)
    for user in state.users.list():
        if name in user.galleries:
            state.users.update(user.username, galleries=[g for g in user.galleries if g != name])


def _names(user: User) -> str:
    return ", ".join(user.galleries) or "none"
