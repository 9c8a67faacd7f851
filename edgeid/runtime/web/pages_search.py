"""The investigator's search: case and reason, then the photo, then a face, then candidates.

Each step is a form that posts and redirects (so reloading a page never repeats a search).
Handlers are plain functions: FastAPI runs them on its thread pool, off the event loop, which
is where decoding, inference and the audit log's fsync belong.
The photo and everything derived from it stay in memory (``workspace.py``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.age_bands import AGE_BAND_LABELS
from edgeid.runtime.gallery.service import AGE_BANDS, DEFAULT_TOP_K, MAX_TOP_K
from edgeid.runtime.services.search_history import INVESTIGATION, MODES
from edgeid.runtime.web import operations as ops
from edgeid.runtime.web.access import PageAccess, posted
from edgeid.runtime.web.images import display_jpeg, jpeg_response
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.rendering import flash, render
from edgeid.runtime.web.state import web_state
from edgeid.runtime.web.workspace import SearchContext

router = APIRouter(include_in_schema=False)

Searcher = Annotated[Principal, Depends(PageAccess(Permission.SEARCH))]
CURRENT_SEARCH = "search"


def _start_page(
    request: Request,
    principal: Principal,
    *,
    error: str | None = None,
    status_code: int = 200,
    values: dict[str, object] | None = None,
) -> Response:
    state = web_state(request)
    current = None
    if principal.session is not None and CURRENT_SEARCH in principal.session.values:
        current = state.searches.get(principal.owner, principal.session.values[CURRENT_SEARCH])
    return render(
        request,
        "search_start.html",
        principal=principal,
        status_code=status_code,
        galleries=ops.usable_galleries(state, principal, Permission.SEARCH),
        age_bands=[(b, AGE_BAND_LABELS[b]) for b in AGE_BANDS],
        modes=MODES,
        current=current,
        error=error,
        values=values or {},
    )


@router.get("/search")
def search_start(request: Request, principal: Searcher) -> Response:
    return _start_page(request, principal)


@router.post("/search")
def search_create(request: Request, principal: Searcher) -> Response:
    form = posted(request)
    try:
        context = ops.start_search(
            web_state(request),
            principal,
            case=form.get("case"),
            reason=form.get("reason"),
            age_band=form.get("age_band", "unknown"),
            galleries=form.all("gallery"),
            mode=form.get("mode") or None,
        )
    except BadInputError as exc:
        values: dict[str, object] = {
            "case": form.get("case"),
            "reason": form.get("reason"),
            "age_band": form.get("age_band"),
            "galleries": form.all("gallery"),
            "mode": form.get("mode"),
        }
        return _start_page(request, principal, error=str(exc), status_code=400, values=values)
    if principal.session is not None:
        principal.session.values[CURRENT_SEARCH] = context.entry_id
    return RedirectResponse(f"/search/{context.entry_id}", status_code=303)


def _search_page(
    request: Request,
    principal: Principal,
    context: SearchContext,
    *,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    return render(
        request,
        "search.html",
        principal=principal,
        status_code=status_code,
        search=context,
        probe=context.probe,
        max_upload_mb=web_state(request).max_upload_bytes / (1024 * 1024),
        default_k=DEFAULT_TOP_K,
        max_k=MAX_TOP_K,
        age_band_label=AGE_BAND_LABELS[context.age_band],
        error=error,
    )


@router.get("/search/{search_id}")
def search_page(request: Request, search_id: str, principal: Searcher) -> Response:
    context = ops.load_search(web_state(request), principal, search_id)
    return _search_page(request, principal, context)


@router.post("/search/{search_id}/photo")
def search_photo(request: Request, search_id: str, principal: Searcher) -> Response:
    state = web_state(request)
    context = ops.load_search(state, principal, search_id)
    upload = posted(request).files.get("photo")
    try:
        ops.attach_photo(state, principal, context, upload.data if upload else b"")
    except BadInputError as exc:
        return _search_page(request, principal, context, error=str(exc), status_code=400)
    return RedirectResponse(f"/search/{search_id}", status_code=303)


@router.get("/search/{search_id}/photo.jpg")
def search_photo_image(request: Request, search_id: str, principal: Searcher) -> Response:
    context = ops.load_search(web_state(request), principal, search_id)
    ops.require_probe(context)
    return jpeg_response(display_jpeg(context.image or b""))


@router.get("/search/{search_id}/faces/{face_index}/chip.jpg")
def search_face_chip(
    request: Request, search_id: str, face_index: int, principal: Searcher
) -> Response:
    context = ops.load_search(web_state(request), principal, search_id)
    return jpeg_response(ops.require_probe(context).chip_jpeg(face_index))


@router.post("/search/{search_id}/faces/{face_index}")
def search_face(request: Request, search_id: str, face_index: int, principal: Searcher) -> Response:
    state = web_state(request)
    context = ops.load_search(state, principal, search_id)
    try:
        k = ops.check_top_k(posted(request).get("k"))
        stored = ops.run_search(state, principal, context, face_index, k=k)
    except BadInputError as exc:
        return _search_page(request, principal, context, error=str(exc), status_code=400)
    return RedirectResponse(f"/searches/{stored.search_id}", status_code=303)


@router.get("/search/{search_id}/faces/{face_index}")
def search_results(
    request: Request, search_id: str, face_index: int, principal: Searcher
) -> Response:
    """The face's result, kept in the user's history (or back to the faces, unsearched)."""
    context = ops.load_search(web_state(request), principal, search_id)
    ops.require_probe(context)
    kept = context.records.get(face_index)
    if kept is None:  # not searched yet (or the photo changed): back to the faces
        return RedirectResponse(f"/search/{search_id}", status_code=303)
    return RedirectResponse(f"/searches/{kept}", status_code=303)


@router.post("/search/{search_id}/faces/{face_index}/age-band")
def search_rescore(
    request: Request, search_id: str, face_index: int, principal: Searcher
) -> Response:
    """The result judged for another apparent age (recorded; see ``ops.rescore_search``)."""
    state = web_state(request)
    context = ops.load_search(state, principal, search_id)
    stored = ops.rescore_search(
        state, principal, context, face_index, posted(request).get("age_band")
    )
    done = "Re-scored" if context.mode == INVESTIGATION else "Searched again"
    flash(principal, f"{done} for: {AGE_BAND_LABELS[context.age_band]}.")
    return RedirectResponse(f"/searches/{stored.search_id}", status_code=303)
