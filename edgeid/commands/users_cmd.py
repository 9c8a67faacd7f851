"""`edgeid users ...`: local users and API tokens from the command line (recovery, scripts).

Every change is recorded in the audit log, which one process writes at a time: stop
`edgeid serve` first (the web UI's Users page does the same while the service runs).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgeid.cli import EXIT_OK, emit
from edgeid.options import Subparsers, positive_int
from runtime.accounts.roles import Permission, Role, permissions_of
from runtime.accounts.sealing import AccountsKey, accounts_key, existing_accounts_key
from runtime.accounts.tokens import DEFAULT_TTL_DAYS, TokenStore
from runtime.accounts.users import User, UserStore
from runtime.audit import AuditAction, AuditEvent, AuditLog
from runtime.audit.actor import os_actor
from runtime.config.settings import load_settings
from runtime.errors import BadInputError
from runtime.gallery.store import GalleryStore
from runtime.vault.key_choice import keyring_path, provider_for
from runtime.vault.keys import Keyring


class Recorder:
    """Appends the command's changes to the audit log, as the OS user (``os:<login>``)."""

    def __init__(self, log: AuditLog, galleries: list[str], accounts: AccountsKey) -> None:
        self.log = log
        self.galleries = galleries
        self.accounts = accounts  # the key the users and tokens files are sealed under

    def __call__(self, action: AuditAction, detail: str, *, gallery: str | None = None) -> None:
        actor = os_actor()
        self.log.append(
            AuditEvent(
                user=actor.user, role=actor.role, action=action, gallery=gallery, detail=detail
            )
        )


@contextmanager
def audited(home: Path) -> Iterator[Recorder]:
    """The galleries' keyring opens the audit log and the accounts files; both locks are held
    for the command."""
    settings = load_settings(home)
    with (
        GalleryStore(home, provider_for(home, settings.keys)) as store,
        AuditLog.open(home, store.keyring) as log,
    ):
        galleries = [g.name for g in store.list_galleries()]
        yield Recorder(log, galleries, accounts_key(store.keyring))


def reading_key(home: Path) -> AccountsKey:
    """The accounts key for a command that only reads, which may run beside the service: the
    keyring is only read (the service made the key when it started). A box upgraded from a
    version without the key gets it here, under the galleries' lock."""
    settings = load_settings(home)
    ring = Keyring.open(keyring_path(home), provider_for(home, settings.keys))
    key = existing_accounts_key(ring)
    if key is not None:
        return key
    with GalleryStore(home, provider_for(home, settings.keys)) as store:
        return accounts_key(store.keyring)


def _check_galleries(names: list[str], known: list[str]) -> list[str]:
    for name in names:
        if name not in known:
            raise BadInputError(
                f"there is no gallery named {name!r}; list them with edgeid gallery list"
            )
    return names


def _user_json(user: User) -> dict[str, object]:
    return user.public()


def _user_line(user: User) -> str:
    state = (
        "disabled"
        if user.disabled
        else "must change password"
        if user.must_change_password
        else "active"
    )
    return f"{user.username}\t{user.role.value}\t{','.join(user.galleries) or '-'}\t{state}"


def list_users(args: argparse.Namespace) -> int:
    users = UserStore(args.home_dir, reading_key(args.home_dir)).list()
    emit(
        args, [_user_json(u) for u in users], "\n".join(_user_line(u) for u in users) or "no users"
    )
    return EXIT_OK


def add_user(args: argparse.Namespace) -> int:
    with audited(args.home_dir) as record:
        galleries = _check_galleries(args.gallery or [], record.galleries)
        user, password = UserStore(args.home_dir, record.accounts).create(
            args.name, args.role, galleries=galleries
        )
        names = ", ".join(galleries) or "none"
        record(
            AuditAction.USER_CREATED,
            f"user {user.username}; role {user.role.value}; galleries {names}",
        )
    emit(
        args,
        {"user": _user_json(user), "one_time_password": password},
        f"created {user.username} ({user.role.value}); one-time password (shown once, must be "
        f"changed at first sign-in): {password}",
    )
    return EXIT_OK


def reset_password(args: argparse.Namespace) -> int:
    with audited(args.home_dir) as record:
        user, password = UserStore(args.home_dir, record.accounts).reset_password(args.name)
        record(AuditAction.PASSWORD_CHANGED, f"user {user.username}; reset to a one-time password")
    emit(
        args,
        {"user": _user_json(user), "one_time_password": password},
        f"new one-time password for {user.username} (shown once): {password}",
    )
    return EXIT_OK


def set_user(args: argparse.Namespace) -> int:
    disabled = True if args.disable else False if args.enable else None
    with audited(args.home_dir) as record:
        store = UserStore(args.home_dir, record.accounts)
        before = store.require(args.name)
        galleries = None
        if args.no_galleries:
            galleries = []
        elif args.gallery:
            galleries = _check_galleries(args.gallery, record.galleries)
        after = store.update(args.name, role=args.role, galleries=galleries, disabled=disabled)
        changes = []
        if after.role is not before.role:
            changes.append(f"role {before.role.value} -> {after.role.value}")
        if after.galleries != before.galleries:
            changes.append(f"galleries {', '.join(after.galleries) or 'none'}")
        if after.disabled != before.disabled:
            changes.append("disabled" if after.disabled else "enabled")
        if changes:
            action = (
                AuditAction.USER_DELETED
                if after.disabled and not before.disabled
                else AuditAction.ROLE_CHANGED
            )
            record(action, f"user {after.username}; " + "; ".join(changes))
    emit(args, _user_json(after), _user_line(after))
    return EXIT_OK


def list_tokens(args: argparse.Namespace) -> int:
    tokens = TokenStore(args.home_dir, reading_key(args.home_dir)).list(args.name)
    lines = [
        f"{t.token_id}\t{t.username}\t{t.name}\t{' '.join(sorted(t.scopes))}\t"
        f"{'revoked' if t.revoked_at else 'expires ' + t.expires_at.date().isoformat()}"
        for t in tokens
    ]
    emit(args, [t.public() for t in tokens], "\n".join(lines) or "no tokens")
    return EXIT_OK


def add_token(args: argparse.Namespace) -> int:
    with audited(args.home_dir) as record:
        user = UserStore(args.home_dir, record.accounts).require(args.name)
        token, secret = TokenStore(args.home_dir, record.accounts).create(
            user.username,
            args.token_name,
            args.scope,
            allowed=permissions_of(user.role),
            ttl_days=args.days,
        )
        record(
            AuditAction.TOKEN_CREATED,
            f"token {token.token_id} for {user.username}; scopes {' '.join(sorted(token.scopes))}",
        )
    emit(
        args,
        {"token": token.public(), "secret": secret},
        f"token {token.token_id} for {user.username} (shown once): {secret}",
    )
    return EXIT_OK


def revoke_token(args: argparse.Namespace) -> int:
    with audited(args.home_dir) as record:
        token = TokenStore(args.home_dir, record.accounts).revoke(args.token_id)
        record(AuditAction.TOKEN_REVOKED, f"token {token.token_id} of {token.username}")
    emit(args, token.public(), f"revoked token {token.token_id} of {token.username}")
    return EXIT_OK


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    users = sub.add_parser("users", help="local users and API tokens (stop edgeid serve first)")
    actions = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    roles = [r.value for r in Role]

    show = actions.add_parser("list", parents=[common], help="every user, role and gallery")
    show.set_defaults(handler=list_users)

    add = actions.add_parser("add", parents=[common], help="a new user with a one-time password")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=roles)
    add.add_argument("--gallery", action="append", help="a gallery they may use (repeat)")
    add.set_defaults(handler=add_user)

    reset = actions.add_parser(
        "reset-password", parents=[common], help="a new one-time password for a user"
    )
    reset.add_argument("name")
    reset.set_defaults(handler=reset_password)

    edit = actions.add_parser("set", parents=[common], help="change role, galleries, or disable")
    edit.add_argument("name")
    edit.add_argument("--role", choices=roles)
    group = edit.add_mutually_exclusive_group()
    group.add_argument("--gallery", action="append", help="replace their galleries (repeat)")
    group.add_argument("--no-galleries", action="store_true", help="take every gallery away")
    state = edit.add_mutually_exclusive_group()
    state.add_argument("--disable", action="store_true", help="no sign-in, tokens stop working")
    state.add_argument("--enable", action="store_true")
    edit.set_defaults(handler=set_user)

    tokens = actions.add_parser("tokens", parents=[common], help="API tokens (of one user)")
    tokens.add_argument("name", nargs="?")
    tokens.set_defaults(handler=list_tokens)

    token_add = actions.add_parser(
        "token-add", parents=[common], help="an API token for a user (shown once)"
    )
    token_add.add_argument("name", help="the user the token acts as")
    token_add.add_argument("--token-name", required=True, help="what the token is for")
    token_add.add_argument(
        "--scope",
        action="append",
        required=True,
        choices=[p.value for p in Permission],
        help="repeat for each scope; only those the user's role holds",
    )
    token_add.add_argument("--days", type=positive_int, default=DEFAULT_TTL_DAYS)
    token_add.set_defaults(handler=add_token)

    token_revoke = actions.add_parser("token-revoke", parents=[common], help="revoke a token")
    token_revoke.add_argument("token_id")
    token_revoke.set_defaults(handler=revoke_token)
