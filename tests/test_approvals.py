"""The two-person rule and accountable user administration, on real galleries, a real audit
log and a sealed proposals file: in the core services, at the shell as real subprocesses, and
in Debian's Chromium (admin proposes erasing a gallery, their own approval is refused, a
supervisor approves, every step in the audit log).
"""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
from web_support import PASSWORD, free_port, make_user, serving, tls_settings

from edgeid.cli.commands.users_cmd import reading_key
from edgeid.runtime.accounts.roles import ROLE_PERMISSIONS, Role
from edgeid.runtime.accounts.sealing import accounts_key
from edgeid.runtime.accounts.tokens import TokenStore
from edgeid.runtime.accounts.users import UserStore
from edgeid.runtime.audit import AuditAction, AuditLog
from edgeid.runtime.audit.events import AuditEvent
from edgeid.runtime.audit.recorder import Recorder
from edgeid.runtime.cases.service import CaseService
from edgeid.runtime.compat import UTC
from edgeid.runtime.config.settings import Settings
from edgeid.runtime.errors import AccessDeniedError, BadInputError
from edgeid.runtime.gallery.service import GalleryService
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.inference.pipeline import FacePipeline
from edgeid.runtime.services import user_requests
from edgeid.runtime.services.accounts import AccountAdmin
from edgeid.runtime.services.approvals import Approvals, NotPendingError
from edgeid.runtime.services.cases import AccountableCases
from edgeid.runtime.services.consent import ChangeKind, Consent, DualControlError, issue
from edgeid.runtime.services.galleries import AccountableGalleries
from edgeid.runtime.services.proposals import (
    APPROVALS_DIR,
    PROPOSALS_FILE,
    ProposalsFileError,
    ProposalStatus,
    ProposalStore,
)
from edgeid.runtime.vault.key_choice import provider_for
from edgeid.runtime.web.app import create_app
from edgeid.runtime.web.principal import Principal

REPO_ROOT = Path(__file__).resolve().parent.parent
OFFICE, OTHER = "office", "other"
REASON = "unit disbanded; records transferred to HQ"
TTL = timedelta(days=7)


class WallClock:
    """UTC wall time the test moves by hand (proposal expiry)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Core:
    service: GalleryService
    audit: AuditLog
    accounts: AccountAdmin
    approvals: Approvals
    cases: CaseService
    clock: WallClock

    def caller(self, name: str) -> Principal:
        user = self.accounts.users.require(name)
        return Principal(
            user.username, user.role, user.permissions, user.galleries, "session", f"t:{name}"
        )

    def events(self, action: AuditAction | None = None) -> list[AuditEvent]:
        """Oldest first."""
        return [r.event for r in reversed(self.audit.query(action=action, limit=1000))]

    def galleries(self) -> list[str]:
        return [g.name for g in self.service.list_galleries()]


@pytest.fixture(scope="module")
def pipeline(models_dir: Path) -> FacePipeline:
    return FacePipeline.load(models_dir)


@contextmanager
def opened(home: Path, pipeline: FacePipeline, *, dual_control: bool = True) -> Iterator[Core]:
    """A box with galleries office and other; admins ada and ben, supervisor sam,
    investigator ivy (office), and the services over them as the web app builds them."""
    clock = WallClock()
    with (
        GalleryService.open(home, Settings(), pipeline=pipeline) as service,
        AuditLog.open(home, service.store.keyring) as audit,
        CaseService(home, service, audit, detector="mtcnn") as cases,
    ):
        sealing = accounts_key(service.store.keyring)
        users = UserStore(home, sealing)
        if not users.count():
            for gallery in (OFFICE, OTHER):
                service.create_gallery(gallery)
            for name, role in (("ada", "admin"), ("ben", "admin"), ("sam", "supervisor")):
                users.create(name, role)
            users.create("ivy", Role.INVESTIGATOR, galleries=[OFFICE])
        recorder = Recorder(audit)
        accounts = AccountAdmin(
            users,
            TokenStore(home, sealing),
            recorder,
            gallery_names=lambda: [g.name for g in service.list_galleries()],
        )
        approvals = Approvals(
            ProposalStore(home, service.store.keyring, clock=clock),
            recorder,
            accounts,
            galleries=AccountableGalleries(service, recorder),
            cases=AccountableCases(cases, recorder, clock=clock),
            dual_control=dual_control,
            ttl=TTL,
            clock=clock,
        )
        yield Core(service, audit, accounts, approvals, cases, clock)


@pytest.fixture
def core(tmp_path: Path, pipeline: FacePipeline) -> Iterator[Core]:
    with opened(tmp_path / "box", pipeline) as box:
        yield box


@pytest.fixture
def lab(tmp_path: Path, pipeline: FacePipeline) -> Iterator[Core]:
    """The same box with security.dual_control off."""
    with opened(tmp_path / "lab", pipeline, dual_control=False) as box:
        yield box


# -- the core --------------------------------------------------------------------------------


def test_erasing_a_gallery_waits_for_a_second_person_who_carries_it_out(core: Core) -> None:
    ada, sam = core.caller("ada"), core.caller("sam")
    asked = core.approvals.erase_gallery(ada, OFFICE, reason=REASON, where="test")
    assert not asked.done and asked.proposal is not None
    proposal = asked.proposal
    assert OFFICE in core.galleries()  # nothing erased yet
    proposed = core.events(AuditAction.CHANGE_PROPOSED)[-1]
    assert proposed.user == "ada" and proposed.reason == REASON and proposed.gallery == OFFICE
    assert proposal.proposal_id in (proposed.detail or "")
    assert [p.proposal_id for p in core.approvals.pending(sam)] == [proposal.proposal_id]

    with pytest.raises(AccessDeniedError, match="own proposal"):
        core.approvals.approve(ada, proposal.proposal_id, where="test")
    denied = core.events(AuditAction.ACCESS_DENIED)[-1]
    assert denied.user == "ada" and f"proposal {proposal.proposal_id}" in (denied.detail or "")
    assert OFFICE in core.galleries()

    done = core.approvals.approve(sam, proposal.proposal_id, where="test")
    assert done.done and done.erased is not None and done.erased.name == OFFICE
    assert OFFICE not in core.galleries()
    assert core.accounts.users.require("ivy").galleries == ()  # no stale access
    approved, erased = core.events()[-2:]
    assert approved.action is AuditAction.CHANGE_APPROVED and approved.user == "sam"
    assert erased.action is AuditAction.GALLERY_DELETED and erased.user == "sam"
    assert erased.reason == REASON
    assert f"proposal {proposal.proposal_id} by ada, approved by sam" in (erased.detail or "")
    assert core.approvals.store.get(proposal.proposal_id).status is ProposalStatus.APPROVED
    with pytest.raises(NotPendingError):
        core.approvals.approve(core.caller("ben"), proposal.proposal_id, where="test")


def test_a_rejected_or_withdrawn_proposal_is_closed_and_recorded(core: Core) -> None:
    ada, sam = core.caller("ada"), core.caller("sam")
    first = core.approvals.grant_galleries(ada, "ivy", [OTHER], reason=REASON, where="test")
    assert first is not None and first.proposal is not None
    pid = first.proposal.proposal_id
    with pytest.raises(BadInputError, match="asks for this already"):
        core.approvals.grant_galleries(ada, "ivy", [OTHER], reason=REASON, where="test")
    core.approvals.reject(sam, pid, where="test")
    assert core.events()[-1].action is AuditAction.CHANGE_REJECTED
    assert "rejected" in (core.events()[-1].detail or "")
    with pytest.raises(NotPendingError, match="rejected"):
        core.approvals.approve(core.caller("ben"), pid, where="test")
    assert core.accounts.users.require("ivy").galleries == (OFFICE,)

    again = core.approvals.grant_galleries(ada, "ivy", [OTHER], reason=REASON, where="test")
    assert again is not None and again.proposal is not None
    core.approvals.reject(ada, again.proposal.proposal_id, where="test")  # withdrawn
    assert "withdrawn by its proposer" in (core.events()[-1].detail or "")
    third = core.approvals.grant_galleries(ada, "ivy", [OTHER], reason=REASON, where="test")
    assert third is not None and third.proposal is not None
    with pytest.raises(AccessDeniedError, match="only admins and supervisors"):
        core.approvals.reject(core.caller("ivy"), third.proposal.proposal_id, where="test")
    assert core.approvals.pending(sam)  # ivy's refused rejection changed nothing


def test_proposals_expire_unapproved(core: Core) -> None:
    ada, sam = core.caller("ada"), core.caller("sam")
    asked = core.approvals.erase_gallery(ada, OTHER, reason=REASON, where="test")
    assert asked.proposal is not None
    core.clock.now += TTL - timedelta(minutes=1)
    assert core.approvals.pending(sam)
    core.clock.now += timedelta(minutes=2)
    assert core.approvals.pending(sam) == []
    expired = core.events()[-1]
    assert expired.action is AuditAction.CHANGE_REJECTED and expired.user == "system"
    assert "expired unapproved after 7 days" in (expired.detail or "")
    with pytest.raises(NotPendingError, match="expired"):
        core.approvals.approve(sam, asked.proposal.proposal_id, where="test")
    assert OTHER in core.galleries()


def test_no_front_end_can_skip_the_rule(core: Core) -> None:
    """The covered operations refuse without a consent, with a forged one, with one for
    another change, and with one already spent; nothing is recorded or changed."""
    ada = core.caller("ada")
    galleries = core.approvals.galleries
    assert galleries is not None
    before = len(core.events())
    with pytest.raises(DualControlError, match="second person"):
        galleries.delete_gallery(ada, OFFICE, reason=REASON, where="test", consent=None)
    with pytest.raises(DualControlError, match="second person"):
        core.accounts.grant_galleries(ada, "ivy", [OTHER], where="test")
    with pytest.raises(DualControlError, match="second person"):
        core.accounts.create_user(ada, "eve", Role.ADMIN, where="test")
    with pytest.raises(DualControlError, match="second person"):
        core.accounts.change_role(ada, "ivy", Role.ADMIN, where="test")
    with pytest.raises(DualControlError, match="only by the approvals service"):
        Consent(ChangeKind.ERASE_GALLERY, OFFICE, (), REASON, ada.actor, None, None, object())
    other = issue(
        ChangeKind.ERASE_GALLERY,
        OTHER,
        reason=REASON,
        proposer=ada.actor,
        approver=None,
        proposal_id=None,
    )
    with pytest.raises(DualControlError, match="does not cover"):
        galleries.delete_gallery(ada, OFFICE, reason=REASON, where="test", consent=other)
    assert len(core.events()) == before and OFFICE in core.galleries()
    galleries.delete_gallery(ada, OTHER, reason=REASON, where="test", consent=other)
    core.service.create_gallery(OTHER)
    with pytest.raises(DualControlError, match="does not cover"):  # spent
        galleries.delete_gallery(ada, OTHER, reason=REASON, where="test", consent=other)
    assert OTHER in core.galleries()

    case = core.cases.store.create(
        "VID-1", created_by="ivy", model_id="dlib_resnet_v1", retention_until=date(2999, 1, 1)
    )
    assert core.approvals.cases is not None
    with pytest.raises(DualControlError, match="before its retention date"):
        core.approvals.cases.purge(core.caller("ivy"), case.case_id, REASON, where="test")
    assert core.cases.store.exists("VID-1")


def test_an_early_purge_needs_two_people_an_expired_one_does_not(core: Core) -> None:
    ivy, sam = core.caller("ivy"), core.caller("sam")
    core.cases.store.create(
        "OLD-1", created_by="ivy", model_id="dlib_resnet_v1", retention_until=date(2001, 1, 1)
    )
    core.cases.store.create("NOW-2", created_by="ivy", model_id="dlib_resnet_v1")
    gone = core.approvals.purge_case(ivy, "OLD-1", reason=REASON, where="test")
    assert gone.done and not core.cases.store.exists("OLD-1")
    assert "past its retention date" in (core.events()[-1].detail or "")

    asked = core.approvals.purge_case(ivy, "NOW-2", reason=REASON, where="test")
    assert not asked.done and asked.proposal is not None
    assert core.events()[-1].case == "NOW-2"  # the proposal is found under its case
    assert [p.proposal_id for p in core.approvals.pending(ivy)] == [asked.proposal.proposal_id]
    core.approvals.approve(sam, asked.proposal.proposal_id, where="test")
    assert not core.cases.store.exists("NOW-2")
    purged = core.events()[-1]
    assert purged.action is AuditAction.CASE_PURGED and purged.user == "sam"
    assert "before its retention date" in (purged.detail or "")
    assert "by ivy, approved by sam" in (purged.detail or "")


def test_a_new_admin_exists_only_once_approved(core: Core) -> None:
    ada, sam = core.caller("ada"), core.caller("sam")
    change = user_requests.create_user(
        core.approvals, ada, "eve", "admin", [], reason=REASON, where="test"
    )
    assert change.user is None and change.one_time_password is None and change.waiting
    assert core.accounts.users.get("eve") is None
    with pytest.raises(BadInputError, match="give the reason"):
        user_requests.create_user(core.approvals, ada, "max", "admin", [], reason="", where="t")
    done = core.approvals.approve(sam, change.waiting[0].proposal_id, where="test")
    eve = core.accounts.users.require("eve")
    assert eve.role is Role.ADMIN and done.one_time_password
    assert core.accounts.users.authenticate("eve", done.one_time_password) is not None
    created = core.events()[-1]
    assert created.action is AuditAction.USER_CREATED and created.user == "sam"

    promoted = user_requests.update_user(
        core.approvals, ada, "ivy", role="admin", reason=REASON, where="test"
    )
    assert promoted.user is not None and promoted.user.role is Role.INVESTIGATOR
    assert [p.summary() for p in promoted.waiting] == ["make ivy an admin"]


def test_with_dual_control_off_changes_run_at_once_and_say_so(lab: Core) -> None:
    ada = lab.caller("ada")
    erased = lab.approvals.erase_gallery(ada, OTHER, reason=REASON, where="test")
    assert erased.done and OTHER not in lab.galleries()
    record = lab.events(AuditAction.GALLERY_DELETED)[-1]
    assert record.user == "ada" and "dual control off" in (record.detail or "")
    change = user_requests.create_user(
        lab.approvals, ada, "nina", "investigator", [OFFICE], reason=None, where="test"
    )
    assert change.user is not None and change.user.galleries == (OFFICE,) and not change.waiting
    granted = lab.events(AuditAction.GALLERY_ACCESS_CHANGED)[-1]
    assert "added office" in (granted.detail or "") and "dual control off" in (granted.detail or "")
    made = user_requests.create_user(lab.approvals, ada, "eve", "admin", [], reason=None, where="t")
    assert made.user is not None and made.user.role is Role.ADMIN and made.one_time_password
    assert lab.events(AuditAction.CHANGE_PROPOSED) == []


@pytest.mark.parametrize("dual_control", [True, False], ids=["dual-control", "lab-box"])
def test_nobody_grants_themselves_access_whatever_the_setting(
    tmp_path: Path, pipeline: FacePipeline, dual_control: bool
) -> None:
    with opened(tmp_path / "box", pipeline, dual_control=dual_control) as box:
        ada = box.caller("ada")
        for attempt in (
            lambda: box.approvals.grant_galleries(ada, "ada", [OFFICE], reason=REASON, where="t"),
            lambda: user_requests.update_user(
                box.approvals, ada, "ada", galleries=[OFFICE], reason=REASON, where="t"
            ),
            lambda: user_requests.update_user(
                box.approvals, ada, "ada", role="supervisor", where="t"
            ),
        ):
            with pytest.raises(AccessDeniedError):
                attempt()
        assert box.accounts.users.require("ada").galleries == ()
        assert box.accounts.users.require("ada").role is Role.ADMIN
        denied = [e for e in box.events(AuditAction.ACCESS_DENIED) if e.user == "ada"]
        assert len(denied) == 3 and all("for oneself" in (e.detail or "") for e in denied)
        assert box.events(AuditAction.CHANGE_PROPOSED) == []


def test_nobody_approves_access_for_themselves(core: Core) -> None:
    ada, sam, ben = core.caller("ada"), core.caller("sam"), core.caller("ben")
    asked = core.approvals.grant_galleries(ada, "sam", [OFFICE], reason=REASON, where="test")
    assert asked is not None and asked.proposal is not None
    with pytest.raises(AccessDeniedError, match="access for themselves"):
        core.approvals.approve(sam, asked.proposal.proposal_id, where="test")
    assert "approving access for oneself" in (core.events()[-1].detail or "")
    core.approvals.approve(ben, asked.proposal.proposal_id, where="test")
    assert core.accounts.users.require("sam").galleries == (OFFICE,)
    granted = core.events()[-1]
    assert granted.action is AuditAction.GALLERY_ACCESS_CHANGED and granted.user == "ben"


def test_a_proposer_who_lost_the_right_cannot_have_it_carried_out(core: Core) -> None:
    ada, ben, sam = core.caller("ada"), core.caller("ben"), core.caller("sam")
    asked = core.approvals.erase_gallery(ada, OFFICE, reason=REASON, where="test")
    assert asked.proposal is not None
    core.accounts.change_role(ben, "ada", Role.TECHNICIAN, where="test")
    with pytest.raises(BadInputError, match="may no longer"):
        core.approvals.approve(sam, asked.proposal.proposal_id, where="test")
    assert OFFICE in core.galleries()


def test_user_changes_are_recorded_under_their_own_labels(core: Core) -> None:
    ada = core.caller("ada")
    user_requests.update_user(core.approvals, ada, "ivy", galleries=[], disabled=True, where="test")
    user_requests.update_user(
        core.approvals, ada, "ivy", role="supervisor", disabled=False, where="t"
    )
    token, _ = core.accounts.create_token(
        core.caller("sam"), "sam", "script", ["audit:read"], ttl_days=5, where="test"
    )
    core.accounts.revoke_token(ada, token.token_id, where="test")
    labels = [(e.action, e.user) for e in core.events()][-6:]
    assert labels == [
        (AuditAction.GALLERY_ACCESS_CHANGED, "ada"),
        (AuditAction.USER_DISABLED, "ada"),
        (AuditAction.ROLE_CHANGED, "ada"),
        (AuditAction.USER_ENABLED, "ada"),
        (AuditAction.TOKEN_CREATED, "sam"),
        (AuditAction.TOKEN_REVOKED, "ada"),
    ]
    assert "removed office" in (core.events()[-6].detail or "")
    with pytest.raises(AccessDeniedError, match="only admins"):
        core.accounts.disable(core.caller("sam"), "ben", where="test")
    assert core.events()[-1].action is AuditAction.ACCESS_DENIED


def test_the_proposals_file_is_sealed_to_this_box(core: Core, tmp_path: Path) -> None:
    asked = core.approvals.erase_gallery(core.caller("ada"), OFFICE, reason=REASON, where="t")
    assert asked.proposal is not None
    path = core.approvals.store.path
    assert path == tmp_path / "box" / APPROVALS_DIR / PROPOSALS_FILE
    raw = path.read_bytes()
    assert REASON.encode() not in raw and OFFICE.encode() not in raw
    # The proposer's name is in no JSON string, and every field but the format's own is hex
    # (searching the hex for "ada" made this test fail by chance: a, d, a are hex digits).
    assert b'"ada"' not in raw
    envelope = json.loads(raw)
    assert set(envelope) == {"format", "version", "key_id", "nonce", "ciphertext"}
    assert all(re.fullmatch("[0-9a-f]+", envelope[k]) for k in ("key_id", "nonce", "ciphertext"))
    assert (path.stat().st_mode & 0o777) == 0o600
    cipher = bytearray.fromhex(envelope["ciphertext"])
    cipher[5] ^= 1
    path.write_text(json.dumps({**envelope, "ciphertext": cipher.hex()}))
    with pytest.raises(ProposalsFileError, match="does not open"):
        core.approvals.pending(core.caller("sam"))


# -- the shell, as real subprocesses ---------------------------------------------------------


def edgeid(home: Path, *argv: str) -> tuple[int, object, str]:
    done = subprocess.run(
        [sys.executable, "-m", "edgeid", *argv, "--home", str(home), "--json"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    out = json.loads(done.stdout) if done.stdout.strip() else None
    return done.returncode, out, done.stderr


@pytest.fixture
def shell_box(tmp_path: Path, models_dir: Path) -> Path:
    """A box made by `edgeid init` (first admin "admin") with galleries office and other."""
    home = tmp_path / "box"
    code, _, err = edgeid(home, "init")
    assert code == 0, err
    (home / "models").symlink_to(models_dir)
    with GalleryStore(home, provider_for(home, Settings().keys)) as store:
        store.create_gallery(OFFICE)
        store.create_gallery(OTHER)
    return home


def box_events(home: Path) -> list[AuditEvent]:
    with (
        GalleryStore(home, provider_for(home, Settings().keys)) as store,
        AuditLog.open(home, store.keyring) as log,
    ):
        return [r.event for r in reversed(log.query(limit=1000))]


def test_the_shell_proposes_and_cannot_approve_its_own_proposal(shell_box: Path) -> None:
    home, me = shell_box, f"os:{getpass.getuser()}"
    code, asked, err = edgeid(home, "gallery", "delete", OFFICE, "--yes", "--reason", REASON)
    assert code == 0 and isinstance(asked, dict) and not asked["done"], err
    pid = asked["proposal"]["proposal_id"]
    code, listed, _ = edgeid(home, "approvals", "list")
    assert isinstance(listed, list) and [p["proposal_id"] for p in listed] == [pid]
    assert listed[0]["proposer"] == me and listed[0]["summary"] == f"erase gallery {OFFICE}"
    code, _, err = edgeid(home, "approvals", "approve", pid)
    assert code == 1 and "nobody approves their own proposal" in err
    code, _, err = edgeid(home, "case", "purge", "NO-CASE", "--yes", "--reason", REASON)
    assert code == 2 and "no case" in err
    code, admin_asked, _ = edgeid(
        home, "users", "add", "boss", "--role", "admin", "--reason", REASON
    )
    assert code == 0 and isinstance(admin_asked, dict) and admin_asked["user"] is None
    assert UserStore(home, reading_key(home)).get("boss") is None
    code, withdrawn, _ = edgeid(home, "approvals", "reject", pid)
    assert code == 0 and isinstance(withdrawn, dict) and withdrawn["status"] == "rejected"
    with GalleryStore(home, provider_for(home, Settings().keys)) as store:
        assert OFFICE in [g.name for g in store.list_galleries()]
    steps = [(e.action, e.user) for e in box_events(home)][-4:]
    assert steps == [
        (AuditAction.CHANGE_PROPOSED, me),
        (AuditAction.ACCESS_DENIED, me),
        (AuditAction.CHANGE_PROPOSED, me),
        (AuditAction.CHANGE_REJECTED, me),
    ]


def test_the_shell_approves_a_web_users_proposal(shell_box: Path, pipeline: FacePipeline) -> None:
    home, me = shell_box, f"os:{getpass.getuser()}"
    if getpass.getuser() == "admin":
        pytest.skip("the shell's login is the web admin's name: one person")
    UserStore(home, reading_key(home)).create("ivy", Role.INVESTIGATOR, galleries=[OFFICE])
    with opened(home, pipeline) as box:  # as the service would, for the web's admin
        admin = box.caller("admin")
        erase = box.approvals.erase_gallery(admin, OTHER, reason=REASON, where="test")
        grant = box.approvals.grant_galleries(admin, "ivy", [OTHER], reason=REASON, where="t")
        assert erase.proposal is not None and grant is not None and grant.proposal is not None
    code, done, err = edgeid(home, "approvals", "approve", erase.proposal.proposal_id)
    assert code == 0 and isinstance(done, dict) and done["done"], err
    code, _, err = edgeid(home, "approvals", "reject", grant.proposal.proposal_id)
    assert code == 0, err
    with GalleryStore(home, provider_for(home, Settings().keys)) as store:
        assert [g.name for g in store.list_galleries()] == [OFFICE]
    steps = [(e.action, e.user) for e in box_events(home)][-3:]
    assert steps == [
        (AuditAction.CHANGE_APPROVED, me),
        (AuditAction.GALLERY_DELETED, me),
        (AuditAction.CHANGE_REJECTED, me),
    ]
    erased = [e for e in box_events(home) if e.action is AuditAction.GALLERY_DELETED][-1]
    pid = erase.proposal.proposal_id
    assert f"proposal {pid} by admin, approved by {me}" in (erased.detail or "")
    assert UserStore(home, reading_key(home)).require("ivy").galleries == (OFFICE,)


# -- the API ---------------------------------------------------------------------------------


def test_the_api_proposes_and_a_second_token_approves(
    tmp_path: Path, pipeline: FacePipeline
) -> None:
    from fastapi.testclient import TestClient

    home = tmp_path / "api"
    home.mkdir()
    settings = tls_settings(home)
    with (
        GalleryService.open(home, settings, pipeline=pipeline) as service,
        AuditLog.open(home, service.store.keyring) as audit,
    ):
        service.create_gallery(OFFICE)
        service.create_gallery("temporary")
        app = create_app(home, settings, galleries=service, audit=audit, version="test")

        sealing = accounts_key(service.store.keyring)

        def api(role: Role) -> TestClient:
            name = make_user(home, sealing, role)
            held = ROLE_PERMISSIONS[role]
            _, secret = TokenStore(home, sealing).create(name, "t", held, allowed=held)
            browser = TestClient(app, base_url="https://testserver")
            browser.headers["Authorization"] = f"Bearer {secret}"
            return browser

        admin, supervisor = api(Role.ADMIN), api(Role.SUPERVISOR)
        asked = admin.request("DELETE", "/api/v1/galleries/temporary", json={"reason": REASON})
        assert asked.status_code == 202 and asked.json()["kind"] == "erase_gallery"
        pid = asked.json()["proposal_id"]
        own = admin.post(f"/api/v1/approvals/{pid}/approve")
        assert own.status_code == 403 and "own proposal" in own.json()["error"]
        listed = supervisor.get("/api/v1/approvals").json()
        assert [p["proposal_id"] for p in listed] == [pid] and listed[0]["proposer"] == "admin"
        done = supervisor.post(f"/api/v1/approvals/{pid}/approve")
        assert done.status_code == 200 and done.json()["proposal"]["status"] == "approved"
        assert [g.name for g in service.list_galleries()] == [OFFICE]

        made = admin.post(
            "/api/v1/users",
            json={"username": "nina", "role": "investigator", "galleries": [OFFICE]},
        )
        assert made.status_code == 400 and "give the reason" in made.json()["error"]
        made = admin.post(
            "/api/v1/users",
            json={
                "username": "nina",
                "role": "investigator",
                "galleries": [OFFICE],
                "reason": REASON,
            },
        )
        assert made.status_code == 201 and made.json()["user"]["galleries"] == []
        assert [w["summary"] for w in made.json()["waiting"]] == ["give nina access to office"]
        boss = admin.post(
            "/api/v1/users", json={"username": "boss", "role": "admin", "reason": REASON}
        )
        assert boss.status_code == 202 and boss.json()["user"] is None
        myself = admin.patch("/api/v1/users/admin", json={"galleries": [OFFICE], "reason": REASON})
        assert myself.status_code == 403
        assert UserStore(home, sealing).require("admin").galleries == ()


# -- two people in Debian's Chromium ---------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
PAGE_TIMEOUT_MS = 60_000


@pytest.fixture
def served(tmp_path: Path, pipeline: FacePipeline, models_dir: Path) -> Iterator[tuple[str, Core]]:
    home = tmp_path / "served"
    home.mkdir()
    settings = tls_settings(home)
    with (
        GalleryService.open(home, settings, pipeline=pipeline) as service,
        AuditLog.open(home, service.store.keyring) as audit,
    ):
        service.create_gallery(OFFICE)
        service.create_gallery("temporary")
        sealing = accounts_key(service.store.keyring)
        make_user(home, sealing, Role.ADMIN)
        make_user(home, sealing, Role.SUPERVISOR)
        app = create_app(home, settings, galleries=service, audit=audit, version="test")
        state = app.state.web
        core = Core(service, audit, state.accounts, state.approvals, None, WallClock())  # type: ignore[arg-type]
        with serving(app, settings, free_port()) as url:
            yield url, core


def test_two_people_erase_a_gallery_in_the_browser(served: tuple[str, Core]) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, core = served
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(ignore_https_errors=True)
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        page = context.new_page()

        def sign_in(user: str) -> None:
            page.goto(f"{url}/login")
            page.get_by_label("User name").fill(user)
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()

        try:
            # Admin A asks to erase the gallery: it becomes a proposal.
            sign_in("admin")
            page.goto(f"{url}/admin/galleries")
            page.get_by_role("link", name=re.compile(r"^Erase\s+gallery\s+temporary")).click()
            page.get_by_label("Type the gallery's name to confirm").fill("temporary")
            page.get_by_label("Reason for erasing it").fill(REASON)
            page.get_by_role("button", name="Propose erasing the gallery").click()
            expect(page.get_by_role("status")).to_contain_text("waits for a second person")
            expect(page.locator("table")).to_contain_text("temporary")
            (proposal,) = core.approvals.pending(core.caller("supervisor"))

            # A sees it waiting, with no Approve button for their own proposal...
            page.get_by_role("link", name="Approvals").click()
            row = page.locator(f"#proposal-{proposal.proposal_id}")
            expect(row).to_contain_text("erase gallery temporary")
            expect(row).to_contain_text("Your proposal")
            expect(row.get_by_role("button", name="Approve")).to_have_count(0)
            # ...and an approval forged past the page is refused by the core.
            token = page.locator("input[name=csrf_token]").first.get_attribute("value")
            forged = page.request.post(
                f"{url}/approvals/{proposal.proposal_id}/approve",
                form={"csrf_token": token or ""},
            )
            assert forged.status == 403 and "nobody approves their own" in forged.text()
            page.get_by_role("button", name="Sign out").click()

            # Supervisor B approves: the gallery is erased.
            sign_in("supervisor")
            page.get_by_role("link", name="Approvals").click()
            row = page.locator(f"#proposal-{proposal.proposal_id}")
            expect(row).to_contain_text(REASON)
            expect(row).to_contain_text("admin (admin)")
            row.get_by_role("button", name="Approve").click()
            expect(page.get_by_role("status")).to_have_text(
                "Approved and done: erase gallery temporary."
            )
            expect(page.get_by_text("Nothing waits for approval.")).to_be_visible()
            assert core.galleries() == [OFFICE]

            # Every step is in the audit log, which B can read.
            page.get_by_role("link", name="Audit").click()
            records = page.locator("table.audit tbody")
            for action in ("change_proposed", "access_denied", "change_approved"):
                expect(records).to_contain_text(action)
        finally:
            context.close()
            browser.close()
    steps = [
        (e.action, e.user)
        for e in core.events()
        if e.action
        in (
            AuditAction.CHANGE_PROPOSED,
            AuditAction.ACCESS_DENIED,
            AuditAction.CHANGE_APPROVED,
            AuditAction.GALLERY_DELETED,
        )
    ]
    assert steps == [
        (AuditAction.CHANGE_PROPOSED, "admin"),
        (AuditAction.ACCESS_DENIED, "admin"),
        (AuditAction.CHANGE_APPROVED, "supervisor"),
        (AuditAction.GALLERY_DELETED, "supervisor"),
    ]
    erased = core.events(AuditAction.GALLERY_DELETED)[-1]
    assert erased.reason == REASON and "by admin, approved by supervisor" in (erased.detail or "")
