"""The two-person rule: what cannot be undone or widens access waits for a second person.

Covered: erasing a whole gallery, granting a user access to a gallery, creating an admin (or
making one of an existing user), purging a case before its retention date, putting another
embedding model in use (``services/models.py``). Every door asks
here; with ``security.dual_control`` on (the default) the change becomes a ``Proposal``
(``change_proposed``), which a different admin or supervisor approves (``change_approved``,
then the change itself is carried out through the core service, recorded under the
approver's name with the proposal and proposer in its detail) or rejects
(``change_rejected``; the proposer may withdraw their own). Nobody approves their own proposal
or one that gives them access: the attempt is refused and recorded as ``access_denied``.
Proposals expire after ``security.proposal_ttl_days``.

With dual control off (a single-user lab box) the change runs at once and its record says
"dual control off". Nobody grants themselves access, whatever the setting.

The covered operations refuse to run without a ``Consent`` naming the same change, which
only this module issues (``edgeid.runtime.services.consent``): no front end can skip this.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from edgeid.runtime.accounts.roles import Permission, Role
from edgeid.runtime.accounts.users import User
from edgeid.runtime.audit.actor import OS_ACTOR_PREFIX, SYSTEM, Actor
from edgeid.runtime.audit.events import AuditAction
from edgeid.runtime.audit.justification import Justification, check_reason
from edgeid.runtime.audit.recorder import Recorder
from edgeid.runtime.cases.records import CaseMeta
from edgeid.runtime.errors import BadInputError, EdgeidError
from edgeid.runtime.services.accounts import AccountAdmin
from edgeid.runtime.services.caller import Caller, same_person
from edgeid.runtime.services.cases import AccountableCases
from edgeid.runtime.services.consent import ChangeKind, Consent, issue
from edgeid.runtime.services.galleries import AccountableGalleries, GalleryErased
from edgeid.runtime.services.models import ModelAdmin
from edgeid.runtime.services.proposals import (
    MAX_PENDING,
    Proposal,
    ProposalStatus,
    ProposalStore,
    describe,
    new_proposal_id,
)
from edgeid.runtime.vault.crypto import Clock, utc_now

logger = logging.getLogger(__name__)

DEFAULT_TTL = timedelta(days=7)
# The permission the proposer must still hold when their proposal is approved.
NEEDED: dict[ChangeKind, Permission | None] = {
    ChangeKind.ERASE_GALLERY: Permission.GALLERIES,
    ChangeKind.GRANT_GALLERIES: Permission.USERS,
    ChangeKind.CREATE_ADMIN: Permission.USERS,
    ChangeKind.PROMOTE_ADMIN: Permission.USERS,
    ChangeKind.PURGE_CASE: None,  # the case's owner; checked when proposed
    ChangeKind.USE_MODEL: Permission.SETTINGS,
}
# Changes that hand their target access: the approver may not be that target.
GIVES_ACCESS = frozenset({ChangeKind.GRANT_GALLERIES, ChangeKind.PROMOTE_ADMIN})


class NotPendingError(BadInputError):
    """The proposal was decided already or has expired."""


class UnavailableHereError(EdgeidError):
    """This door cannot carry out that kind of change (the web without case ingest)."""


@dataclass(frozen=True)
class Outcome:
    """What asking for (or approving) a covered change did: ``done`` False means it waits
    for a second person as ``proposal``; True means it was carried out (``proposal`` is the
    one approved, or None where dual control is off)."""

    kind: ChangeKind
    summary: str
    done: bool
    proposal: Proposal | None = None
    user: User | None = None
    one_time_password: str | None = None  # a new admin's, shown once to whoever made it
    erased: GalleryErased | None = None
    case: CaseMeta | None = None

    @property
    def model_changed(self) -> bool:
        """Another embedding model is now in use: the galleries are to be re-embedded."""
        return self.done and self.kind is ChangeKind.USE_MODEL


@dataclass(frozen=True)
class _Change:
    kind: ChangeKind
    target: str
    galleries: tuple[str, ...] = ()
    case_number: str | None = None

    def summary(self) -> str:
        return describe(self.kind, self.target, self.galleries, self.case_number)

    def as_proposal(
        self, proposal_id: str, proposer: Actor, reason: str, created: datetime
    ) -> Proposal:
        return Proposal(
            proposal_id=proposal_id,
            kind=self.kind,
            target=self.target,
            galleries=self.galleries,
            case_number=self.case_number,
            proposer=proposer.user,
            proposer_role=proposer.role,
            reason=reason,
            created_at=created,
        )


class Approvals:
    """See the module docstring. ``galleries`` and ``cases`` are optional so that a door that
    opens only the accounts (``edgeid users``) can still propose and approve account changes."""

    def __init__(
        self,
        store: ProposalStore,
        recorder: Recorder,
        accounts: AccountAdmin,
        *,
        galleries: AccountableGalleries | None = None,
        cases: AccountableCases | None = None,
        models: ModelAdmin | None = None,
        dual_control: bool = True,
        ttl: timedelta = DEFAULT_TTL,
        clock: Clock = utc_now,
    ) -> None:
        self.store = store
        self.recorder = recorder
        self.accounts = accounts
        self.galleries = galleries
        self.cases = cases
        self.models = models
        self.dual_control = dual_control
        self.ttl = ttl
        self._clock = clock

    # -- asking ------------------------------------------------------------------------------

    def erase_gallery(self, caller: Caller, name: str, *, reason: str, where: str) -> Outcome:
        galleries = self._need_galleries()
        galleries.require(caller, Permission.GALLERIES, None, where=where)
        reason = check_reason(reason)
        galleries.galleries.gallery_info(name)  # a missing gallery is refused before any record
        return self._ask(caller, _Change(ChangeKind.ERASE_GALLERY, name), reason, where)

    def grant_galleries(
        self,
        caller: Caller,
        username: str,
        galleries: Sequence[str],
        *,
        reason: str | None,
        where: str,
    ) -> Outcome | None:
        """None when the user holds every one of ``galleries`` already."""
        self.accounts.require(caller, where=where, resource=f"user {username}")
        user = self.accounts.users.require(username)
        added = [g for g in self.accounts.known_galleries(galleries) if g not in user.galleries]
        if not added:
            return None
        self.accounts.refuse_self(caller, username, what="grant gallery access", where=where)
        change = _Change(ChangeKind.GRANT_GALLERIES, username, tuple(added))
        return self._ask(caller, change, reason, where)

    def create_admin(
        self, caller: Caller, username: str, *, reason: str | None, where: str
    ) -> Outcome:
        self.accounts.require(caller, where=where, resource=f"user {username}")
        self.accounts.check_new(username)
        return self._ask(caller, _Change(ChangeKind.CREATE_ADMIN, username), reason, where)

    def promote_admin(
        self, caller: Caller, username: str, *, reason: str | None, where: str
    ) -> Outcome | None:
        """None when the user is an admin already."""
        self.accounts.require(caller, where=where, resource=f"user {username}")
        if self.accounts.users.require(username).role is Role.ADMIN:
            return None
        self.accounts.refuse_self(caller, username, what="change the role", where=where)
        return self._ask(caller, _Change(ChangeKind.PROMOTE_ADMIN, username), reason, where)

    def purge_case(self, caller: Caller, case_ref: str, *, reason: str, where: str) -> Outcome:
        """A case past its retention date is purged at once; before it, two people agree."""
        cases = self._need_cases()
        reason = check_reason(reason)
        meta = cases.find(caller, case_ref, where=where)
        if cases.past_retention(meta, self._clock().date()):
            purged = cases.purge(caller, meta.case_id, reason, where=where)
            return Outcome(ChangeKind.PURGE_CASE, f"purge case {meta.number}", True, case=purged)
        change = _Change(ChangeKind.PURGE_CASE, meta.case_id, case_number=meta.number)
        return self._ask(caller, change, reason, where)

    def use_model(self, caller: Caller, name: str, *, reason: str, where: str) -> Outcome:
        """Put another embedding model in use; refused at once for a model that cannot be
        used (not verified, not an embedder, no calibration) or is in use already."""
        models = self._need_models()
        models.require(caller, where=where, name=name)
        reason = check_reason(reason)
        models.check_usable(name)
        if models.in_use() == name:
            raise BadInputError(f"model {name} is in use already")
        return self._ask(caller, _Change(ChangeKind.USE_MODEL, name), reason, where)

    # -- deciding ----------------------------------------------------------------------------

    def pending(self, caller: Caller) -> list[Proposal]:
        """Proposals waiting, oldest first: all of them for those who may approve, else the
        caller's own. Expired ones are closed (and recorded) on the way."""
        self._expire_due()
        waiting = [p for p in self.store.all().values() if p.status is ProposalStatus.PENDING]
        if not caller.may(Permission.APPROVALS):
            waiting = [p for p in waiting if same_person(p.proposer, caller.actor.user)]
        return sorted(waiting, key=lambda p: p.created_at)

    def now(self) -> datetime:
        return self._clock()

    def is_expired(self, proposal: Proposal) -> bool:
        return self._clock() >= proposal.expires_at(self.ttl)

    def approve(self, caller: Caller, proposal_id: str, *, where: str) -> Outcome:
        """A second person's approval: recorded, then the change is carried out."""
        self._require_approver(caller, proposal_id, where=where)
        proposal = self._open(proposal_id)
        if proposal.kind is ChangeKind.USE_MODEL:
            self._need_models()  # before anything is decided: the web cannot carry it out
        resource = f"proposal {proposal_id}"
        if same_person(caller.actor.user, proposal.proposer):
            raise self.recorder.refused(
                caller.actor,
                "nobody approves their own proposal; another admin or supervisor must",
                where=where,
                resource=resource,
                why="approving one's own proposal",
            )
        if proposal.kind in GIVES_ACCESS and same_person(caller.actor.user, proposal.target):
            raise self.recorder.refused(
                caller.actor,
                "nobody approves access for themselves; another admin or supervisor must",
                where=where,
                resource=resource,
                why="approving access for oneself",
            )
        if not self._proposer_still_may(proposal):
            raise BadInputError(
                f"{proposal.proposer} may no longer {proposal.summary()}; reject the proposal"
            )
        claimed = self._decide(proposal_id, ProposalStatus.APPROVED, caller.actor)
        try:
            self.recorder.record(
                caller.actor,
                AuditAction.CHANGE_APPROVED,
                reason=proposal.reason,
                gallery=self._gallery_of(proposal),
                detail=f"proposal {proposal_id} by {proposal.proposer}: {proposal.summary()}",
            )
        except BaseException:
            self.store.change(lambda ps: ps[proposal_id].reopened())
            raise
        consent = issue(
            proposal.kind,
            proposal.target,
            reason=proposal.reason,
            proposer=Actor(proposal.proposer, proposal.proposer_role),
            approver=caller.actor,
            proposal_id=proposal_id,
            galleries=proposal.galleries,
        )
        change = _Change(proposal.kind, proposal.target, proposal.galleries, proposal.case_number)
        try:
            outcome = self._carry_out(caller, change, consent, proposal.reason, where)
        except BaseException:
            self.store.change(lambda ps: replace(ps[proposal_id], status=ProposalStatus.FAILED))
            logger.warning("approved proposal %s could not be carried out", proposal_id)
            raise
        return replace(outcome, proposal=claimed)

    def reject(self, caller: Caller, proposal_id: str, *, where: str) -> Proposal:
        """An approver's rejection, or the proposer withdrawing their own proposal."""
        proposal = self.store.get(proposal_id)
        own = same_person(caller.actor.user, proposal.proposer)
        if not own:
            self._require_approver(caller, proposal_id, where=where)
        proposal = self._open(proposal_id)
        decided = self._decide(proposal_id, ProposalStatus.REJECTED, caller.actor)
        how = "withdrawn by its proposer" if own else "rejected"
        try:
            self.recorder.record(
                caller.actor,
                AuditAction.CHANGE_REJECTED,
                gallery=self._gallery_of(proposal),
                detail=f"proposal {proposal_id} by {proposal.proposer}: {proposal.summary()}; "
                f"{how}",
            )
        except BaseException:
            self.store.change(lambda ps: ps[proposal_id].reopened())
            raise
        return decided

    # -- internals ---------------------------------------------------------------------------

    def _ask(self, caller: Caller, change: _Change, reason: str | None, where: str) -> Outcome:
        if not self.dual_control:
            consent = issue(
                change.kind,
                change.target,
                reason=reason or "",
                proposer=caller.actor,
                approver=None,
                proposal_id=None,
                galleries=change.galleries,
            )
            return self._carry_out(caller, change, consent, reason or "", where)
        return self._propose(caller, change, check_reason(reason), where)

    def _propose(self, caller: Caller, change: _Change, reason: str, where: str) -> Outcome:
        self._expire_due()
        now = self._clock()
        proposal = change.as_proposal(new_proposal_id(), caller.actor, reason, now)

        def add(proposals: dict[str, Proposal]) -> Proposal:
            waiting = [p for p in proposals.values() if p.status is ProposalStatus.PENDING]
            for other in waiting:
                if (other.kind, other.target, other.galleries) == (
                    change.kind,
                    change.target,
                    change.galleries,
                ):
                    raise BadInputError(
                        f"proposal {other.proposal_id} asks for this already; approve or reject it"
                    )
            if len(waiting) >= MAX_PENDING:
                raise BadInputError(
                    f"{MAX_PENDING} proposals are waiting; decide some before proposing more"
                )
            return proposal

        self.store.change(add)
        try:
            self.recorder.record(
                caller.actor,
                AuditAction.CHANGE_PROPOSED,
                justification=Justification.of(change.case_number, reason)
                if change.case_number
                else None,
                reason=None if change.case_number else reason,
                gallery=self._gallery_of(proposal),
                detail=f"proposal {proposal.proposal_id}: {proposal.summary()}; waits for a "
                f"second person until {proposal.expires_at(self.ttl):%Y-%m-%d %H:%M} UTC",
            )
        except BaseException:
            self.store.remove(proposal.proposal_id)
            raise
        return Outcome(change.kind, proposal.summary(), False, proposal=proposal)

    def _carry_out(
        self, caller: Caller, change: _Change, consent: Consent, reason: str, where: str
    ) -> Outcome:
        kind, target = change.kind, change.target
        summary = change.summary()
        if kind is ChangeKind.ERASE_GALLERY:
            erased = self._need_galleries().delete_gallery(
                caller, target, reason=reason, where=where, consent=consent
            )
            self.accounts.forget_gallery(target)
            return Outcome(kind, summary, True, erased=erased)
        if kind is ChangeKind.GRANT_GALLERIES:
            user = self.accounts.grant_galleries(
                caller, target, change.galleries, where=where, consent=consent
            )
            return Outcome(kind, summary, True, user=user)
        if kind is ChangeKind.CREATE_ADMIN:
            user, password = self.accounts.create_user(
                caller, target, Role.ADMIN, where=where, consent=consent
            )
            return Outcome(kind, summary, True, user=user, one_time_password=password)
        if kind is ChangeKind.PROMOTE_ADMIN:
            user = self.accounts.change_role(
                caller, target, Role.ADMIN, where=where, consent=consent
            )
            return Outcome(kind, summary, True, user=user)
        if kind is ChangeKind.USE_MODEL:
            self._need_models().use(caller, target, reason=reason, where=where, consent=consent)
            return Outcome(kind, summary, True)
        meta = self._need_cases().purge(caller, target, reason, where=where, consent=consent)
        return Outcome(kind, summary, True, case=meta)

    def _require_approver(self, caller: Caller, proposal_id: str, *, where: str) -> None:
        if caller.may(Permission.APPROVALS):
            return
        raise self.recorder.refused(
            caller.actor,
            "only admins and supervisors decide proposals (needs approvals)",
            where=where,
            resource=f"proposal {proposal_id}",
            why="needs approvals",
        )

    def _open(self, proposal_id: str) -> Proposal:
        """The proposal, if it still waits; an expired one is closed and refused."""
        proposal = self.store.get(proposal_id)
        if proposal.status is ProposalStatus.PENDING and self.is_expired(proposal):
            self._expire(proposal)
            proposal = self.store.get(proposal_id)
        if proposal.status is not ProposalStatus.PENDING:
            raise NotPendingError(
                f"proposal {proposal_id} is {proposal.status.value}; nothing to decide"
                + ("; propose it again" if proposal.status is ProposalStatus.EXPIRED else "")
            )
        return proposal

    def _decide(self, proposal_id: str, status: ProposalStatus, by: Actor) -> Proposal:
        """Claim a pending proposal under the store's lock: of two people deciding at once,
        one wins and the other is told it was decided."""

        def claim(proposals: dict[str, Proposal]) -> Proposal:
            current = proposals[proposal_id]
            if current.status is not ProposalStatus.PENDING:
                raise NotPendingError(f"proposal {proposal_id} was {current.status.value} already")
            return current.decided(status, by.user, self._clock())

        return self.store.change(claim)

    def _expire_due(self) -> None:
        for proposal in list(self.store.all().values()):
            if proposal.status is ProposalStatus.PENDING and self.is_expired(proposal):
                self._expire(proposal)

    def _expire(self, proposal: Proposal) -> None:
        try:
            self._decide(proposal.proposal_id, ProposalStatus.EXPIRED, SYSTEM)
        except NotPendingError:
            return
        self.recorder.record(
            SYSTEM,
            AuditAction.CHANGE_REJECTED,
            gallery=self._gallery_of(proposal),
            detail=f"proposal {proposal.proposal_id} by {proposal.proposer}: "
            f"{proposal.summary()}; expired unapproved after {self.ttl.days} days",
        )

    def _proposer_still_may(self, proposal: Proposal) -> bool:
        """A proposer since disabled or moved to a role without the permission cannot have
        their proposal carried out on their authority."""
        if proposal.proposer.startswith(OS_ACTOR_PREFIX):
            return True  # the operator at the shell
        user = self.accounts.users.get(proposal.proposer)
        if user is None or user.disabled:
            return False
        needed = NEEDED[proposal.kind]
        return needed is None or needed in user.permissions

    @staticmethod
    def _gallery_of(proposal: Proposal) -> str | None:
        if proposal.kind is ChangeKind.ERASE_GALLERY:
            return proposal.target
        if proposal.kind is ChangeKind.GRANT_GALLERIES:
            joined = ", ".join(proposal.galleries)
            return joined if len(joined) <= 200 else f"{len(proposal.galleries)} galleries"
        return None

    def _need_galleries(self) -> AccountableGalleries:
        if self.galleries is None:
            raise UnavailableHereError("this command does not open the galleries")
        return self.galleries

    def _need_models(self) -> ModelAdmin:
        if self.models is None:
            raise UnavailableHereError(
                "the embedding model is changed at the shell: edgeid approvals approve (service "
                "stopped), then the galleries are re-embedded"
            )
        return self.models

    def _need_cases(self) -> AccountableCases:
        if self.cases is None:
            raise UnavailableHereError(
                "cases are not open here; approve it with edgeid approvals approve (service "
                "stopped)"
            )
        return self.cases
