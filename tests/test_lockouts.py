"""Finding 11 of issue 13: lockouts that could be turned against users. Ten wrong passwords
locked any account (admin included) for 15 minutes from everywhere, the admin page neither
showed nor cleared it, and 50 failures from one address refused everyone behind it (an office
behind one NAT address).

Now the delay belongs to the pair (account, address) and grows with each wrong password; the
wider guards only take a pair's free tries away, so a person typing their password right is
never refused for someone else's guesses; admins see the slowed accounts on the Users page and
clear them, recorded as ``lock_cleared``. Real sign-ins through the app, real argon2 hashes,
the audit log read back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from web_support import PASSWORD, Box, build_box, client, csrf_of, sign_in

from edgeid.runtime.accounts.roles import ROLE_PERMISSIONS, Role
from edgeid.runtime.accounts.throttle import ADDRESS_MAX_FAILURES, PAIR_FREE_FAILURES, delay_after
from edgeid.runtime.accounts.tokens import TokenStore
from edgeid.runtime.accounts.users import UserStore
from edgeid.runtime.audit import AuditAction


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, lfw_dir: Path, models_dir: Path) -> Iterator[Box]:
    built = build_box(tmp_path_factory.mktemp("lockouts"), lfw_dir, models_dir)
    yield built
    built.close()


class Desk:
    """A browser at one network address, signing in through the form."""

    def __init__(self, box: Box, address: str) -> None:
        scheme = "https" if box.settings.web.tls_cert else "http"
        self.browser = TestClient(
            box.app, base_url=f"{scheme}://testserver", follow_redirects=False, client=(address, 5)
        )

    def login(self, username: str, password: str) -> httpx.Response:
        # A fresh form each time: the test's clock jumps past the sign-in form's session.
        csrf = csrf_of(self.browser.get("/login").text)
        reply = self.browser.post(
            "/login", data={"username": username, "password": password, "csrf_token": csrf}
        )
        if reply.status_code == 303:  # signed in: start the next attempt signed out
            self.browser.cookies.clear()
        return reply


def new_user(box: Box, name: str, role: Role = Role.INVESTIGATOR) -> None:
    store = UserStore(box.home, box.accounts)
    _, once = store.create(name, role)
    store.change_password(name, once, PASSWORD)


def admin_api(box: Box) -> TestClient:
    held = ROLE_PERMISSIONS[Role.ADMIN]
    _, secret = TokenStore(box.home, box.accounts).create(
        box.users[Role.ADMIN], "lockouts", held, allowed=held
    )
    api = client(box)
    api.headers["Authorization"] = f"Bearer {secret}"
    return api


def test_finding_11_people_behind_an_attackers_address_still_sign_in(box: Box) -> None:
    office = "10.1.1.1"
    new_user(box, "colleague")
    new_user(box, "newcomer")
    assert Desk(box, office).login("colleague", PASSWORD).status_code == 303  # a usual desk
    attacker = Desk(box, office)
    for number in range(ADDRESS_MAX_FAILURES):  # a sweep of names, over the address's limit
        assert attacker.login(f"guess{number}", "password1").status_code == 401
    admin = box.users[Role.ADMIN]
    replies = [attacker.login(admin, f"guess {n}").status_code for n in range(3)]
    assert replies == [401, 429, 429]  # over the limit: no free tries left for the attacker

    # Behind the same address: the colleague, and a newcomer who never signed in from it.
    office_desk = Desk(box, office)
    assert office_desk.login("colleague", PASSWORD).status_code == 303
    assert office_desk.login("newcomer", PASSWORD).status_code == 303
    # A typo of the colleague's costs nothing; then the right password works.
    assert office_desk.login("colleague", "typo").status_code == 401
    assert office_desk.login("colleague", PASSWORD).status_code == 303


def test_finding_11_guessing_the_admin_from_one_address_does_not_lock_the_admin_out_elsewhere(
    box: Box,
) -> None:
    admin = box.users[Role.ADMIN]
    attacker = Desk(box, "10.2.2.2")
    failures = 0
    for attempt in range(16):  # an hour-long attack, as fast as the delays let it
        reply = attacker.login(admin, f"guess {attempt}")
        if reply.status_code == 429:
            box.clock.advance(int(reply.headers["retry-after"]))
            reply = attacker.login(admin, f"guess {attempt}")
        assert reply.status_code == 401
        failures += 1
    assert attacker.login(admin, PASSWORD).status_code == 429  # that address waits, even right
    # The admin at their own desk signs in at once, first try.
    assert Desk(box, "10.3.3.3").login(admin, PASSWORD).status_code == 303
    # Guessing spread over many addresses does not lock them out either.
    for number in range(40):
        assert Desk(box, f"10.4.0.{number}").login(admin, "guess").status_code == 401
    assert Desk(box, "10.5.5.5").login(admin, PASSWORD).status_code == 303
    # ... though each new address now waits after its first wrong password.
    spread = Desk(box, "10.5.5.6")
    assert spread.login(admin, "guess").status_code == 401
    assert spread.login(admin, "guess again").status_code == 429
    assert failures == 16


def test_finding_11_delays_grow_with_each_wrong_password(box: Box) -> None:
    new_user(box, "typist")
    desk = Desk(box, "10.6.6.6")
    for attempt in range(PAIR_FREE_FAILURES):
        assert desk.login("typist", f"typo {attempt}").status_code == 401
    waits = []
    for attempt in range(4):
        assert desk.login("typist", f"wrong {attempt}").status_code == 401
        refused = desk.login("typist", PASSWORD)
        assert refused.status_code == 429 and "try again in" in refused.text
        waits.append(int(refused.headers["retry-after"]))
        box.clock.advance(waits[-1])
    assert waits == [round(delay_after(n)) for n in (1, 2, 3, 4)] and waits[0] < waits[-1]
    assert desk.login("typist", PASSWORD).status_code == 303  # once waited out, a success
    assert desk.login("typist", "typo").status_code == 401  # and the count starts afresh
    assert desk.login("typist", PASSWORD).status_code == 303


def test_finding_11_the_admin_sees_and_clears_a_slowed_account_and_it_is_recorded(
    box: Box,
) -> None:
    new_user(box, "victim")
    desk = Desk(box, "10.7.7.7")
    for attempt in range(PAIR_FREE_FAILURES + 3):
        assert desk.login("victim", f"guess {attempt}").status_code in (401, 429)
    assert desk.login("victim", PASSWORD).status_code == 429

    admin, csrf = sign_in(box, Role.ADMIN)
    page = admin.get("/admin/users").text
    assert "Locked accounts" in page and "10.7.7.7" in page
    assert "locked: sign-ins slowed by wrong passwords" in page  # its state in the user list
    assert 'action="/admin/users/victim/unlock"' in page
    investigator, inv_csrf = sign_in(box, Role.INVESTIGATOR)
    refused = investigator.post("/admin/users/victim/unlock", data={"csrf_token": inv_csrf})
    assert refused.status_code == 403
    assert desk.login("victim", PASSWORD).status_code == 429  # still slowed

    before = box.audit.last_seq
    reply = admin.post("/admin/users/victim/unlock", data={"csrf_token": csrf})
    assert reply.status_code == 303
    records = [r for r in box.audit.query(limit=50) if r.seq > before]
    cleared = [r for r in records if r.event.action is AuditAction.LOCK_CLEARED]
    assert len(cleared) == 1
    assert cleared[0].event.user == box.users[Role.ADMIN] and cleared[0].event.role == "admin"
    assert "user victim" in (cleared[0].event.detail or "")
    assert "10.7.7.7" not in admin.get("/admin/users").text
    assert desk.login("victim", PASSWORD).status_code == 303  # at once, from the same desk

    # The same through the API, with a users-scoped token.
    for attempt in range(PAIR_FREE_FAILURES + 2):
        desk.login("victim", f"again {attempt}")
    assert desk.login("victim", PASSWORD).status_code == 429
    api = admin_api(box)
    assert api.post("/api/v1/users/victim/unlock").status_code == 204
    assert desk.login("victim", PASSWORD).status_code == 303
    actions = [r.event.action for r in box.audit.query(limit=50) if r.seq > before]
    assert actions.count(AuditAction.LOCK_CLEARED) == 2


def test_a_locked_account_shows_on_its_own_page_and_is_unlocked_there_on_the_record(
    box: Box,
) -> None:
    new_user(box, "locked-out")
    desk = Desk(box, "10.8.8.8")
    for attempt in range(PAIR_FREE_FAILURES + 3):
        desk.login("locked-out", f"guess {attempt}")
    assert desk.login("locked-out", PASSWORD).status_code == 429
    admin, csrf = sign_in(box, Role.ADMIN)
    page = admin.get("/admin/users/locked-out").text
    assert "Locked: locked-out" in page and "from 10.8.8.8" in page
    assert 'action="/admin/users/locked-out/unlock"' in page
    before = box.audit.last_seq
    reply = admin.post("/admin/users/locked-out/unlock", data={"csrf_token": csrf, "back": "user"})
    assert reply.status_code == 303 and reply.headers["location"] == "/admin/users/locked-out"
    after = admin.get("/admin/users/locked-out").text
    assert "locked-out may sign in again" in after and "Not locked" in after
    cleared = [
        r
        for r in box.audit.query(limit=20)
        if r.seq > before and r.event.action is AuditAction.LOCK_CLEARED
    ]
    assert len(cleared) == 1 and "user locked-out" in (cleared[0].event.detail or "")
    assert desk.login("locked-out", PASSWORD).status_code == 303
