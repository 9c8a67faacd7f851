"""The one place the web layer writes to the audit log.

Events carry user names, roles, case numbers, reasons, random subject and face ids and the
probe's sha256; never an image, a template or the name of an enrolled person. An event that
cannot be appended stops the operation that needed it: a search whose record failed shows no
candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

from runtime.audit import AuditAction, AuditEvent
from runtime.audit import Candidate as AuditCandidate
from runtime.gallery.service import Candidate
from runtime.web.principal import Principal
from runtime.web.state import WebState

UNKNOWN_ROLE = "none"  # a failed login under a name no user has


def record(
    state: WebState,
    principal: Principal,
    action: AuditAction,
    *,
    case: str | None = None,
    reason: str | None = None,
    gallery: str | None = None,
    probe_sha256: str | None = None,
    candidates: Sequence[Candidate] = (),
    decision: str | None = None,
    subject_id: str | None = None,
    age_band: str | None = None,
    detail: str | None = None,
) -> None:
    record_as(
        state,
        principal.username,
        principal.role.value,
        action,
        case=case,
        reason=reason,
        gallery=gallery,
        probe_sha256=probe_sha256,
        candidates=candidates,
        decision=decision,
        subject_id=subject_id,
        age_band=age_band,
        detail=_via(principal, detail),
    )


def record_as(
    state: WebState,
    user: str,
    role: str,
    action: AuditAction,
    *,
    case: str | None = None,
    reason: str | None = None,
    gallery: str | None = None,
    probe_sha256: str | None = None,
    candidates: Sequence[Candidate] = (),
    decision: str | None = None,
    subject_id: str | None = None,
    age_band: str | None = None,
    detail: str | None = None,
) -> None:
    state.audit.append(
        AuditEvent(
            user=user,
            role=role,
            action=action,
            case=case,
            reason=reason,
            gallery=gallery,
            probe_sha256=probe_sha256,
            candidates=tuple(
                AuditCandidate(c.subject_id, c.face_id, c.score, c.band.value, c.rank)
                for c in candidates
            ),
            decision=decision,
            subject_id=subject_id,
            age_band=age_band,
            detail=detail,
        )
    )


def _via(principal: Principal, detail: str | None) -> str | None:
    """API calls name their token, so a leaked token's use can be traced and revoked."""
    if principal.via != "token":
        return detail
    marker = f"via API token {principal.token_id}"
    return f"{detail}; {marker}" if detail else marker
