"""Users, passwords, tokens, sessions, throttling and the in-memory workspace, on real files
and real argon2id hashes (no face models needed)."""

from __future__ import annotations

import stat
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from edgeid.runtime.accounts.passwords import PasswordRuleError
from edgeid.runtime.accounts.roles import ROLE_PERMISSIONS, Permission, Role
from edgeid.runtime.accounts.sealing import AccountsKey
from edgeid.runtime.accounts.sessions import SessionStore
from edgeid.runtime.accounts.throttle import (
    ADDRESS_MAX_FAILURES,
    MAX_DELAY_S,
    PAIR_FORGET_S,
    PAIR_FREE_FAILURES,
    LoginThrottle,
    delay_after,
)
from edgeid.runtime.accounts.tokens import TokenStore
from edgeid.runtime.accounts.users import UserStore
from edgeid.runtime.compat import UTC
from edgeid.runtime.errors import BadInputError

NEW_PASSWORD = "a long enough passphrase"
KEY = AccountsKey.derive("ab" * 16, bytes(range(32)))  # a fixed accounts key


class Clock:
    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


# -- users -----------------------------------------------------------------------------------


def test_new_user_gets_a_one_time_password_stored_only_as_argon2id(tmp_path: Path) -> None:
    store = UserStore(tmp_path, KEY)
    user, once = store.create("alice", Role.INVESTIGATOR, galleries=["office"])
    raw = (tmp_path / "accounts" / "users.json").read_text()
    for clear in (once, "alice", "office", "investigator", "$argon2id$"):
        assert clear not in raw  # sealed, name and hash alike
    assert store.require("alice").password_hash.startswith("$argon2id$")
    assert stat.S_IMODE((tmp_path / "accounts" / "users.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "accounts").stat().st_mode) == 0o700
    assert user.must_change_password
    assert store.authenticate("alice", once) is not None
    assert store.authenticate("alice", once + "x") is None
    assert store.authenticate("nobody", once) is None


def test_password_change_enforces_the_rules_and_clears_the_one_time_flag(tmp_path: Path) -> None:
    store = UserStore(tmp_path, KEY)
    name = "alice.investigator"
    _, once = store.create(name, "investigator")
    with pytest.raises(PasswordRuleError, match="current password is wrong"):
        store.change_password(name, "wrong", NEW_PASSWORD)
    with pytest.raises(PasswordRuleError, match="shorter than 12"):
        store.change_password(name, once, "short")
    with pytest.raises(PasswordRuleError, match="user name"):
        store.change_password(name, once, "Alice.Investigator")
    with pytest.raises(PasswordRuleError, match="same as the current"):
        store.change_password(name, once, once)
    assert UserStore(tmp_path, KEY).require(name).must_change_password  # nothing was changed
    store.change_password(name, once, NEW_PASSWORD)
    again = UserStore(tmp_path, KEY)  # another process reading the same file
    assert not again.require(name).must_change_password
    assert again.authenticate(name, NEW_PASSWORD) is not None
    assert again.authenticate(name, once) is None


def test_disabled_user_cannot_sign_in_and_last_admin_is_kept(tmp_path: Path) -> None:
    store = UserStore(tmp_path, KEY)
    store.create("root", Role.ADMIN)
    _, once = store.create("bob", Role.TECHNICIAN)
    store.update("bob", disabled=True)
    assert store.authenticate("bob", once) is None
    assert store.require("bob").permissions == frozenset()
    with pytest.raises(BadInputError, match="no enabled admin"):
        store.update("root", role=Role.SUPERVISOR)
    with pytest.raises(BadInputError, match="no enabled admin"):
        store.update("root", disabled=True)
    assert store.require("root").role is Role.ADMIN


def test_bad_user_names_and_duplicates_are_refused(tmp_path: Path) -> None:
    store = UserStore(tmp_path, KEY)
    for bad in ("", "A", "Bob", "../x", "x" * 40, "1abc"):
        with pytest.raises(BadInputError):
            store.create(bad, Role.ADMIN)
    store.create("carol", Role.ADMIN)
    with pytest.raises(BadInputError, match="exists"):
        store.create("carol", Role.TECHNICIAN)
    with pytest.raises(BadInputError, match="unknown role"):
        store.create("dave", "superuser")


def test_a_reset_issues_a_new_one_time_password(tmp_path: Path) -> None:
    store = UserStore(tmp_path, KEY)
    _, once = store.create("alice", Role.SUPERVISOR)
    store.change_password("alice", once, NEW_PASSWORD)
    user, fresh = store.reset_password("alice")
    assert user.must_change_password
    assert store.authenticate("alice", NEW_PASSWORD) is None
    assert store.authenticate("alice", fresh) is not None


def test_only_investigators_hold_face_permissions() -> None:
    faces = {Permission.SEARCH, Permission.ENROL, Permission.SUBJECTS_READ}
    for role, permissions in ROLE_PERMISSIONS.items():
        assert bool(permissions & faces) == (role is Role.INVESTIGATOR), role


# -- tokens ----------------------------------------------------------------------------------


def test_tokens_are_stored_hashed_scoped_and_revocable(tmp_path: Path) -> None:
    now = datetime(2025, 1, 1, tzinfo=UTC)
    store = TokenStore(tmp_path, KEY, clock=lambda: now)
    allowed = ROLE_PERMISSIONS[Role.INVESTIGATOR]
    token, secret = store.create("alice", "script", ["search"], allowed=allowed, ttl_days=30)
    assert (
        secret.startswith("edgeid_")
        and secret not in (tmp_path / "accounts/tokens.json").read_text()
    )
    found = store.authenticate(secret)
    assert found is not None and found.scopes == {Permission.SEARCH}
    assert store.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert store.authenticate("edgeid_nonsense") is None
    with pytest.raises(BadInputError, match="does not allow"):
        store.create("alice", "too much", ["users"], allowed=allowed)
    with pytest.raises(BadInputError, match="at least one scope"):
        store.create("alice", "none", [], allowed=allowed)
    store.revoke(token.token_id)
    assert TokenStore(tmp_path, KEY).authenticate(secret) is None


def test_tokens_expire(tmp_path: Path) -> None:
    moment = [datetime(2025, 1, 1, tzinfo=UTC)]
    store = TokenStore(tmp_path, KEY, clock=lambda: moment[0])
    _, secret = store.create(
        "alice", "short", ["health"], allowed=frozenset({Permission.HEALTH}), ttl_days=1
    )
    assert store.authenticate(secret) is not None
    moment[0] += timedelta(days=1, seconds=1)
    assert store.authenticate(secret) is None


# -- throttling ------------------------------------------------------------------------------


def test_failures_slow_only_their_account_from_their_address_growing_to_a_cap() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock)
    for _ in range(PAIR_FREE_FAILURES):
        throttle.failure("alice", "10.0.0.1")
        assert throttle.retry_after("alice", "10.0.0.1") is None  # typos cost nothing
    waits = []
    for _ in range(12):
        throttle.failure("alice", "10.0.0.1")
        wait = throttle.retry_after("alice", "10.0.0.1")
        assert wait is not None
        waits.append(wait)
        assert throttle.retry_after("alice", "10.0.0.2") is None  # another address: not slowed
        assert throttle.retry_after("bob", "10.0.0.1") is None  # another account: not slowed
        clock.now += wait  # the next attempt comes as soon as it may
    assert waits[:4] == [delay_after(1), delay_after(2), delay_after(3), delay_after(4)]
    assert waits == sorted(waits)
    assert waits[0] < waits[3] and waits[-1] == MAX_DELAY_S


def test_a_pairs_failures_are_forgotten_after_a_quiet_day() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock)
    for _ in range(PAIR_FREE_FAILURES):
        throttle.failure("alice", "10.0.0.1")
    clock.now += PAIR_FORGET_S + 1
    throttle.failure("alice", "10.0.0.1")  # counts as the first again
    assert throttle.retry_after("alice", "10.0.0.1") is None


def test_a_success_resets_the_pair() -> None:
    throttle = LoginThrottle(Clock())
    for _ in range(PAIR_FREE_FAILURES + 2):
        throttle.failure("alice", "10.0.0.1")
    assert throttle.retry_after("alice", "10.0.0.1") is not None
    throttle.success("alice", "10.0.0.1")
    throttle.failure("alice", "10.0.0.1")
    assert throttle.retry_after("alice", "10.0.0.1") is None


def test_an_address_sweeping_many_names_is_slowed_but_not_its_known_users() -> None:
    throttle = LoginThrottle(Clock())
    throttle.success("carol", "10.9.9.9")  # carol signs in from the office every day
    for i in range(ADDRESS_MAX_FAILURES):
        throttle.failure(f"user{i}", "10.9.9.9")
    # Over the limit, a name failing from there waits after its first failure, not its sixth.
    assert throttle.retry_after("user0", "10.9.9.9") is not None
    throttle.failure("someone-new", "10.9.9.9")
    assert throttle.retry_after("someone-new", "10.9.9.9") is not None
    throttle.failure("someone-new", "10.9.9.8")
    assert throttle.retry_after("someone-new", "10.9.9.8") is None  # elsewhere: as before
    # Nobody without failures is refused: carol, and dave who never signed in from there.
    assert throttle.retry_after("dave", "10.9.9.9") is None
    throttle.failure("carol", "10.9.9.9")  # a typo of a known pair stays free
    assert throttle.retry_after("carol", "10.9.9.9") is None


# -- sessions --------------------------------------------------------------------------------


def test_sessions_end_when_idle_and_at_their_absolute_limit() -> None:
    clock = Clock()
    ended: list[str] = []
    store = SessionStore(idle_s=60, max_s=300, clock=clock, on_end=lambda s: ended.append(s.owner))
    session = store.new("alice")
    for _ in range(5):  # kept alive by use...
        clock.now += 50
        assert store.get(session.sid) is session
    clock.now += 51  # ...until the absolute limit
    assert store.get(session.sid) is None
    idle = store.new("bob")
    clock.now += 61
    assert store.get(idle.sid) is None
    assert ended == [session.owner, idle.owner]


def test_login_rotates_the_session_id_and_end_user_ends_every_session() -> None:
    store = SessionStore(idle_s=60, max_s=300, clock=Clock())
    before = store.new()
    after = store.login(before, "alice")
    assert after.sid != before.sid and store.get(before.sid) is None
    second = store.new("alice")
    assert store.end_user("alice", keep=second.sid) == 1
    assert store.get(after.sid) is None and store.get(second.sid) is second
    assert not second.csrf_ok(None) and not second.csrf_ok("x") and second.csrf_ok(second.csrf)


def test_the_session_table_is_bounded_and_drops_anonymous_sessions_first() -> None:
    store = SessionStore(idle_s=60, max_s=300, clock=Clock(), max_sessions=3)
    signed_in = store.new("alice")
    anonymous = [store.new() for _ in range(5)]
    assert store.get(signed_in.sid) is signed_in
    assert sum(store.get(s.sid) is not None for s in anonymous) == 2
