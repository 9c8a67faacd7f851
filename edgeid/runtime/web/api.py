"""``/api/v1``: the pages' operations for API tokens (``Authorization: Bearer edgeid_...``).

Each endpoint names the scope it needs; a token's scopes count only within its owner's
current role and galleries. Photos are sent as the raw request body (search) or as a
multipart form (enrolment), read into memory with the same limit as the pages.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.accounts.tokens import Token
from edgeid.runtime.accounts.users import User
from edgeid.runtime.audit import AuditAction
from edgeid.runtime.audit.justification import CASE_NUMBER_PATTERN, MAX_CASE_CHARS, MIN_REASON_CHARS
from edgeid.runtime.gallery.service import DuplicateSubjectError
from edgeid.runtime.services import user_requests
from edgeid.runtime.services.proposals import Proposal
from edgeid.runtime.web import admin, work_context
from edgeid.runtime.web import operations as ops
from edgeid.runtime.web.access import ApiAccess
from edgeid.runtime.web.api_models import (
    ApprovalOut,
    CandidatesRequest,
    ComparisonOut,
    DecisionIn,
    DecisionOut,
    EraseIn,
    GalleryIn,
    GalleryOut,
    KeptSearchOut,
    MeOut,
    OneTimePassword,
    ProbeOut,
    ProposalOut,
    RescoreRequest,
    SearchCreated,
    SearchResultOut,
    SearchStart,
    SubjectOut,
    TokenOut,
    UserChanged,
    UserCreated,
    UserIn,
    UserOut,
    UserPatch,
)
from edgeid.runtime.web.api_outputs import AuditRecordOut, DuplicateOut, FacesFoundOut, HealthOut
from edgeid.runtime.web.audit_trail import record
from edgeid.runtime.web.forms import UnsupportedBodyError, read_body, read_form
from edgeid.runtime.web.images import jpeg_response
from edgeid.runtime.web.pages_audit import audit_filter
from edgeid.runtime.web.pages_health import health_summary
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.state import WebState, web_state

router = APIRouter()

Anyone = Annotated[Principal, Depends(ApiAccess(None))]
Searcher = Annotated[Principal, Depends(ApiAccess(Permission.SEARCH))]
Enroller = Annotated[Principal, Depends(ApiAccess(Permission.ENROL))]
Reader = Annotated[Principal, Depends(ApiAccess(Permission.SUBJECTS_READ))]

Eraser = Annotated[Principal, Depends(ApiAccess(Permission.SUBJECTS_DELETE))]
Auditor = Annotated[Principal, Depends(ApiAccess(Permission.AUDIT_READ))]
UserAdmin = Annotated[Principal, Depends(ApiAccess(Permission.USERS))]
GalleryAdmin = Annotated[Principal, Depends(ApiAccess(Permission.GALLERIES))]
Technician = Annotated[Principal, Depends(ApiAccess(Permission.HEALTH))]
Approver = Annotated[Principal, Depends(ApiAccess(Permission.APPROVALS))]

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff")
PHOTO_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            kind: {"schema": {"type": "string", "format": "binary"}}
            for kind in (*IMAGE_TYPES, "application/octet-stream")
        },
    }
}
ENROL_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["display_name", "legal_basis", "photo"],
                    "properties": {
                        "display_name": {"type": "string"},
                        "legal_basis": {"type": "string"},
                        "notes": {"type": "string"},
                        "retention_until": {"type": "string", "format": "date"},
                        "face_index": {"type": "integer", "description": "needed for 2+ faces"},
                        "allow_duplicate": {"type": "boolean"},
                        "photo": {"type": "string", "format": "binary"},
                    },
                },
                "encoding": {"photo": {"contentType": ", ".join(IMAGE_TYPES)}},
            }
        },
    }
}
JPEG: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
        "description": "JPEG image",
    }
}


@router.get("/me", response_model=MeOut, tags=["account"])
def me(principal: Anyone) -> MeOut:
    return MeOut(
        username=principal.username,
        role=principal.role.value,
        scopes=sorted(p.value for p in principal.permissions),
        galleries=list(principal.galleries),
        token_id=principal.token_id,
    )


# -- search ----------------------------------------------------------------------------------


@router.post("/searches", response_model=SearchCreated, status_code=201, tags=["search"])
def search_create(request: Request, body: SearchStart, principal: Searcher) -> SearchCreated:
    """Start a search: the case number and reason come first, before any photo."""
    state = web_state(request)
    context = ops.start_search(
        state,
        principal,
        case=body.case,
        reason=body.reason,
        age_band=body.age_band,
        galleries=body.galleries,
        mode=body.mode,
    )
    return SearchCreated(
        search_id=context.entry_id,
        case=context.case,
        galleries=list(context.galleries),
        age_band=context.age_band,
        mode=body.mode,
        expires_after_idle_s=state.searches.ttl_s,
    )


@router.put(
    "/searches/{search_id}/photo",
    response_model=ProbeOut,
    tags=["search"],
    openapi_extra=PHOTO_BODY,
)
async def search_photo(request: Request, search_id: str, principal: Searcher) -> ProbeOut:
    """Send the probe photo (raw bytes); every face comes back boxed, with its quality."""
    state = web_state(request)
    context = ops.load_search(state, principal, search_id)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in (*IMAGE_TYPES, "application/octet-stream"):
        raise UnsupportedBodyError("send the photo as the body, Content-Type image/jpeg or similar")
    data = await read_body(request, state.max_upload_bytes)
    probe = await run_in_threadpool(ops.attach_photo, state, principal, context, data)
    return ProbeOut.of(search_id, probe)


@router.get("/searches/{search_id}/faces/{face_index}/chip.jpg", tags=["search"], responses=JPEG)
def search_chip(request: Request, search_id: str, face_index: int, principal: Searcher) -> Response:
    """The probe face aligned as the embedder saw it."""
    context = ops.load_search(web_state(request), principal, search_id)
    return jpeg_response(ops.require_probe(context).chip_jpeg(face_index))


@router.post(
    "/searches/{search_id}/faces/{face_index}/candidates",
    response_model=SearchResultOut,
    tags=["search"],
)
def search_candidates(
    request: Request,
    search_id: str,
    face_index: int,
    body: CandidatesRequest,
    principal: Searcher,
) -> SearchResultOut:
    """Candidates for one face in the search's mode, recorded (mode included) before they are
    returned and kept in the user's search history (``history_id``)."""
    state = web_state(request)
    context = ops.load_search(state, principal, search_id)
    kept = ops.run_search(state, principal, context, face_index, k=body.k)
    return SearchResultOut.of(context.results[face_index], kept)


@router.post(
    "/searches/{search_id}/faces/{face_index}/rescore",
    response_model=SearchResultOut,
    tags=["search"],
)
def search_rescore(
    request: Request,
    search_id: str,
    face_index: int,
    body: RescoreRequest,
    principal: Searcher,
) -> SearchResultOut:
    """The face's candidates judged for another apparent age: the same scores with that age
    band's threshold, score bands and wording; not searched again, but recorded like a search.
    The band becomes the search's band for its other faces."""
    state = web_state(request)
    context = ops.load_search(state, principal, search_id)
    kept = ops.rescore_search(state, principal, context, face_index, body.age_band)
    return SearchResultOut.of(context.results[face_index], kept)


@router.get("/search-history", response_model=list[KeptSearchOut], tags=["search"])
def search_history(request: Request, principal: Searcher) -> list[KeptSearchOut]:
    """The caller's kept searches, newest first (no names: open a candidate for its name)."""
    return [KeptSearchOut.of(s) for s in web_state(request).history.mine(principal)]


@router.get("/search-history/{history_id}", response_model=KeptSearchOut, tags=["search"])
def kept_search(request: Request, history_id: str, principal: Searcher) -> KeptSearchOut:
    """One kept search; shown again to another token or session, it is recorded first."""
    state = web_state(request)
    return KeptSearchOut.of(state.history.reopen(principal, history_id, where="open a kept search"))


@router.get(
    "/search-history/{history_id}/candidates/{face_id}",
    response_model=ComparisonOut,
    tags=["search"],
)
def kept_candidate(
    request: Request, history_id: str, face_id: str, principal: Searcher
) -> ComparisonOut:
    """Open a candidate for comparison: its subject's name and every enrolled photo
    (recorded as subject_viewed). A decision needs this first."""
    opened = web_state(request).history.open_candidate(
        principal, history_id, face_id, where="compare a candidate"
    )
    c = opened.candidate
    return ComparisonOut(
        history_id=history_id,
        rank=c.rank,
        gallery=c.gallery,
        subject_id=c.subject_id,
        display_name=opened.display_name,
        face_ids=[f.face_id for f in opened.faces],
        above_threshold=c.above_threshold,
        strength=c.strength,
    )


@router.post(
    "/search-history/{history_id}/candidates/{face_id}/decision",
    response_model=DecisionOut,
    tags=["search"],
)
def kept_decision(
    request: Request, history_id: str, face_id: str, body: DecisionIn, principal: Searcher
) -> DecisionOut:
    """Mark an opened candidate as a confirmed lead or rejected, with a note (required to
    confirm one below the threshold). Audited; never used for training."""
    state = web_state(request)
    made = state.history.decide(
        principal, history_id, face_id, body.decision, body.note, where="record a decision"
    )
    search = state.history.get(principal, history_id, where="record a decision")
    candidate = search.candidate(face_id)
    assert candidate is not None  # decide() found it
    return DecisionOut(
        recorded=made.decision,
        rank=candidate.rank,
        subject_id=candidate.subject_id,
        by=made.by,
        at=made.at,
        note=made.note,
    )


# -- galleries and subjects ------------------------------------------------------------------


@router.get("/galleries", response_model=list[GalleryOut], tags=["galleries"])
def galleries(request: Request, principal: Anyone) -> list[GalleryOut]:
    """The galleries this token may use: every gallery for a gallery admin (scope
    `galleries`), otherwise those its owner may search (names and counts only)."""
    state = web_state(request)
    infos = state.galleries.list_galleries()
    if not principal.may(Permission.GALLERIES):
        mine = set(state.accountable.usable(principal, Permission.SEARCH))
        infos = [g for g in infos if g.name in mine]
    return [GalleryOut.of(g) for g in infos]


@router.post(
    "/galleries",
    response_model=GalleryOut,
    status_code=201,
    tags=["galleries"],
    responses={409: {"description": "a gallery of that name exists"}},
)
def gallery_create(request: Request, body: GalleryIn, principal: GalleryAdmin) -> GalleryOut:
    return GalleryOut.of(
        admin.create_gallery(web_state(request), principal, body.name, body.description)
    )


@router.delete(
    "/galleries/{gallery}",
    status_code=204,
    tags=["galleries"],
    responses={202: {"model": ProposalOut, "description": "waits for a second person"}},
)
def gallery_delete(
    request: Request, gallery: str, body: EraseIn, principal: GalleryAdmin
) -> Response:
    """Erase a gallery with every subject in it: under the two-person rule, a proposal (202)
    that another admin or supervisor approves; with dual control off, at once (204)."""
    state = web_state(request)
    outcome = state.approvals.erase_gallery(
        principal, gallery, reason=body.reason, where="api /api/v1/galleries/{gallery}"
    )
    return _waiting_or_done(state, outcome.proposal if not outcome.done else None)


def _waiting_or_done(state: WebState, proposal: Proposal | None) -> Response:
    if proposal is None:
        return Response(status_code=204)
    body = ProposalOut.of(proposal, state.approvals.ttl)
    return JSONResponse(body.model_dump(mode="json"), status_code=202)


# Browsing what a gallery holds reveals personal data: the call states its case and reason in
# these headers (the reason percent-encoded where it is not plain ASCII), and is recorded.
CaseHeader = Annotated[
    str | None,
    Header(
        alias=work_context.CASE_HEADER,
        description="The case number this look-up is for (recorded in the audit log).",
        max_length=MAX_CASE_CHARS,
        pattern=CASE_NUMBER_PATTERN,
    ),
]
ReasonHeader = Annotated[
    str | None,
    Header(
        alias=work_context.REASON_HEADER,
        description=(
            f"Why (at least {MIN_REASON_CHARS} characters; percent-encoded UTF-8). Recorded "
            "in the audit log."
        ),
    ),
]


@router.get("/galleries/{gallery}/subjects", response_model=list[SubjectOut], tags=["subjects"])
def subjects(
    request: Request,
    gallery: str,
    principal: Reader,
    case: CaseHeader = None,
    reason: ReasonHeader = None,
) -> list[SubjectOut]:
    """The gallery's subjects: needs the case and reason headers; recorded."""
    why = work_context.from_headers(request)
    listed = web_state(request).accountable.subjects(
        principal, why, gallery, where="GET /api/v1/galleries/{gallery}/subjects"
    )
    return [SubjectOut.of(gallery, s) for s in listed]


@router.get(
    "/galleries/{gallery}/subjects/{subject_id}", response_model=SubjectOut, tags=["subjects"]
)
def subject(
    request: Request,
    gallery: str,
    subject_id: str,
    principal: Reader,
    case: CaseHeader = None,
    reason: ReasonHeader = None,
) -> SubjectOut:
    """One subject's record and faces: needs the case and reason headers; recorded."""
    why = work_context.from_headers(request)
    shown = web_state(request).accountable.subject(
        principal, why, gallery, subject_id, where="GET /api/v1/galleries/{gallery}/subjects/{id}"
    )
    return SubjectOut.of(gallery, shown.subject, list(shown.faces))


@router.get("/galleries/{gallery}/faces/{face_id}/thumbnail.jpg", tags=["subjects"], responses=JPEG)
def thumbnail(
    request: Request,
    gallery: str,
    face_id: str,
    principal: Reader,
    case: CaseHeader = None,
    reason: ReasonHeader = None,
) -> Response:
    """The enrolled face, aligned, for comparison beside the probe's chip. Free after a
    recorded search or subject record of the same token that showed it; otherwise it needs
    the case and reason headers and is recorded."""
    state = web_state(request)
    why = work_context.from_headers(request) if case or reason else None
    jpeg = state.accountable.thumbnail(
        principal, why, gallery, face_id, where="GET /api/v1/galleries/{gallery}/faces/{id}"
    )
    return jpeg_response(jpeg)


@router.post(
    "/galleries/{gallery}/subjects",
    response_model=SubjectOut,
    status_code=201,
    tags=["subjects"],
    openapi_extra=ENROL_BODY,
    responses={
        409: {"model": DuplicateOut, "description": "the face already matches an enrolled subject"},
        422: {
            "model": FacesFoundOut,
            "description": "several faces and no face_index: the faces found are listed, or a "
            "field does not match this schema",
        },
        503: {"description": "the inference queue is full; retry after Retry-After seconds"},
    },
)
async def enrol(request: Request, gallery: str, principal: Enroller) -> Response:
    """Enrol a subject from one face of a photo: quality gate, then duplicate check (409
    with the matching subjects unless ``allow_duplicate``)."""
    state = web_state(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UnsupportedBodyError("send the enrolment as multipart/form-data with a photo")
    form = await read_form(request, max_file_bytes=state.max_upload_bytes)
    photo = form.files.get("photo")
    checked = ops.check_enrolment(
        state,
        principal,
        gallery=gallery,
        display_name=form.get("display_name"),
        legal_basis=form.get("legal_basis"),
        notes=form.get("notes"),
        retention_until=form.get("retention_until"),
    )
    index_text = form.get("face_index").strip()
    allow = form.get("allow_duplicate").strip().lower() in ("1", "true", "yes")

    def work() -> Response:
        pending = ops.prepare_enrolment(state, principal, checked, photo.data if photo else b"")
        try:
            face_index = ops.check_face_index(index_text) if index_text else None
            if face_index is None:
                if len(pending.probe.faces) > 1:
                    # The faces found, so a client can show them and send the one it means.
                    faces = ProbeOut.of("", pending.probe).model_dump(mode="json")["faces"]
                    return JSONResponse(
                        {
                            "error": f"the photo has {len(faces)} faces; send face_index with "
                            "the index of the face to enrol (faces numbered as listed here)",
                            "faces": faces,
                        },
                        status_code=422,
                    )
                face_index = 0
            try:
                enrolled = ops.complete_enrolment(
                    state, principal, pending, face_index, allow_duplicate=allow
                )
            except DuplicateSubjectError as exc:
                return JSONResponse(
                    {
                        "error": str(exc),
                        "candidates": [
                            {
                                "rank": c.rank,
                                "subject_id": c.subject_id,
                                "face_id": c.face_id,
                                "score": round(c.score, 4),
                                "band": c.band.value,
                            }
                            for c in exc.candidates
                        ],
                    },
                    status_code=409,
                )
        finally:
            state.enrolments.remove(pending.entry_id)
        body = SubjectOut.of(gallery, enrolled.subject, list(enrolled.faces))
        return JSONResponse(body.model_dump(mode="json"), status_code=201)

    return await run_in_threadpool(work)


@router.delete("/galleries/{gallery}/subjects/{subject_id}", status_code=204, tags=["subjects"])
def erase(
    request: Request, gallery: str, subject_id: str, body: EraseIn, principal: Eraser
) -> Response:
    """Erase a subject: store, search index and thumbnails (the reason goes to the audit)."""
    ops.delete_subject(web_state(request), principal, gallery, subject_id, reason=body.reason)
    return Response(status_code=204)


# -- audit and health ------------------------------------------------------------------------


@router.get("/audit", response_model=list[AuditRecordOut], tags=["audit"])
def audit(
    request: Request,
    principal: Auditor,
    user: str = "",
    case: str = "",
    action: str = "",
    since: str = "",
    until: str = "",
    limit: int = 100,
    before: int | None = None,
) -> list[AuditRecordOut]:
    """Audit records, newest first; ``since``/``until`` are whole UTC days, inclusive."""
    state = web_state(request)
    wanted = audit_filter(
        {"user": user, "case": case, "action": action, "since": since, "until": until}
    )
    records = state.audit.query(
        user=wanted.user,
        case=wanted.case,
        action=wanted.action,
        since=wanted.since,
        until=wanted.until,
        limit=limit,
        before_seq=before,
    )
    record(state, principal, AuditAction.AUDIT_VIEWED, detail="via the API")
    return [AuditRecordOut.model_validate(r.to_json()) for r in records]


@router.get("/health", response_model=HealthOut, tags=["health"])
def health(request: Request, principal: Technician) -> HealthOut:
    return HealthOut.model_validate(health_summary(web_state(request)))


# -- users and tokens ------------------------------------------------------------------------


def _user_out(user: User) -> UserOut:
    return UserOut(
        username=user.username,
        role=user.role.value,
        galleries=list(user.galleries),
        disabled=user.disabled,
        must_change_password=user.must_change_password,
        created_at=user.created_at,
    )


def _token_out(token: Token) -> TokenOut:
    return TokenOut(
        token_id=token.token_id,
        username=token.username,
        name=token.name,
        scopes=sorted(s.value for s in token.scopes),
        created_at=token.created_at,
        expires_at=token.expires_at,
        revoked_at=token.revoked_at,
    )


@router.get("/users", response_model=list[UserOut], tags=["users"])
def users(request: Request, principal: UserAdmin) -> list[UserOut]:
    return [_user_out(u) for u in web_state(request).users.list()]


@router.post(
    "/users",
    response_model=UserCreated,
    status_code=201,
    tags=["users"],
    responses={
        202: {"model": UserCreated, "description": "a new admin waits for approval"},
        409: {"description": "a user of that name exists"},
    },
)
def user_create(request: Request, body: UserIn, principal: UserAdmin) -> Response:
    """A new user with a one-time password; its galleries (and an admin altogether) wait for a
    second person's approval under the two-person rule."""
    state = web_state(request)
    change = user_requests.create_user(
        state.approvals,
        principal,
        body.username,
        body.role,
        body.galleries,
        reason=body.reason,
        where="api /api/v1/users",
    )
    out = UserCreated(
        user=_user_out(change.user) if change.user else None,
        one_time_password=change.one_time_password,
        waiting=[ProposalOut.of(p, state.approvals.ttl) for p in change.waiting],
    )
    return JSONResponse(out.model_dump(mode="json"), status_code=201 if change.user else 202)


@router.patch("/users/{username}", response_model=UserChanged, tags=["users"])
def user_update(
    request: Request, username: str, body: UserPatch, principal: UserAdmin
) -> UserChanged:
    """Galleries taken away, roles other than admin and disabling apply at once; galleries
    added and making an admin wait for a second person (listed in ``waiting``)."""
    state = web_state(request)
    change = user_requests.update_user(
        state.approvals,
        principal,
        username,
        role=body.role,
        galleries=body.galleries,
        disabled=body.disabled,
        reason=body.reason,
        where="api /api/v1/users/{username}",
    )
    assert change.user is not None  # an existing user
    return UserChanged(
        **_user_out(change.user).model_dump(),
        waiting=[ProposalOut.of(p, state.approvals.ttl) for p in change.waiting],
    )


@router.post("/users/{username}/password-reset", response_model=OneTimePassword, tags=["users"])
def user_reset(request: Request, username: str, principal: UserAdmin) -> OneTimePassword:
    password = web_state(request).accounts.reset_password(
        principal, username, where="api /api/v1/users/{username}/password-reset"
    )
    return OneTimePassword(one_time_password=password)


@router.post("/users/{username}/unlock", status_code=204, tags=["users"])
def user_unlock(request: Request, username: str, principal: UserAdmin) -> Response:
    """Clear the sign-in delays that wrong passwords put on this account, from every address
    (recorded as ``lock_cleared``)."""
    web_state(request).accounts.clear_lock(
        principal, username, where="api /api/v1/users/{username}/unlock"
    )
    return Response(status_code=204)


@router.get("/tokens", response_model=list[TokenOut], tags=["account"])
def tokens(request: Request, principal: Anyone) -> list[TokenOut]:
    """This user's tokens (every user's, for a token with the users scope)."""
    owner = None if principal.may(Permission.USERS) else principal.username
    return [_token_out(t) for t in web_state(request).tokens.list(owner)]


@router.delete("/tokens/{token_id}", status_code=204, tags=["account"])
def token_revoke(request: Request, token_id: str, principal: Anyone) -> Response:
    web_state(request).accounts.revoke_token(
        principal, token_id, where="api /api/v1/tokens/{token_id}"
    )
    return Response(status_code=204)


# -- the two-person rule ---------------------------------------------------------------------


@router.get("/approvals", response_model=list[ProposalOut], tags=["approvals"])
def approvals(request: Request, principal: Approver) -> list[ProposalOut]:
    """Proposals waiting for a second person, oldest first."""
    service = web_state(request).approvals
    return [ProposalOut.of(p, service.ttl) for p in service.pending(principal)]


@router.post("/approvals/{proposal_id}/approve", response_model=ApprovalOut, tags=["approvals"])
def approve(request: Request, proposal_id: str, principal: Approver) -> ApprovalOut:
    """Approve another person's proposal; the change is carried out at once (a new admin's
    one-time password comes back once)."""
    service = web_state(request).approvals
    outcome = service.approve(principal, proposal_id, where="api /api/v1/approvals/approve")
    assert outcome.proposal is not None  # approved through a proposal
    return ApprovalOut(
        proposal=ProposalOut.of(outcome.proposal, service.ttl),
        summary=outcome.summary,
        one_time_password=outcome.one_time_password,
    )


@router.post("/approvals/{proposal_id}/reject", response_model=ProposalOut, tags=["approvals"])
def reject(request: Request, proposal_id: str, principal: Approver) -> ProposalOut:
    service = web_state(request).approvals
    proposal = service.reject(principal, proposal_id, where="api /api/v1/approvals/reject")
    return ProposalOut.of(proposal, service.ttl)
