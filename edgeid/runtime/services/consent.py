"""Consent for a change under the two-person rule, which only ``approvals.py`` issues.

The operations that cannot be undone or that widen access (``AccountableGalleries.
delete_gallery``, an early ``AccountableCases.purge``, ``AccountAdmin`` making an admin or
granting gallery access) take a ``Consent`` and refuse to run without one that names the same
change. A ``Consent`` is issued only by ``edgeid.runtime.services.approvals``: after a second person
approved a proposal, or at once where ``security.dual_control`` is off (the record then says
so). No front end imports this module (an import-linter contract), so none can issue one.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from edgeid.runtime.audit.actor import Actor
from edgeid.runtime.compat import StrEnum
from edgeid.runtime.errors import AccessDeniedError

DUAL_CONTROL_OFF = "dual control off"  # in the detail of each record made without a second person


class ChangeKind(StrEnum):
    """What the two-person rule covers."""

    ERASE_GALLERY = "erase_gallery"
    GRANT_GALLERIES = "grant_galleries"
    CREATE_ADMIN = "create_admin"
    PROMOTE_ADMIN = "promote_admin"
    PURGE_CASE = "purge_case"
    USE_MODEL = "use_model"  # another embedding model: changes every search's answers


class DualControlError(AccessDeniedError):
    """A covered change was attempted without a matching, unspent consent."""


_ISSUER = object()  # only ``issue`` holds it; a Consent made any other way refuses to exist


@dataclass
class Consent:
    """One covered change a caller may now make, once.

    ``approver`` is None where dual control is off (the proposer acts alone, and is the caller).
    """

    kind: ChangeKind
    target: str  # the gallery's name, the user's name or the case's id
    galleries: tuple[str, ...]  # granted galleries (GRANT_GALLERIES only)
    reason: str
    proposer: Actor
    approver: Actor | None
    proposal_id: str | None
    issuer: object = field(repr=False, compare=False)
    _spent: bool = field(default=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.issuer is not _ISSUER:
            raise DualControlError("a consent is issued only by the approvals service")

    @property
    def approved(self) -> bool:
        """A second person approved it (as opposed to dual control being off)."""
        return self.approver is not None

    def people(self) -> tuple[str, ...]:
        """Everyone who took part: none of them may gain access through it."""
        return (self.proposer.user,) + ((self.approver.user,) if self.approver else ())

    def detail(self) -> str:
        """What the change's own audit record says about who agreed to it."""
        if self.approver is None:
            return DUAL_CONTROL_OFF
        return (
            f"proposal {self.proposal_id} by {self.proposer.user}, approved by {self.approver.user}"
        )


def issue(
    kind: ChangeKind,
    target: str,
    *,
    reason: str,
    proposer: Actor,
    approver: Actor | None,
    proposal_id: str | None,
    galleries: Sequence[str] = (),
) -> Consent:
    """For ``edgeid.runtime.services.approvals`` only (see the module docstring)."""
    return Consent(kind, target, tuple(galleries), reason, proposer, approver, proposal_id, _ISSUER)


def redeem(
    consent: Consent | None,
    kind: ChangeKind,
    target: str,
    *,
    galleries: Sequence[str] = (),
    what: str,
) -> Consent:
    """The consent, spent, if it names this change; else ``DualControlError``."""
    if consent is None:
        raise DualControlError(
            f"{what} needs a second person's approval (two-person rule); propose it instead"
        )
    matches = (
        consent.kind is kind
        and consent.target == target
        and set(galleries) <= set(consent.galleries)
    )
    with consent._lock:
        if not matches or consent._spent:
            raise DualControlError(f"the approval given does not cover {what}; propose it")
        consent._spent = True
    return consent
