"""The user's searches, kept after signing out: the list, a search's result in its mode, the
comparison view of one candidate, and the decision, which lives only there.

Everything goes through ``edgeid.runtime.services.searches`` (the owner check, the records,
the rules on decisions); these handlers only turn forms into calls and results into pages.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.age_bands import AGE_BAND_LABELS, AgeBand, check_age_band
from edgeid.runtime.gallery.service import AGE_BANDS
from edgeid.runtime.services.search_history import StoredSearch
from edgeid.runtime.services.searches import MIN_NOTE_CHARS, Opened, justification_of
from edgeid.runtime.web.access import PageAccess, posted
from edgeid.runtime.web.comparison_images import render_face
from edgeid.runtime.web.images import jpeg_response
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.rendering import flash, render
from edgeid.runtime.web.state import web_state

router = APIRouter(include_in_schema=False)

Searcher = Annotated[Principal, Depends(PageAccess(Permission.SEARCH))]


def _label(band: str) -> str:
    try:
        known: AgeBand = check_age_band(band)
    except ValueError:
        return band
    return AGE_BAND_LABELS[known]


def _held(request: Request, principal: Principal, search: StoredSearch) -> bool:
    """Whether this session still holds the photo the search came from (to re-judge it)."""
    state = web_state(request)
    return bool(search.workspace_id) and (
        state.searches.get(principal.owner, search.workspace_id) is not None
    )


@router.get("/searches")
def my_searches(request: Request, principal: Searcher) -> Response:
    state = web_state(request)
    return render(
        request,
        "searches.html",
        principal=principal,
        searches=state.history.mine(principal),
        keep_days=state.settings.searches.history_days,
        label=_label,
    )


@router.get("/searches/{search_id}")
def search_result(request: Request, search_id: str, principal: Searcher) -> Response:
    state = web_state(request)
    search = state.history.reopen(principal, search_id, where="open a kept search")
    names = state.history.names_shown(search)
    return render(
        request,
        "results.html",
        principal=principal,
        search=search,
        names=names,
        age_band_label=_label(search.age_band),
        band_used_label=_label(search.band_used),
        age_bands=[(b, AGE_BAND_LABELS[b]) for b in AGE_BANDS],
        held=_held(request, principal, search),
    )


@router.get("/searches/{search_id}/probe.jpg")
def search_probe(
    request: Request,
    search_id: str,
    principal: Searcher,
    size: str = "",
    landmarks: str = "",
) -> Response:
    """The investigator's own probe face, kept sealed with the search."""
    search = web_state(request).history.get(principal, search_id, where="open a kept search")
    if not size and not landmarks:
        return jpeg_response(search.probe_chip)
    return jpeg_response(
        render_face(search.probe_chip, large=size == "large", landmarks=landmarks == "on")
    )


def _comparison(
    request: Request,
    principal: Principal,
    opened: Opened,
    *,
    status_code: int = 200,
    **extra: Any,
) -> Response:
    search = opened.search
    extra.setdefault("error", None)
    extra.setdefault("note", None)
    return render(
        request,
        "compare.html",
        principal=principal,
        status_code=status_code,
        search=search,
        candidate=opened.candidate,
        name=opened.display_name,
        faces=opened.faces,
        decided=search.decision(opened.candidate.face_id),
        history=[d for d in search.decisions if d.face_id == opened.candidate.face_id],
        landmarks=request.query_params.get("landmarks") == "on",
        band_used_label=_label(search.band_used),
        min_note=MIN_NOTE_CHARS,
        **extra,
    )


@router.get("/searches/{search_id}/candidates/{face_id}")
def compare(request: Request, search_id: str, face_id: str, principal: Searcher) -> Response:
    """The probe beside every enrolled photo of the candidate's subject (recorded as
    ``subject_viewed``: the name and the other photos are revealed here)."""
    opened = web_state(request).history.open_candidate(
        principal, search_id, face_id, where="compare a candidate"
    )
    return _comparison(request, principal, opened)


@router.get("/searches/{search_id}/candidates/{face_id}/faces/{enrolled_id}.jpg")
def compare_face(
    request: Request,
    search_id: str,
    face_id: str,
    enrolled_id: str,
    principal: Searcher,
    size: str = "",
    landmarks: str = "",
) -> Response:
    """One enrolled photo of the candidate's subject, enlarged and marked as asked. Shown
    again to the session that opened the comparison; otherwise recorded as ``face_viewed``
    under the search's case and reason."""
    state = web_state(request)
    search = state.history.get(principal, search_id, where="compare a candidate")
    candidate = search.candidate(face_id)
    if candidate is None:
        raise BadInputError("that candidate is not among this search's results")
    jpeg = state.accountable.thumbnail(
        principal,
        justification_of(search),
        candidate.gallery,
        enrolled_id,
        where="compare a candidate",
    )
    return jpeg_response(render_face(jpeg, large=size == "large", landmarks=landmarks == "on"))


@router.post("/searches/{search_id}/candidates/{face_id}/decision")
def decide(request: Request, search_id: str, face_id: str, principal: Searcher) -> Response:
    state = web_state(request)
    form = posted(request)
    try:
        made = state.history.decide(
            principal,
            search_id,
            face_id,
            form.get("decision"),
            form.get("note") or "",
            where="record a decision",
        )
    except BadInputError as exc:
        opened = state.history.open_candidate(
            principal, search_id, face_id, where="compare a candidate"
        )
        return _comparison(
            request, principal, opened, error=str(exc), note=form.get("note"), status_code=400
        )
    flash(principal, f"Recorded: {made.decision}.")
    return RedirectResponse(f"/searches/{search_id}/candidates/{face_id}", status_code=303)
