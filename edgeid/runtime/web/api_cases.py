"""``/api/v1`` case ingest: plan an ingest (case number, reason, galleries), send the archive
as the raw request body (streamed to a private temp file, shredded when the ingest ends), poll
the job, read the case (JSON, thumbnails) and download its report. Scope: ``search``; a case
is its opener's, as on the pages (``case_operations.py``)."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.cases.video import DEFAULT_FRAME_INTERVAL_S
from edgeid.runtime.cases.views import meta_json, view_json
from edgeid.runtime.web import case_operations as cops
from edgeid.runtime.web.access import ApiAccess
from edgeid.runtime.web.api_outputs import CaseMetaOut, CaseOut, JobOut
from edgeid.runtime.web.case_uploads import receive_raw
from edgeid.runtime.web.forms import UnsupportedBodyError
from edgeid.runtime.web.images import jpeg_response
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.state import web_state

router = APIRouter()

Searcher = Annotated[Principal, Depends(ApiAccess(Permission.SEARCH))]

ARCHIVE_TYPES = (
    "application/zip",
    "application/x-tar",
    "application/gzip",
    "application/x-bzip2",
    "application/x-xz",
    "application/octet-stream",
)
ARCHIVE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            kind: {"schema": {"type": "string", "format": "binary"}} for kind in ARCHIVE_TYPES
        },
    }
}
JPEG: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
        "description": "JPEG image",
    }
}
HTML: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/html": {"schema": {"type": "string"}}},
        "description": "the case report, one HTML file",
    }
}


class IngestStart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    case: str = Field(max_length=64, description="the case number (created on first ingest)")
    reason: str = Field(max_length=1000, description="why this media is searched, for the audit")
    galleries: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="galleries to search each cluster in; empty: every one this user may search",
    )
    frame_interval_s: float = Field(
        default=DEFAULT_FRAME_INTERVAL_S, description="seconds between sampled video frames"
    )
    retention_until: date | None = Field(default=None, description="keep the case until")
    may_include_children: bool | None = Field(
        default=None,
        description=(
            "faces may include children: clustered with the child threshold (more, smaller "
            "clusters), leads judged with the strictest band; null keeps the case's setting "
            "(on for a new case); false: adults only"
        ),
    )


class IngestPlanned(BaseModel):
    ingest_id: str
    case: str
    galleries: list[str]
    frame_interval_s: float
    retention_until: date | None
    may_include_children: bool | None
    expires_after_idle_s: float


@router.post("/case-ingests", response_model=IngestPlanned, status_code=201, tags=["cases"])
def ingest_plan(request: Request, body: IngestStart, principal: Searcher) -> IngestPlanned:
    """Plan a case ingest: the case number and reason come first, before any media."""
    state = web_state(request)
    plan = cops.plan_ingest(
        state,
        principal,
        case=body.case,
        reason=body.reason,
        galleries=body.galleries,
        frame_interval_s=body.frame_interval_s,
        retention_until=body.retention_until.isoformat() if body.retention_until else None,
        children=body.may_include_children,
    )
    return IngestPlanned(
        ingest_id=plan.entry_id,
        case=plan.case,
        galleries=list(plan.galleries),
        frame_interval_s=plan.frame_interval_s,
        retention_until=plan.retention_until,
        may_include_children=plan.children,
        expires_after_idle_s=cops.desk(state).plans.ttl_s,
    )


@router.put(
    "/case-ingests/{ingest_id}/archive",
    status_code=202,
    tags=["cases"],
    openapi_extra=ARCHIVE_BODY,
    response_model=JobOut,
)
async def ingest_archive(request: Request, ingest_id: str, principal: Searcher) -> JSONResponse:
    """Send the archive (zip or tar) as the body; the ingest starts and its job comes back."""
    state = web_state(request)
    plan = cops.load_plan(state, principal, ingest_id)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ARCHIVE_TYPES:
        raise UnsupportedBodyError("send the archive as the body, Content-Type application/zip")
    cops.ready_for_upload(state, principal, plan)
    cases = cops.desk(state)
    path = cases.uploads.new_path()
    started = False
    try:
        archive = await receive_raw(request, path, max_bytes=state.max_case_upload_bytes)
        job = await run_in_threadpool(cops.start_ingest, state, principal, plan, archive)
        started = True
    finally:
        if not started:  # refused or failed: the media does not stay on the box
            await run_in_threadpool(cases.uploads.discard, path)
    return JSONResponse(
        JobOut.model_validate(cops.job_json(state, job)).model_dump(mode="json"), status_code=202
    )


@router.get("/case-jobs/{job_id}", response_model=JobOut, tags=["cases"])
def ingest_job(request: Request, job_id: str, principal: Searcher) -> JobOut:
    """An ingest's state and counts (no names, no faces); ``case_id`` once it is done."""
    state = web_state(request)
    return JobOut.model_validate(cops.job_json(state, cops.load_job(state, principal, job_id)))


@router.post("/case-jobs/{job_id}/stop", status_code=202, response_model=JobOut, tags=["cases"])
def ingest_stop(request: Request, job_id: str, principal: Searcher) -> JobOut:
    """Stop after the file in hand; an ingest of the same case later resumes."""
    state = web_state(request)
    job = cops.load_job(state, principal, job_id)
    job.job.stop()
    return JobOut.model_validate(cops.job_json(state, job))


@router.get("/cases", response_model=list[CaseMetaOut], tags=["cases"])
def cases_list(request: Request, principal: Searcher) -> list[CaseMetaOut]:
    """The cases this user opened, newest first."""
    mine = cops.my_cases(web_state(request), principal)
    return [CaseMetaOut.model_validate(meta_json(m)) for m in mine]


@router.get("/cases/{case_id}", response_model=CaseOut, tags=["cases"])
def case_get(request: Request, case_id: str, principal: Searcher) -> CaseOut:
    """The case's clusters (best faces, files, leads with score bands) and files. Needs the
    reason header (``Edgeid-Case`` must name this case); recorded."""
    return CaseOut.model_validate(
        view_json(cops.view(request, web_state(request), principal, case_id))
    )


@router.get("/cases/{case_id}/faces/{face_id}.jpg", tags=["cases"], responses=JPEG)
def case_face(request: Request, case_id: str, face_id: str, principal: Searcher) -> Response:
    """A case face's aligned chip."""
    return jpeg_response(cops.thumbnail(request, web_state(request), principal, case_id, face_id))


@router.get("/cases/{case_id}/report.html", tags=["cases"], responses=HTML)
def case_report(request: Request, case_id: str, principal: Searcher) -> Response:
    """The case report (one self-contained HTML file); the download is audited."""
    html = cops.report(request, web_state(request), principal, case_id)
    return HTMLResponse(
        html,
        headers={"Content-Disposition": f'attachment; filename="case-{case_id}-report.html"'},
    )
