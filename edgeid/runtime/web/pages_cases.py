"""Case ingest pages: case number, reason and galleries first; then the archive of seized
media; then live progress (a page that refreshes itself, no JavaScript); then the case's
clusters with their best faces, the files they appear in and their leads; then the report.

The archive is the one upload streamed to disk (``case_uploads.py``); everything else about a
case is read from the encrypted case store.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.cases.browse import CaseFilter, browse
from edgeid.runtime.cases.video import DEFAULT_FRAME_INTERVAL_S, MIN_FRAME_INTERVAL_S
from edgeid.runtime.cases.views import BEST_MIN_QUALITY
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.web import case_operations as cops
from edgeid.runtime.web import operations as ops
from edgeid.runtime.web import work_context
from edgeid.runtime.web.access import PageAccess, check_csrf, posted
from edgeid.runtime.web.case_operations import MAX_FRAME_INTERVAL_S
from edgeid.runtime.web.case_uploads import ARCHIVE_FIELD, receive_form
from edgeid.runtime.web.images import jpeg_response
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.rendering import flash, render
from edgeid.runtime.web.state import web_state

router = APIRouter(include_in_schema=False)

Searcher = Annotated[Principal, Depends(PageAccess(Permission.SEARCH))]
Uploader = Annotated[Principal, Depends(PageAccess(Permission.SEARCH, streams_body=True))]
# The progress page reloads itself this often while the ingest runs: often enough to watch,
# rare enough that a dozen open pages cost the box nothing.
REFRESH_S = 2


def _cases_page(
    request: Request,
    principal: Principal,
    *,
    error: str | None = None,
    status_code: int = 200,
    values: dict[str, object] | None = None,
) -> Response:
    state = web_state(request)
    cases = cops.desk(state)
    return render(
        request,
        "cases.html",
        principal=principal,
        status_code=status_code,
        cases=cops.my_cases(state, principal),
        jobs=cases.jobs.of_user(principal.username),
        galleries=ops.usable_galleries(state, principal, Permission.SEARCH),
        default_interval=DEFAULT_FRAME_INTERVAL_S,
        min_interval=MIN_FRAME_INTERVAL_S,
        max_interval=MAX_FRAME_INTERVAL_S,
        cluster=cases.farm is not None,
        error=error,
        values=values or {},
    )


@router.get("/cases")
def cases_start(request: Request, principal: Searcher) -> Response:
    return _cases_page(request, principal)


@router.post("/cases")
def cases_plan(request: Request, principal: Searcher) -> Response:
    form = posted(request)
    try:
        plan = cops.plan_ingest(
            web_state(request),
            principal,
            case=form.get("case"),
            reason=form.get("reason"),
            galleries=form.all("gallery"),
            frame_interval_s=form.get("frame_interval"),
            retention_until=form.get("retention_until"),
            children=bool(form.get("children")),  # an unticked box sends nothing
            on_cluster=bool(form.get("cluster")),
        )
    except BadInputError as exc:
        values: dict[str, object] = {
            name: form.get(name) for name in ("case", "reason", "frame_interval", "retention_until")
        }
        values["galleries"] = form.all("gallery")
        values["children"] = bool(form.get("children"))
        values["cluster"] = bool(form.get("cluster"))
        return _cases_page(request, principal, error=str(exc), status_code=400, values=values)
    return RedirectResponse(f"/cases/new/{plan.entry_id}", status_code=303)


def _upload_page(
    request: Request,
    principal: Principal,
    entry_id: str,
    *,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    state = web_state(request)
    return render(
        request,
        "case_upload.html",
        principal=principal,
        status_code=status_code,
        plan=cops.load_plan(state, principal, entry_id),
        busy=cops.desk(state).jobs.busy(),
        max_upload_mb=state.max_case_upload_bytes / (1024 * 1024),
        field=ARCHIVE_FIELD,
        error=error,
    )


@router.get("/cases/new/{entry_id}")
def case_upload_page(request: Request, entry_id: str, principal: Searcher) -> Response:
    return _upload_page(request, principal, entry_id)


@router.post("/cases/new/{entry_id}/archive")
async def case_upload(request: Request, entry_id: str, principal: Uploader) -> Response:
    state = web_state(request)
    plan = cops.load_plan(state, principal, entry_id)
    cops.ready_for_upload(state, principal, plan)
    cases = cops.desk(state)
    path = cases.uploads.new_path()
    started = False
    try:
        form, archive = await receive_form(
            request,
            path,
            max_bytes=state.max_case_upload_bytes,
            before_file=lambda fields: check_csrf(principal, fields),
        )
        check_csrf(principal, form)  # a form without an archive still needs its token
        if archive is None:
            return _upload_page(
                request,
                principal,
                entry_id,
                error="choose the archive (zip or tar) of the case's media",
                status_code=400,
            )
        job = await run_in_threadpool(cops.start_ingest, state, principal, plan, archive)
        started = True
    finally:
        if not started:  # refused or failed: the media does not stay on the box
            await run_in_threadpool(cases.uploads.discard, path)
    return RedirectResponse(f"/cases/jobs/{job.job_id}", status_code=303)


@router.get("/cases/jobs/{job_id}")
def case_job_page(request: Request, job_id: str, principal: Searcher) -> Response:
    state = web_state(request)
    job = cops.load_job(state, principal, job_id)
    snapshot = cops.job_json(state, job)
    response = render(
        request,
        "case_job.html",
        principal=principal,
        job=job,
        p=snapshot,
        pace=job.job.pace(),
        running=job.running,
        refresh_s=REFRESH_S,
    )
    return response


@router.post("/cases/jobs/{job_id}/stop")
def case_job_stop(request: Request, job_id: str, principal: Searcher) -> Response:
    job = cops.load_job(web_state(request), principal, job_id)
    job.job.stop()
    flash(principal, "The ingest stops after the file in hand; run it again to resume.")
    return RedirectResponse(f"/cases/jobs/{job_id}", status_code=303)


@router.get("/cases/{case_id}")
def case_page(request: Request, case_id: str, principal: Searcher) -> Response:
    state = web_state(request)
    view = cops.view(request, state, principal, case_id)
    shown = browse(view, CaseFilter.parse(request.query_params))
    return render(
        request,
        "case.html",
        principal=principal,
        view=view,
        shown=shown,
        min_quality=BEST_MIN_QUALITY,
        case_id=case_id,
        work=work_context.current(principal),
        case_searches=state.history.of_case(view.meta.number),
        keep_days=state.settings.searches.history_days,
    )


@router.get("/cases/{case_id}/clusters/{number}/leads/{face_id}")
def case_lead(
    request: Request, case_id: str, number: int, face_id: str, principal: Searcher
) -> Response:
    """A case lead in the comparison view, where it is confirmed or rejected: the user's
    review of it is found or kept (sealed) and the comparison opened (which records)."""
    state = web_state(request)
    case = cops.case_number(state, principal, case_id)
    review = state.history.review_case_lead(
        principal,
        cops.access(state),
        case_id,
        number,
        face_id,
        cops.reason_for(request, principal, case),
        where="review a case lead",
    )
    return RedirectResponse(f"/searches/{review.search_id}/candidates/{face_id}", status_code=303)


@router.get("/cases/{case_id}/faces/{face_id}.jpg")
def case_face(request: Request, case_id: str, face_id: str, principal: Searcher) -> Response:
    return jpeg_response(cops.thumbnail(request, web_state(request), principal, case_id, face_id))


@router.get("/cases/{case_id}/report.html")
def case_report(request: Request, case_id: str, principal: Searcher) -> Response:
    html = cops.report(request, web_state(request), principal, case_id)
    return HTMLResponse(
        html,
        headers={"Content-Disposition": f'attachment; filename="case-{case_id}-report.html"'},
    )
