"""Enrolment (quality gate, duplicate check), subject pages and erasure with confirmation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.audit.justification import Justification
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.service import ENROL_MIN_QUALITY, DuplicateSubjectError
from edgeid.runtime.web import operations as ops
from edgeid.runtime.web import work_context
from edgeid.runtime.web.access import PageAccess, posted
from edgeid.runtime.web.images import display_jpeg, jpeg_response
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.rendering import flash, render
from edgeid.runtime.web.state import web_state
from edgeid.runtime.web.workspace import PendingEnrolment

router = APIRouter(include_in_schema=False)

Reader = Annotated[Principal, Depends(PageAccess(Permission.SUBJECTS_READ))]
Enroller = Annotated[Principal, Depends(PageAccess(Permission.ENROL))]
Eraser = Annotated[Principal, Depends(PageAccess(Permission.SUBJECTS_DELETE))]


# -- reading ---------------------------------------------------------------------------------


@router.get("/galleries")
def galleries_page(request: Request, principal: Reader) -> Response:
    state = web_state(request)
    mine = set(ops.usable_galleries(state, principal, Permission.SUBJECTS_READ))
    infos = [g for g in state.galleries.list_galleries() if g.name in mine]
    return render(request, "galleries.html", principal=principal, galleries=infos)


@router.get("/galleries/{gallery}/subjects")
def subjects_page(
    request: Request, gallery: str, principal: Reader, q: str = "", page: str = "1"
) -> Response:
    """The subjects, with a photo each, found by name (names are sealed: the core searches
    the decrypted names), a page at a time."""
    state = web_state(request)
    ops.require_gallery(state, principal, Permission.SUBJECTS_READ, gallery, where="subject list")
    why = work_context.require(request, principal)
    listed = state.accountable.subject_list(
        principal,
        why,
        gallery,
        query=q,
        page=int(page) if page.isdigit() and int(page) > 0 else 1,
        where="GET /galleries/{gallery}/subjects",
    )
    return render(
        request,
        "subjects.html",
        principal=principal,
        gallery=gallery,
        work=why,
        listed=listed,
        may_enrol=principal.may_use_gallery(Permission.ENROL, gallery),
    )


@router.get("/galleries/{gallery}/subjects/{subject_id}")
def subject_page(request: Request, gallery: str, subject_id: str, principal: Reader) -> Response:
    state = web_state(request)
    ops.require_gallery(state, principal, Permission.SUBJECTS_READ, gallery, where="subject page")
    why = work_context.require(request, principal)
    shown = state.accountable.subject(
        principal, why, gallery, subject_id, where="GET /galleries/{gallery}/subjects/{id}"
    )
    return render(
        request,
        "subject.html",
        principal=principal,
        gallery=gallery,
        work=why,
        subject=shown.subject,
        faces=shown.faces,
        may_delete=principal.may_use_gallery(Permission.SUBJECTS_DELETE, gallery),
        may_enrol=principal.may_use_gallery(Permission.ENROL, gallery),
    )


# -- another photo, and edits ----------------------------------------------------------------


def _photo_page(
    request: Request,
    principal: Principal,
    gallery: str,
    subject_id: str,
    *,
    error: str | None = None,
    status_code: int = 200,
    age: str = "",
) -> Response:
    state = web_state(request)
    ops.require_gallery(state, principal, Permission.ENROL, gallery, where="add a photo")
    why = work_context.require(request, principal)
    shown = state.accountable.subject(principal, why, gallery, subject_id, where="add a photo")
    return render(
        request,
        "subject_photo.html",
        principal=principal,
        status_code=status_code,
        gallery=gallery,
        work=why,
        subject=shown.subject,
        faces=shown.faces,
        max_upload_mb=state.max_upload_bytes / (1024 * 1024),
        error=error,
        age=age,
    )


@router.get("/galleries/{gallery}/subjects/{subject_id}/photos")
def photo_form(request: Request, gallery: str, subject_id: str, principal: Enroller) -> Response:
    return _photo_page(request, principal, gallery, subject_id)


@router.post("/galleries/{gallery}/subjects/{subject_id}/photos")
def photo_add(request: Request, gallery: str, subject_id: str, principal: Enroller) -> Response:
    """Another photo of an enrolled subject, with its age at capture. A photo of one face is
    added at once; with several, the face picker asks which."""
    state = web_state(request)
    form = posted(request)
    upload = form.files.get("photo")
    age = form.get("age_at_capture")
    try:
        pending = ops.prepare_photo(
            state,
            principal,
            gallery,
            subject_id,
            upload.data if upload else b"",
            ops.check_age_at_capture(age),
        )
        if len(pending.probe.faces) > 1:
            return RedirectResponse(f"/enrol/{pending.entry_id}", status_code=303)
        ops.add_to_subject(state, principal, pending, 0, subject_id)
    except BadInputError as exc:
        return _photo_page(
            request, principal, gallery, subject_id, error=str(exc), status_code=400, age=age
        )
    flash(principal, "Photo added to the subject.")
    return RedirectResponse(f"/galleries/{gallery}/subjects/{subject_id}", status_code=303)


def _edit_page(
    request: Request,
    principal: Principal,
    gallery: str,
    subject_id: str,
    *,
    error: str | None = None,
    status_code: int = 200,
    values: dict[str, str] | None = None,
) -> Response:
    state = web_state(request)
    ops.require_gallery(state, principal, Permission.ENROL, gallery, where="edit a subject")
    why = work_context.require(request, principal)
    shown = state.accountable.subject(principal, why, gallery, subject_id, where="edit a subject")
    subject = shown.subject
    return render(
        request,
        "subject_edit.html",
        principal=principal,
        status_code=status_code,
        gallery=gallery,
        work=why,
        subject=subject,
        error=error,
        values=values
        or {
            "display_name": subject.display_name,
            "notes": subject.notes,
            "legal_basis": subject.legal_basis,
            "retention_until": str(subject.retention_until or ""),
        },
    )


@router.get("/galleries/{gallery}/subjects/{subject_id}/edit")
def edit_form(request: Request, gallery: str, subject_id: str, principal: Enroller) -> Response:
    return _edit_page(request, principal, gallery, subject_id)


@router.post("/galleries/{gallery}/subjects/{subject_id}/edit")
def edit_subject(request: Request, gallery: str, subject_id: str, principal: Enroller) -> Response:
    """Name, notes, legal basis, retention: recorded under the session's case with this
    change's own reason, before it is made."""
    state = web_state(request)
    form = posted(request)
    fields = {
        name: form.get(name)
        for name in ("display_name", "notes", "legal_basis", "retention_until", "reason")
    }
    why = work_context.require(request, principal)
    try:
        justification = Justification.of(why.case, fields["reason"])
        state.accountable.edit_subject(
            principal,
            justification,
            gallery,
            subject_id,
            display_name=fields["display_name"],
            notes=fields["notes"],
            legal_basis=fields["legal_basis"],
            retention_until=ops.check_retention(fields["retention_until"]),
            where="edit a subject",
        )
    except BadInputError as exc:
        return _edit_page(
            request,
            principal,
            gallery,
            subject_id,
            error=str(exc),
            status_code=400,
            values=fields,
        )
    flash(principal, "Subject changed; the change is in the audit log.")
    return RedirectResponse(f"/galleries/{gallery}/subjects/{subject_id}", status_code=303)


@router.get("/galleries/{gallery}/faces/{face_id}/thumbnail.jpg")
def face_thumbnail(request: Request, gallery: str, face_id: str, principal: Reader) -> Response:
    """An enrolled photo: free after the recorded page that showed it to this session (search
    results, a subject's record, a duplicate warning), otherwise recorded on its own."""
    state = web_state(request)
    why = work_context.current(principal)
    jpeg = state.accountable.thumbnail(
        principal, why, gallery, face_id, where="GET /galleries/{gallery}/faces/{id}"
    )
    return jpeg_response(jpeg)


# -- erasure ---------------------------------------------------------------------------------


def _delete_page(
    request: Request,
    principal: Principal,
    gallery: str,
    subject_id: str,
    *,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    state = web_state(request)
    why = work_context.require(request, principal)
    shown = state.accountable.subject(principal, why, gallery, subject_id, where="erase a subject")
    return render(
        request,
        "subject_delete.html",
        principal=principal,
        status_code=status_code,
        gallery=gallery,
        subject=shown.subject,
        faces=shown.faces,
        error=error,
    )


@router.get("/galleries/{gallery}/subjects/{subject_id}/delete")
def delete_confirm(request: Request, gallery: str, subject_id: str, principal: Eraser) -> Response:
    ops.require_gallery(
        web_state(request), principal, Permission.SUBJECTS_DELETE, gallery, where="erase a subject"
    )
    return _delete_page(request, principal, gallery, subject_id)


@router.post("/galleries/{gallery}/subjects/{subject_id}/delete")
def delete_subject(request: Request, gallery: str, subject_id: str, principal: Eraser) -> Response:
    state = web_state(request)
    form = posted(request)
    try:
        if form.get("confirm") != subject_id:
            raise BadInputError("tick the box to confirm the erasure")
        ops.delete_subject(state, principal, gallery, subject_id, reason=form.get("reason"))
    except BadInputError as exc:
        return _delete_page(
            request, principal, gallery, subject_id, error=str(exc), status_code=400
        )
    flash(principal, f"Subject {subject_id} erased from {gallery}.")
    return RedirectResponse(f"/galleries/{gallery}/subjects", status_code=303)


# -- enrolment -------------------------------------------------------------------------------


def _enrol_page(
    request: Request,
    principal: Principal,
    *,
    error: str | None = None,
    status_code: int = 200,
    values: dict[str, str] | None = None,
) -> Response:
    state = web_state(request)
    return render(
        request,
        "enrol.html",
        principal=principal,
        status_code=status_code,
        galleries=ops.usable_galleries(state, principal, Permission.ENROL),
        max_upload_mb=state.max_upload_bytes / (1024 * 1024),
        error=error,
        values=values or {},
    )


@router.get("/enrol")
def enrol_form(request: Request, principal: Enroller) -> Response:
    return _enrol_page(request, principal)


@router.post("/enrol")
def enrol_start(request: Request, principal: Enroller) -> Response:
    state = web_state(request)
    form = posted(request)
    fields = {
        name: form.get(name)
        for name in (
            "gallery",
            "display_name",
            "legal_basis",
            "notes",
            "retention_until",
            "age_at_capture",
        )
    }
    upload = form.files.get("photo")
    try:
        checked = ops.check_enrolment(
            state,
            principal,
            gallery=fields["gallery"],
            display_name=fields["display_name"],
            legal_basis=fields["legal_basis"],
            notes=fields["notes"],
            retention_until=fields["retention_until"],
            age_at_capture=fields["age_at_capture"],
        )
        pending = ops.prepare_enrolment(state, principal, checked, upload.data if upload else b"")
    except BadInputError as exc:
        return _enrol_page(request, principal, error=str(exc), status_code=400, values=fields)
    if len(pending.probe.faces) == 1:
        return _finish(request, principal, pending, 0, allow_duplicate=False)
    return RedirectResponse(f"/enrol/{pending.entry_id}", status_code=303)


def _pick_page(
    request: Request,
    principal: Principal,
    pending: PendingEnrolment,
    *,
    error: str | None = None,
    duplicates: DuplicateSubjectError | None = None,
    face_index: int | None = None,
    status_code: int = 200,
) -> Response:
    ordered = pending.probe.left_to_right()
    return render(
        request,
        "enrol_pick.html",
        principal=principal,
        status_code=status_code,
        pending=pending,
        probe=pending.probe,
        ordered=ordered,
        numbers={f.index: n for n, f in enumerate(ordered, start=1)},
        min_quality=ENROL_MIN_QUALITY,
        error=error,
        duplicates=duplicates.candidates if duplicates else (),
        face_index=face_index,
    )


def _finish(
    request: Request,
    principal: Principal,
    pending: PendingEnrolment,
    face_index: int,
    *,
    allow_duplicate: bool,
) -> Response:
    state = web_state(request)
    try:
        enrolled = ops.complete_enrolment(
            state, principal, pending, face_index, allow_duplicate=allow_duplicate
        )
    except DuplicateSubjectError as exc:
        message = (
            "This face already matches the subject(s) below in this gallery. Add the photo to "
            "that subject instead, or, if you have checked that they are different people, "
            "enrol anyway."
        )
        return _pick_page(
            request,
            principal,
            pending,
            error=message,
            duplicates=exc,
            face_index=face_index,
            status_code=409,
        )
    except BadInputError as exc:
        return _pick_page(request, principal, pending, error=str(exc), status_code=422)
    flash(principal, "Subject enrolled.")
    subject_id = enrolled.subject.subject_id
    # The subject's page asks for the case being worked on, if the session has not stated one.
    return RedirectResponse(f"/galleries/{enrolled.gallery}/subjects/{subject_id}", status_code=303)


@router.get("/enrol/{entry_id}")
def enrol_pick(request: Request, entry_id: str, principal: Enroller) -> Response:
    pending = ops.load_enrolment(web_state(request), principal, entry_id)
    return _pick_page(request, principal, pending)


@router.get("/enrol/{entry_id}/faces/{face_index}.jpg")
def enrol_face(request: Request, entry_id: str, face_index: int, principal: Enroller) -> Response:
    """One face of the photo being enrolled, aligned as the embedder sees it (the picker's
    thumbnails): the enroller's own upload, nothing enrolled."""
    pending = ops.load_enrolment(web_state(request), principal, entry_id)
    return jpeg_response(pending.probe.chip_jpeg(face_index))


@router.get("/enrol/{entry_id}/photo.jpg")
def enrol_photo(request: Request, entry_id: str, principal: Enroller) -> Response:
    pending = ops.load_enrolment(web_state(request), principal, entry_id)
    return jpeg_response(display_jpeg(pending.image))


@router.post("/enrol/{entry_id}")
def enrol_finish(request: Request, entry_id: str, principal: Enroller) -> Response:
    pending = ops.load_enrolment(web_state(request), principal, entry_id)
    form = posted(request)
    try:
        face_index = ops.check_face_index(form.get("face"))
    except BadInputError as exc:
        return _pick_page(request, principal, pending, error=str(exc), status_code=400)
    allow = form.get("allow_duplicate") == "yes"
    return _finish(request, principal, pending, face_index, allow_duplicate=allow)


@router.post("/enrol/{entry_id}/add")
def enrol_add_face(request: Request, entry_id: str, principal: Enroller) -> Response:
    """The photo's face goes to an enrolled subject instead of a new one."""
    state = web_state(request)
    pending = ops.load_enrolment(state, principal, entry_id)
    form = posted(request)
    subject_id = form.get("subject_id")
    try:
        face_index = ops.check_face_index(form.get("face"))
        ops.add_to_subject(state, principal, pending, face_index, subject_id)
    except BadInputError as exc:
        return _pick_page(request, principal, pending, error=str(exc), status_code=422)
    flash(principal, "Photo added to the subject.")
    return RedirectResponse(f"/galleries/{pending.gallery}/subjects/{subject_id}", status_code=303)
