"""What the pages and the API do, written once: both call these, so both enforce the same
rules and write the same audit records.

Every function takes the ``Principal`` and checks the gallery list itself, so a route cannot
forget it; the route's ``PageAccess``/``ApiAccess`` has already checked the permission.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from runtime.accounts.roles import Permission
from runtime.audit import AuditAction
from runtime.errors import BadInputError
from runtime.gallery.service import (
    AGE_BANDS,
    DEFAULT_TOP_K,
    MAX_TOP_K,
    AgeBand,
    Candidate,
    Enrolled,
    Probe,
    SearchResult,
)
from runtime.web.audit_trail import record
from runtime.web.errors import ForbiddenError, NotFoundError
from runtime.web.principal import Principal
from runtime.web.state import WebState
from runtime.web.workspace import PendingEnrolment, SearchContext, Workspace

logger = logging.getLogger(__name__)

# Case numbers differ by force ("2024/001234", "VID-17-0042"): letters, digits and the usual
# separators, as the audit log keeps them (at most 64 characters).
CASE_NUMBER = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ./_#:()-]{0,63}")
MIN_REASON_CHARS = 10  # "why this photo, for this case": a word or two is not a reason
MAX_REASON_CHARS = 1000
MAX_GALLERY_FIELD_CHARS = 200  # the audit log's limit for its gallery field
DECISIONS = {"confirmed": "lead confirmed", "rejected": "rejected"}


# -- checks ----------------------------------------------------------------------------------


def check_case(case: str) -> str:
    case = case.strip()
    if not case:
        raise BadInputError("give the case number this search is for")
    if not CASE_NUMBER.fullmatch(case):
        raise BadInputError(
            "the case number may hold letters, digits, spaces and . / _ # : ( ) -, "
            "at most 64 characters"
        )
    return case


def check_reason(reason: str) -> str:
    reason = reason.strip()
    if len(reason) < MIN_REASON_CHARS:
        raise BadInputError(
            f"give the reason for this search (at least {MIN_REASON_CHARS} characters)"
        )
    if len(reason) > MAX_REASON_CHARS:
        raise BadInputError(f"the reason is longer than {MAX_REASON_CHARS} characters")
    if any(unicodedata.category(ch) == "Cc" and ch not in "\n\t\r" for ch in reason):
        raise BadInputError("the reason contains control characters; remove them")
    return reason.replace("\r\n", "\n").replace("\r", "\n")


def check_age_band(value: str) -> AgeBand:
    for band in AGE_BANDS:
        if value == band:
            return band
    raise BadInputError(f"the apparent age band must be one of {', '.join(AGE_BANDS)}")


def check_top_k(value: str | int | None) -> int:
    if value in (None, ""):
        return DEFAULT_TOP_K
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise BadInputError(f"top-k must be a whole number from 1 to {MAX_TOP_K}") from None
    if not 1 <= k <= MAX_TOP_K:
        raise BadInputError(f"top-k must be a whole number from 1 to {MAX_TOP_K}")
    return k


def check_face_index(value: str | int) -> int:
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise BadInputError("choose a face by its number") from None
    if index < 0:
        raise BadInputError("choose a face by its number")
    return index


def require_gallery(principal: Principal, permission: Permission, gallery: str) -> str:
    if not principal.may_use_gallery(permission, gallery):
        raise ForbiddenError(f"you may not use gallery {gallery!r}; ask an admin for access")
    return gallery


def usable_galleries(state: WebState, principal: Principal, permission: Permission) -> list[str]:
    """The existing galleries this user may use for ``permission``, in name order."""
    existing = [g.name for g in state.galleries.list_galleries()]
    return [g for g in existing if principal.may_use_gallery(permission, g)]


def choose_galleries(
    state: WebState, principal: Principal, galleries: Sequence[str]
) -> tuple[str, ...]:
    """The galleries asked for (all this user may search when none are), each checked."""
    allowed = usable_galleries(state, principal, Permission.SEARCH)
    chosen = list(dict.fromkeys(g for g in galleries if g)) or allowed
    for name in chosen:
        require_gallery(principal, Permission.SEARCH, name)
        if name not in allowed:
            raise NotFoundError(f"there is no gallery named {name!r}")
    if not chosen:
        raise ForbiddenError("you have no gallery to search; ask an admin for access")
    return tuple(chosen)


# -- search ----------------------------------------------------------------------------------


def start_search(
    state: WebState,
    principal: Principal,
    *,
    case: str,
    reason: str,
    age_band: str = "unknown",
    galleries: Sequence[str] = (),
) -> SearchContext:
    """A new search: case number and reason first, before any photo is accepted."""
    case = check_case(case)
    reason = check_reason(reason)
    band = check_age_band(age_band or "unknown")
    chosen = choose_galleries(state, principal, galleries)
    context = SearchContext(
        entry_id=Workspace.new_id(),
        owner=principal.owner,
        username=principal.username,
        case=case,
        reason=reason,
        age_band=band,
        galleries=chosen,
    )
    state.searches.put(context)
    return context


def load_search(state: WebState, principal: Principal, search_id: str) -> SearchContext:
    context = state.searches.get(principal.owner, search_id)
    if context is None:
        raise NotFoundError(
            "this search has expired or is not yours; start a new one with its case and reason"
        )
    return context


def attach_photo(
    state: WebState, principal: Principal, context: SearchContext, data: bytes
) -> Probe:
    """Analyse the probe photo in memory; it replaces any earlier photo of this search."""
    if not data:
        raise BadInputError("choose a photo to upload")
    if not state.searches.fits(len(data)):
        raise BadInputError("the photo is too large to hold for a search; send a smaller one")
    probe = state.galleries.analyse(data, name="the photo")
    context.image, context.probe = data, probe
    context.results.clear()
    context.decisions.clear()
    state.searches.put(context)  # re-weigh the workspace now that the photo is in it
    return probe


def require_probe(context: SearchContext) -> Probe:
    if context.probe is None or context.image is None:
        raise BadInputError("upload a photo for this search first")
    return context.probe


def run_search(
    state: WebState,
    principal: Principal,
    context: SearchContext,
    face_index: int,
    *,
    k: int = DEFAULT_TOP_K,
) -> SearchResult:
    """Rank candidates for one face, record the search, and only then return them."""
    probe = require_probe(context)
    probe.face(face_index)
    for name in context.galleries:  # access may have been withdrawn since the search began
        require_gallery(principal, Permission.SEARCH, name)
    result = state.galleries.search(
        probe, face_index, context.galleries, k=k, age_band=context.age_band
    )
    joined = ", ".join(context.galleries)
    record(
        state,
        principal,
        AuditAction.SEARCH,
        case=context.case,
        reason=context.reason,
        gallery=joined if len(joined) <= MAX_GALLERY_FIELD_CHARS else None,
        probe_sha256=probe.image_sha256,
        candidates=result.candidates,
        age_band=context.age_band,
        detail=_search_detail(context, probe, face_index, k, result),
    )
    context.results[face_index] = result
    return result


def rescore_search(
    state: WebState, principal: Principal, context: SearchContext, face_index: int, age_band: str
) -> SearchResult:
    """A face's candidates judged for another stated age band: the same scores, that band's
    threshold, score bands and wording. Nothing is searched again, but a new answer is
    revealed, so it is recorded like a search before it is shown; the band becomes the
    search's band for its other faces."""
    band = check_age_band(age_band)
    result = context.results.get(face_index)
    if result is None:
        raise NotFoundError("search this face first")
    probe = require_probe(context)
    for name in context.galleries:  # access may have been withdrawn since the search
        require_gallery(principal, Permission.SEARCH, name)
    rescored = state.galleries.rescore(result, band)
    joined = ", ".join(context.galleries)
    record(
        state,
        principal,
        AuditAction.SEARCH,
        case=context.case,
        reason=context.reason,
        gallery=joined if len(joined) <= MAX_GALLERY_FIELD_CHARS else None,
        probe_sha256=probe.image_sha256,
        candidates=rescored.candidates,
        age_band=band,
        detail=(
            f"re-scored, not searched again: face {face_index + 1} of {len(probe.faces)}; "
            f"age band {result.age_band} -> {band} (thresholds of {rescored.calibration.band}); "
            f"fmr {rescored.operating_fmr:g}; threshold {rescored.threshold:.4f}; "
            f"no match {str(rescored.no_match).lower()}"
        ),
    )
    context.age_band = band
    context.results[face_index] = rescored
    return rescored


def _search_detail(
    context: SearchContext, probe: Probe, face_index: int, k: int, result: SearchResult
) -> str:
    where = ",".join(c.gallery for c in result.candidates)
    return (
        f"face {face_index + 1} of {len(probe.faces)}; galleries {', '.join(context.galleries)}; "
        f"top-k {k}; fmr {result.operating_fmr:g}; age band {context.age_band} (thresholds "
        f"of {result.calibration.band}); threshold {result.threshold:.4f}; "
        f"no match {str(result.no_match).lower()}; candidate galleries {where or '-'}"
    )


def find_candidate(context: SearchContext, face_index: int, face_id: str) -> Candidate:
    result = context.results.get(face_index)
    if result is None:
        raise NotFoundError("search this face first")
    for candidate in result.candidates:
        if candidate.face_id == face_id:
            return candidate
    raise NotFoundError("that candidate is not among this search's results")


def record_decision(
    state: WebState,
    principal: Principal,
    context: SearchContext,
    face_index: int,
    face_id: str,
    decision: str,
) -> Candidate:
    """Mark a candidate as a confirmed lead or rejected. Recorded in the audit log only; never
    fed back into thresholds, templates or anything that learns."""
    if decision not in DECISIONS:
        raise BadInputError("a decision is 'confirmed' or 'rejected'")
    candidate = find_candidate(context, face_index, face_id)
    require_gallery(principal, Permission.SEARCH, candidate.gallery)
    probe = require_probe(context)
    record(
        state,
        principal,
        AuditAction.DECISION,
        case=context.case,
        reason=context.reason,
        gallery=candidate.gallery,
        probe_sha256=probe.image_sha256,
        candidates=[candidate],
        decision=DECISIONS[decision],
        subject_id=candidate.subject_id,
        detail=f"face {face_index + 1}; rank {candidate.rank}",
    )
    context.decisions[(face_index, face_id)] = DECISIONS[decision]
    return candidate


# -- enrolment and erasure -------------------------------------------------------------------


@dataclass(frozen=True)
class EnrolmentForm:
    gallery: str
    display_name: str
    legal_basis: str
    notes: str
    retention_until: date | None


def check_enrolment(
    principal: Principal,
    *,
    gallery: str,
    display_name: str,
    legal_basis: str,
    notes: str = "",
    retention_until: str = "",
    today: date | None = None,
) -> EnrolmentForm:
    if not gallery.strip():
        raise BadInputError("choose the gallery to enrol into")
    require_gallery(principal, Permission.ENROL, gallery)
    if not display_name.strip():
        raise BadInputError("give the subject's name as the gallery should show it")
    if not legal_basis.strip():
        raise BadInputError("give the legal basis for holding this subject (law, warrant, case)")
    until: date | None = None
    if retention_until.strip():
        try:
            until = date.fromisoformat(retention_until.strip())
        except ValueError:
            raise BadInputError("give the retention date as YYYY-MM-DD") from None
        if until <= (today or date.today()):
            raise BadInputError("the retention date must be in the future")
    return EnrolmentForm(gallery, display_name.strip(), legal_basis.strip(), notes.strip(), until)


def prepare_enrolment(
    state: WebState, principal: Principal, form: EnrolmentForm, data: bytes
) -> PendingEnrolment:
    """Analyse the photo and hold it (in memory) while a face is chosen."""
    if not data:
        raise BadInputError("choose a photo of the subject")
    probe = state.galleries.analyse(data, name="the photo")
    if not probe.faces:
        raise BadInputError("no face found in the photo; use a clearer, frontal photo")
    pending = PendingEnrolment(
        entry_id=Workspace.new_id(),
        owner=principal.owner,
        gallery=form.gallery,
        display_name=form.display_name,
        legal_basis=form.legal_basis,
        notes=form.notes,
        retention_until=form.retention_until,
        image=data,
        probe=probe,
    )
    state.enrolments.put(pending)
    return pending


def load_enrolment(state: WebState, principal: Principal, entry_id: str) -> PendingEnrolment:
    pending = state.enrolments.get(principal.owner, entry_id)
    if pending is None:
        raise NotFoundError("this enrolment has expired or is not yours; start again")
    return pending


def complete_enrolment(
    state: WebState,
    principal: Principal,
    pending: PendingEnrolment,
    face_index: int,
    *,
    allow_duplicate: bool = False,
) -> Enrolled:
    """Enrol the chosen face (quality gate, duplicate check), then record it."""
    require_gallery(principal, Permission.ENROL, pending.gallery)
    pending.probe.face(face_index)
    enrolled = state.galleries.enroll(
        pending.gallery,
        display_name=pending.display_name,
        legal_basis=pending.legal_basis,
        enrolled_by=principal.username,
        image_bytes=pending.image,
        face_index=face_index,
        notes=pending.notes,
        retention_until=pending.retention_until,
        allow_duplicate=allow_duplicate,
    )
    state.enrolments.remove(pending.entry_id)
    record(
        state,
        principal,
        AuditAction.ENROLL,
        gallery=pending.gallery,
        probe_sha256=enrolled.faces[0].source_sha256 if enrolled.faces else None,
        subject_id=enrolled.subject.subject_id,
        detail="enrolled despite a possible duplicate" if allow_duplicate else None,
    )
    return enrolled


def add_to_subject(
    state: WebState,
    principal: Principal,
    pending: PendingEnrolment,
    face_index: int,
    subject_id: str,
) -> str:
    """Add the chosen face to an existing subject (the duplicate check's other answer)."""
    require_gallery(principal, Permission.ENROL, pending.gallery)
    pending.probe.face(face_index)
    state.galleries.subject(pending.gallery, subject_id)
    face = state.galleries.add_face(
        pending.gallery, subject_id, pending.image, face_index=face_index
    )
    state.enrolments.remove(pending.entry_id)
    record(
        state,
        principal,
        AuditAction.ENROLL,
        gallery=pending.gallery,
        probe_sha256=face.source_sha256,
        subject_id=subject_id,
        detail=f"face {face.face_id} added to an enrolled subject",
    )
    return face.face_id


def delete_subject(
    state: WebState, principal: Principal, gallery: str, subject_id: str, *, reason: str
) -> None:
    """Erase a subject (store, index, thumbnails). Investigators erase in their galleries;
    supervisors erase subjects past their retention date in any gallery."""
    subject = state.galleries.subject(gallery, subject_id)
    expired = subject.retention_until is not None and subject.retention_until < date.today()
    by_retention = principal.may(Permission.RETENTION) and expired
    if not by_retention:
        require_gallery(principal, Permission.SUBJECTS_DELETE, gallery)
    reason = reason.strip()
    if not reason:
        raise BadInputError("give the reason for erasing this subject")
    state.galleries.delete_subject(gallery, subject_id)
    record(
        state,
        principal,
        AuditAction.DELETE_SUBJECT,
        gallery=gallery,
        subject_id=subject_id,
        reason=reason[:MAX_REASON_CHARS],
        detail="retention period over" if by_retention else None,
    )
