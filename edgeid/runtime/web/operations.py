"""What the pages and the API do, written once: both call these, so both enforce the same
rules and write the same audit records.

Every function takes the ``Principal`` and checks the gallery list itself, so a route cannot
forget it; the route's ``PageAccess``/``ApiAccess`` has already checked the permission.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.audit.justification import Justification
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.records import MAX_AGE_YEARS
from edgeid.runtime.gallery.service import (
    AGE_BANDS,
    DEFAULT_TOP_K,
    MAX_TOP_K,
    AgeBand,
    Enrolled,
    Probe,
)
from edgeid.runtime.services.search_history import INVESTIGATION, StoredSearch
from edgeid.runtime.services.searches import check_mode
from edgeid.runtime.web import work_context
from edgeid.runtime.web.errors import ForbiddenError, NotFoundError
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.state import WebState
from edgeid.runtime.web.workspace import PendingEnrolment, SearchContext, Workspace

logger = logging.getLogger(__name__)

# -- checks ----------------------------------------------------------------------------------


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


def require_gallery(
    state: WebState, principal: Principal, permission: Permission, gallery: str, *, where: str
) -> str:
    """Allowed, or refused by the core (which records the refusal)."""
    state.accountable.require(principal, permission, gallery, where=where)
    return gallery


def usable_galleries(state: WebState, principal: Principal, permission: Permission) -> list[str]:
    """The existing galleries this user may use for ``permission``, in name order."""
    return state.accountable.usable(principal, permission)


def choose_galleries(
    state: WebState, principal: Principal, galleries: Sequence[str], *, where: str
) -> tuple[str, ...]:
    """The galleries asked for (all this user may search when none are), each checked."""
    allowed = usable_galleries(state, principal, Permission.SEARCH)
    chosen = list(dict.fromkeys(g for g in galleries if g)) or allowed
    for name in chosen:
        require_gallery(state, principal, Permission.SEARCH, name, where=where)
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
    mode: str | None = None,
) -> SearchContext:
    """A new search: case number, reason and result mode first, before any photo is
    accepted (identification unless investigation is chosen)."""
    why = Justification.of(case, reason)
    band = check_age_band(age_band or "unknown")
    chosen_mode = check_mode(mode)
    chosen = choose_galleries(state, principal, galleries, where="start a search")
    context = SearchContext(
        entry_id=Workspace.new_id(),
        owner=principal.owner,
        username=principal.username,
        case=why.case,
        reason=why.reason,
        age_band=band,
        galleries=chosen,
        mode=chosen_mode,
    )
    state.searches.put(context)
    return context


def load_search(state: WebState, principal: Principal, search_id: str) -> SearchContext:
    context = state.searches.get(principal.owner, search_id)
    if context is None and state.searches.exists(search_id):
        state.recorder.denied(
            principal.actor,
            where="open a search",
            resource=f"search {search_id}",
            why="the search belongs to another session or user",
        )
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
    probe = state.accountable.analyse(data, name="the photo")
    context.image, context.probe = data, probe
    context.results.clear()
    context.records.clear()
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
) -> StoredSearch:
    """Search for one face in the search's mode; the core records it (mode included) before
    the candidates come back and keeps it in the user's history."""
    probe = require_probe(context)
    probe.face(face_index)
    # The core checks access again (it may have been withdrawn since the search began).
    stored, result = state.history.search(
        principal,
        justification(context),
        probe,
        face_index,
        context.galleries,
        mode=context.mode,
        k=k,
        age_band=context.age_band,
        where="search",
        workspace_id=context.entry_id,
    )
    context.records[face_index] = stored.search_id
    context.results[face_index] = result
    work_context.adopt(principal, justification(context))
    return stored


def justification(context: SearchContext) -> Justification:
    return Justification(context.case, context.reason)


def rescore_search(
    state: WebState, principal: Principal, context: SearchContext, face_index: int, age_band: str
) -> StoredSearch:
    """A face's result judged for another stated age band; the band becomes the search's band
    for its other faces. An investigation's same candidates take that band's threshold, score
    bands and wording (nothing searched again, but recorded like a search, since a new
    answer is revealed). An identification searches again with that band: the candidates
    below the old threshold were never revealed, so there is nothing to re-judge."""
    band = check_age_band(age_band)
    search_id = context.records.get(face_index)
    result = context.results.get(face_index)
    if search_id is None or result is None:
        raise NotFoundError("search this face first")
    probe = require_probe(context)
    if context.mode != INVESTIGATION:
        context.age_band = band
        return run_search(state, principal, context, face_index)
    stored, rescored = state.history.rescore(
        principal, search_id, probe, result, band, where="re-score"
    )
    context.age_band = band
    context.results[face_index] = rescored
    return stored


# -- enrolment and erasure -------------------------------------------------------------------


@dataclass(frozen=True)
class EnrolmentForm:
    gallery: str
    display_name: str
    legal_basis: str
    notes: str
    retention_until: date | None
    age_at_capture: int | None = None


def check_age_at_capture(value: str | None) -> int | None:
    """The optional age at capture of a form: empty, or whole years."""
    text = (value or "").strip()
    if not text:
        return None
    if not text.isdigit() or not 0 <= int(text) <= MAX_AGE_YEARS:
        raise BadInputError(
            f"give the age when the photo was taken in whole years (0 to {MAX_AGE_YEARS}), "
            "or leave it empty"
        )
    return int(text)


def check_retention(value: str | None, today: date | None = None) -> date | None:
    """An optional retention date (YYYY-MM-DD), which must lie in the future."""
    if not value or not value.strip():
        return None
    try:
        until = date.fromisoformat(value.strip())
    except ValueError:
        raise BadInputError(
            "write the retention date as year-month-day, for example 2027-01-31"
        ) from None
    if until <= (today or date.today()):
        raise BadInputError("the retention date must be in the future")
    return until


def check_enrolment(
    state: WebState,
    principal: Principal,
    *,
    gallery: str,
    display_name: str,
    legal_basis: str,
    notes: str = "",
    retention_until: str = "",
    age_at_capture: str = "",
    today: date | None = None,
) -> EnrolmentForm:
    if not gallery.strip():
        raise BadInputError("choose the gallery to enrol into")
    require_gallery(state, principal, Permission.ENROL, gallery, where="enrol")
    if not display_name.strip():
        raise BadInputError("give the subject's name as the gallery should show it")
    if not legal_basis.strip():
        raise BadInputError("give the legal basis for holding this subject (law, warrant, case)")
    until = check_retention(retention_until, today)
    return EnrolmentForm(
        gallery,
        display_name.strip(),
        legal_basis.strip(),
        notes.strip(),
        until,
        check_age_at_capture(age_at_capture),
    )


def prepare_enrolment(
    state: WebState, principal: Principal, form: EnrolmentForm, data: bytes
) -> PendingEnrolment:
    """Analyse the photo and hold it (in memory) while a face is chosen."""
    if not data:
        raise BadInputError("choose a photo of the subject")
    probe = state.accountable.analyse(data, name="the photo")
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
        age_at_capture=form.age_at_capture,
    )
    state.enrolments.put(pending)
    return pending


def prepare_photo(
    state: WebState,
    principal: Principal,
    gallery: str,
    subject_id: str,
    data: bytes,
    age_at_capture: int | None,
) -> PendingEnrolment:
    """Another photo for an enrolled subject, analysed and held while its face is chosen."""
    require_gallery(state, principal, Permission.ENROL, gallery, where="add a photo")
    if not data:
        raise BadInputError("choose a photo of the subject")
    probe = state.accountable.analyse(data, name="the photo")
    if not probe.faces:
        raise BadInputError("no face found in the photo; use a clearer, frontal photo")
    pending = PendingEnrolment(
        entry_id=Workspace.new_id(),
        owner=principal.owner,
        gallery=gallery,
        display_name="",
        legal_basis="",
        notes="",
        retention_until=None,
        image=data,
        probe=probe,
        age_at_capture=age_at_capture,
        subject_id=subject_id,
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
    """Enrol the chosen face (quality gate, duplicate check); the core records it."""
    pending.probe.face(face_index)
    enrolled = state.accountable.enroll(
        principal,
        pending.gallery,
        display_name=pending.display_name,
        legal_basis=pending.legal_basis,
        image_bytes=pending.image,
        face_index=face_index,
        notes=pending.notes,
        retention_until=pending.retention_until,
        allow_duplicate=allow_duplicate,
        age_at_capture=pending.age_at_capture,
        where="enrol",
    )
    state.enrolments.remove(pending.entry_id)
    return enrolled


def add_to_subject(
    state: WebState,
    principal: Principal,
    pending: PendingEnrolment,
    face_index: int,
    subject_id: str,
) -> str:
    """Add the chosen face to an existing subject (the duplicate check's other answer)."""
    pending.probe.face(face_index)
    face = state.accountable.add_face(
        principal,
        pending.gallery,
        subject_id,
        pending.image,
        face_index=face_index,
        age_at_capture=pending.age_at_capture,
        where="add a photo to a subject",
    )
    state.enrolments.remove(pending.entry_id)
    return face.face_id


def delete_subject(
    state: WebState, principal: Principal, gallery: str, subject_id: str, *, reason: str
) -> None:
    """Erase a subject (store, index, thumbnails). Investigators erase in their galleries;
    supervisors erase subjects past their retention date in any gallery."""
    subject = state.galleries.subject(gallery, subject_id)
    expired = subject.retention_until is not None and subject.retention_until < date.today()
    by_retention = (
        principal.may(Permission.RETENTION)
        and expired
        and not principal.may_use_gallery(Permission.SUBJECTS_DELETE, gallery)
    )
    state.accountable.delete_subject(
        principal,
        gallery,
        subject_id,
        reason=reason,
        where="erase a subject",
        by_retention=by_retention,
    )
