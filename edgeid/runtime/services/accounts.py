"""User administration through the accountable layer: the web's Users pages, ``/api/v1/users``
and ``edgeid users`` all change users here, each change recorded under its own label.

Rules held here, whatever the door: changing users needs ``Permission.USERS``; nobody changes
their own role or grants themselves a gallery (refused and recorded as ``access_denied``);
making an admin and granting gallery access need a ``Consent`` from the two-person rule
(``edgeid.runtime.services.approvals``). Taking access away, disabling, enabling, password resets
and tokens need no second person: they narrow access or hand nothing new to the admin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from edgeid.runtime.accounts.roles import Permission, Role, parse_role, permissions_of
from edgeid.runtime.accounts.throttle import LoginThrottle
from edgeid.runtime.accounts.tokens import Token, TokenNotFoundError, TokenStore
from edgeid.runtime.accounts.users import User, UserExistsError, UserStore, check_username
from edgeid.runtime.audit.events import AuditAction
from edgeid.runtime.audit.recorder import Recorder
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.services.caller import Caller, same_person
from edgeid.runtime.services.consent import ChangeKind, Consent, redeem

MAX_GALLERY_FIELD_CHARS = 200  # the audit log's limit for its gallery field


def _names(galleries: Iterable[str]) -> str:
    return ", ".join(galleries) or "none"


def _gallery_field(galleries: Sequence[str]) -> str:
    """The record's gallery field (bounded; the detail lists them all)."""
    joined = ", ".join(galleries)
    return joined if len(joined) <= MAX_GALLERY_FIELD_CHARS else f"{len(galleries)} galleries"


def _with(detail: str, consent: Consent | None) -> str:
    return f"{detail}; {consent.detail()}" if consent else detail


class AccountAdmin:
    """See the module docstring. ``gallery_names`` lists the box's galleries (a grant of one
    that does not exist is refused); ``end_sessions`` signs a user out everywhere (the web's
    sessions; nothing at the CLI); ``throttle`` is the service's sign-in throttle (none at the
    CLI: it lives in the service's memory)."""

    def __init__(
        self,
        users: UserStore,
        tokens: TokenStore,
        recorder: Recorder,
        *,
        gallery_names: Callable[[], Iterable[str]],
        end_sessions: Callable[[str], object] = lambda username: None,
        throttle: LoginThrottle | None = None,
    ) -> None:
        self.users = users
        self.tokens = tokens
        self.recorder = recorder
        self._gallery_names = gallery_names
        self._end_sessions = end_sessions
        self.throttle = throttle

    # -- checks ------------------------------------------------------------------------------

    def require(self, caller: Caller, *, where: str, resource: str | None = None) -> None:
        if caller.may(Permission.USERS):
            return
        raise self.recorder.refused(
            caller.actor,
            "only admins change users (needs users)",
            where=where,
            resource=resource,
            why="needs users",
        )

    def _allowed(
        self, caller: Caller, consent: Consent | None, *, where: str, resource: str
    ) -> None:
        """An approved consent carries the proposer's permission (checked when they proposed);
        the approver needs only the right to approve."""
        if consent is None or not consent.approved:
            self.require(caller, where=where, resource=resource)

    def refuse_self(
        self,
        caller: Caller,
        username: str,
        *,
        what: str,
        where: str,
        consent: Consent | None = None,
    ) -> None:
        """Nobody changes their own access: neither the caller nor anyone who agreed to it."""
        people = (caller.actor.user, *(consent.people() if consent else ()))
        if not any(same_person(p, username) for p in people):
            return
        raise self.recorder.refused(
            caller.actor,
            f"nobody may {what} for themselves; ask another admin",
            where=where,
            resource=f"user {username}",
            why=f"{what} for oneself",
        )

    def known_galleries(self, names: Sequence[str]) -> list[str]:
        existing = set(self._gallery_names())
        for name in names:
            if name not in existing:
                raise BadInputError(
                    f"there is no gallery named {name!r}; list them with edgeid gallery list"
                )
        return list(dict.fromkeys(names))

    def check_new(self, username: str) -> None:
        check_username(username)
        if self.users.get(username) is not None:
            raise UserExistsError(f"a user named {username!r} exists; choose another name")

    # -- users -------------------------------------------------------------------------------

    def create_user(
        self,
        caller: Caller,
        username: str,
        role: Role | str,
        *,
        where: str,
        consent: Consent | None = None,
    ) -> tuple[User, str]:
        """A user without galleries and a one-time password (returned once, never stored).
        An admin needs a consent; galleries are granted afterwards (``grant_galleries``)."""
        role = parse_role(role) if isinstance(role, str) else role
        self._allowed(caller, consent, where=where, resource=f"user {username}")
        self.check_new(username)
        if role is Role.ADMIN:
            redeem(consent, ChangeKind.CREATE_ADMIN, username, what="creating an admin")
        user, password = self.users.create(username, role)
        try:
            self.recorder.record(
                caller.actor,
                AuditAction.USER_CREATED,
                detail=_with(f"user {user.username}; role {role.value}", consent),
            )
        except BaseException:
            self.users.update(username, disabled=True)  # users are never removed: disable
            raise
        return user, password

    def change_role(
        self,
        caller: Caller,
        username: str,
        role: Role | str,
        *,
        where: str,
        consent: Consent | None = None,
    ) -> User:
        role = parse_role(role) if isinstance(role, str) else role
        self._allowed(caller, consent, where=where, resource=f"user {username}")
        before = self.users.require(username)
        if before.role is role:
            return before
        self.refuse_self(caller, username, what="change the role", where=where, consent=consent)
        if role is Role.ADMIN:
            redeem(consent, ChangeKind.PROMOTE_ADMIN, username, what="making an admin")
        after = self.users.update(username, role=role)
        self.recorder.record(
            caller.actor,
            AuditAction.ROLE_CHANGED,
            detail=_with(f"user {username}; role {before.role.value} -> {role.value}", consent),
        )
        return after

    def grant_galleries(
        self,
        caller: Caller,
        username: str,
        galleries: Sequence[str],
        *,
        where: str,
        consent: Consent | None = None,
    ) -> User:
        """Add galleries to a user's list (widens access: needs a consent)."""
        self._allowed(caller, consent, where=where, resource=f"user {username}")
        before = self.users.require(username)
        added = [g for g in self.known_galleries(galleries) if g not in before.galleries]
        if not added:
            return before
        self.refuse_self(
            caller, username, what="grant gallery access", where=where, consent=consent
        )
        redeem(
            consent,
            ChangeKind.GRANT_GALLERIES,
            username,
            galleries=added,
            what="granting gallery access",
        )
        after = self.users.update(username, galleries=[*before.galleries, *added])
        self.recorder.record(
            caller.actor,
            AuditAction.GALLERY_ACCESS_CHANGED,
            gallery=_gallery_field(added),
            detail=_with(f"user {username}; added {_names(added)}", consent),
        )
        return after

    def revoke_galleries(
        self, caller: Caller, username: str, galleries: Sequence[str], *, where: str
    ) -> User:
        """Take galleries off a user's list (narrows access: at once)."""
        self.require(caller, where=where, resource=f"user {username}")
        before = self.users.require(username)
        removed = [g for g in dict.fromkeys(galleries) if g in before.galleries]
        if not removed:
            return before
        after = self.users.update(
            username, galleries=[g for g in before.galleries if g not in removed]
        )
        self.recorder.record(
            caller.actor,
            AuditAction.GALLERY_ACCESS_CHANGED,
            gallery=_gallery_field(removed),
            detail=f"user {username}; removed {_names(removed)}",
        )
        return after

    def forget_gallery(self, name: str) -> None:
        """Take an erased gallery off every list, so that a later gallery of the same name does
        not inherit its readers (the erasure's own record covers this)."""
        for user in self.users.list():
            if name in user.galleries:
                self.users.update(user.username, galleries=[g for g in user.galleries if g != name])

    def disable(self, caller: Caller, username: str, *, where: str) -> User:
        """No sign-in, tokens stop working, every session ends. Users are never removed, so
        that the audit log's names keep meaning someone."""
        self.require(caller, where=where, resource=f"user {username}")
        before = self.users.require(username)
        if before.disabled:
            return before
        after = self.users.update(username, disabled=True)
        self._end_sessions(username)
        self.recorder.record(caller.actor, AuditAction.USER_DISABLED, detail=f"user {username}")
        return after

    def enable(self, caller: Caller, username: str, *, where: str) -> User:
        self.require(caller, where=where, resource=f"user {username}")
        before = self.users.require(username)
        if not before.disabled:
            return before
        after = self.users.update(username, disabled=False)
        self.recorder.record(caller.actor, AuditAction.USER_ENABLED, detail=f"user {username}")
        return after

    def reset_password(self, caller: Caller, username: str, *, where: str) -> str:
        """A new one-time password (returned once); the user's sessions end."""
        self.require(caller, where=where, resource=f"user {username}")
        user, password = self.users.reset_password(username)
        self._end_sessions(username)
        self.recorder.record(
            caller.actor,
            AuditAction.PASSWORD_CHANGED,
            detail=f"user {user.username}; reset by an admin to a one-time password",
        )
        return password

    def clear_lock(self, caller: Caller, username: str, *, where: str) -> int:
        """Clear the sign-in delays of a user's account, from every address (an admin's doing,
        for a person slowed by someone else's guesses); how many were cleared. Recorded even
        when none was, so the admin's intervention is on the record."""
        self.require(caller, where=where, resource=f"user {username}")
        user = self.users.require(username)
        if self.throttle is None:
            raise BadInputError(
                "sign-in delays live in the running service; clear them on its Users page"
            )
        cleared = self.throttle.clear(user.username)
        self.recorder.record(
            caller.actor,
            AuditAction.LOCK_CLEARED,
            detail=f"user {user.username}; {cleared} sign-in delay(s) cleared",
        )
        return cleared

    # -- tokens ------------------------------------------------------------------------------

    def create_token(
        self,
        caller: Caller,
        username: str,
        name: str,
        scopes: Sequence[str],
        *,
        ttl_days: int,
        where: str,
    ) -> tuple[Token, str]:
        """An API token for ``username`` (the caller's own, or an admin's doing); its scopes
        stay within the owner's role. The secret is returned once."""
        if caller.actor.user != username:
            self.require(caller, where=where, resource=f"user {username}")
        user = self.users.require(username)
        token, secret = self.tokens.create(
            user.username, name, scopes, allowed=permissions_of(user.role), ttl_days=ttl_days
        )
        try:
            self.recorder.record(
                caller.actor,
                AuditAction.TOKEN_CREATED,
                detail=f"token {token.token_id} for {user.username}; scopes "
                + " ".join(sorted(token.scopes)),
            )
        except BaseException:
            self.tokens.revoke(token.token_id)
            raise
        return token, secret

    def revoke_token(self, caller: Caller, token_id: str, *, where: str) -> Token:
        """The owner's or an admin's doing; to anyone else the token does not exist."""
        token = self.tokens.get(token_id)
        if token.username != caller.actor.user and not caller.may(Permission.USERS):
            self.recorder.denied(
                caller.actor, where=where, resource=f"token {token_id}", why="another's token"
            )
            raise TokenNotFoundError(f"no API token with id {token_id!r} among yours")
        revoked = self.tokens.revoke(token_id)
        self.recorder.record(
            caller.actor,
            AuditAction.TOKEN_REVOKED,
            detail=f"token {token_id} of {token.username}",
        )
        return revoked
