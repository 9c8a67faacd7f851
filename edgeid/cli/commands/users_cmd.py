"""`edgeid users ...`: local users and API tokens from the command line (recovery, scripts).

Every change goes through ``edgeid.runtime.services.accounts`` (as ``os:<login>``) and is recorded
in
the audit log, which one process writes at a time: stop `edgeid serve` first (the web UI's
Users page does the same while the service runs). Making an admin and adding galleries wait
for a second person's approval (`edgeid approvals`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from edgeid.cli import EXIT_OK, emit
from edgeid.cli.commands.approvals_cmd import administration, proposal_json
from edgeid.cli.options import Subparsers, positive_int
from edgeid.runtime.accounts.roles import Permission, Role
from edgeid.runtime.accounts.sealing import AccountsKey, accounts_key, existing_accounts_key
from edgeid.runtime.accounts.tokens import DEFAULT_TTL_DAYS, TokenStore
from edgeid.runtime.accounts.users import User, UserStore
from edgeid.runtime.audit import AuditAction, AuditEvent, AuditLog
from edgeid.runtime.audit.actor import os_actor
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.services import user_requests
from edgeid.runtime.services.caller import LocalOperator
from edgeid.runtime.services.user_requests import UserChange
from edgeid.runtime.vault.key_choice import keyring_path, provider_for
from edgeid.runtime.vault.keys import Keyring


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


REASON_HELP = (
    "why (audited): needed to make an admin or add galleries, which then wait for a second "
    "person's approval (edgeid approvals)"
)


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


def _change_json(change: UserChange, ttl: timedelta) -> dict[str, object]:
    return {
        "user": _user_json(change.user) if change.user else None,
        "one_time_password": change.one_time_password,
        "waiting": [proposal_json(p, ttl) for p in change.waiting],
    }


def add_user(args: argparse.Namespace) -> int:
    with administration(args.home_dir) as approvals:
        change = user_requests.create_user(
            approvals,
            LocalOperator.current(),
            args.name,
            args.role,
            args.gallery or [],
            reason=args.reason,
            where="cli users add",
        )
        ttl = approvals.ttl
    lines = []
    if change.user and change.one_time_password:
        lines.append(
            f"created {change.user.username} ({change.user.role.value}); one-time password "
            f"(shown once, must be changed at first sign-in): {change.one_time_password}"
        )
    lines.extend(_waiting_lines(change))
    emit(args, _change_json(change, ttl), "\n".join(lines))
    return EXIT_OK


def _waiting_lines(change: UserChange) -> list[str]:
    return [
        f"proposal {p.proposal_id}: {p.summary()}; waits for a second person's approval "
        f"(edgeid approvals approve {p.proposal_id}, or the Approvals page)"
        for p in change.waiting
    ]


def reset_password(args: argparse.Namespace) -> int:
    with administration(args.home_dir) as approvals:
        password = approvals.accounts.reset_password(
            LocalOperator.current(), args.name, where="cli users reset-password"
        )
        user = approvals.accounts.users.require(args.name)
    emit(
        args,
        {"user": _user_json(user), "one_time_password": password},
        f"new one-time password for {user.username} (shown once): {password}",
    )
    return EXIT_OK


def set_user(args: argparse.Namespace) -> int:
    disabled = True if args.disable else False if args.enable else None
    galleries = [] if args.no_galleries else args.gallery or None
    with administration(args.home_dir) as approvals:
        change = user_requests.update_user(
            approvals,
            LocalOperator.current(),
            args.name,
            role=args.role,
            galleries=galleries,
            disabled=disabled,
            reason=args.reason,
            where="cli users set",
        )
        ttl = approvals.ttl
    assert change.user is not None  # an existing user
    emit(
        args,
        {**_user_json(change.user), "waiting": _change_json(change, ttl)["waiting"]},
        "\n".join([_user_line(change.user), *_waiting_lines(change)]),
    )
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
    with administration(args.home_dir) as approvals:
        token, secret = approvals.accounts.create_token(
            LocalOperator.current(),
            args.name,
            args.token_name,
            args.scope,
            ttl_days=args.days,
            where="cli users token-add",
        )
    emit(
        args,
        {"token": token.public(), "secret": secret},
        f"token {token.token_id} for {token.username} (shown once): {secret}",
    )
    return EXIT_OK


def revoke_token(args: argparse.Namespace) -> int:
    with administration(args.home_dir) as approvals:
        token = approvals.accounts.revoke_token(
            LocalOperator.current(), args.token_id, where="cli users token-revoke"
        )
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
    add.add_argument("--reason", help=REASON_HELP)
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
    edit.add_argument("--reason", help=REASON_HELP)
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
