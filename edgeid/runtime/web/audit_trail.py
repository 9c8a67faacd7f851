"""The web layer's shorthand for audit records the core does not write itself (sign-in,
tokens, audit page views): every record still goes through the core's ``Recorder``.

Events carry user names, roles, case numbers, reasons, random subject and face ids and the
probe's sha256; never an image, a template or the name of an enrolled person. An event that
cannot be appended stops the operation that needed it.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgeid.runtime.audit import AuditAction
from edgeid.runtime.audit.actor import Actor
from edgeid.runtime.audit.justification import Justification
from edgeid.runtime.gallery.service import Candidate
from edgeid.runtime.services.galleries import audit_candidates
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.state import WebState

UNKNOWN_ROLE = "none"  # a failed login under a name no user has


def record(
    state: WebState,
    principal: Principal,
    action: AuditAction,
    *,
    justification: Justification | None = None,
    gallery: str | None = None,
    probe_sha256: str | None = None,
    candidates: Sequence[Candidate] = (),
    decision: str | None = None,
    subject_id: str | None = None,
    age_band: str | None = None,
    detail: str | None = None,
) -> None:
    state.recorder.record(
        principal.actor,
        action,
        justification=justification,
        gallery=gallery,
        probe_sha256=probe_sha256,
        candidates=audit_candidates(candidates),
        decision=decision,
        subject_id=subject_id,
        age_band=age_band,
        detail=detail,
    )


def record_as(
    state: WebState, user: str, role: str, action: AuditAction, *, detail: str | None = None
) -> None:
    """For who is not signed in yet (a failed login names the user name it tried)."""
    state.recorder.record(Actor(user, role), action, detail=detail)
