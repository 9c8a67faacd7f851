"""Supervisor pages: the audit log with its filters, its signed export, and retention."""

from __future__ import annotations

import tempfile
from datetime import date, datetime, timedelta
from datetime import time as daytime
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.audit import AuditAction, AuditRecord, RecordFilter, audit_dir, export_log
from edgeid.runtime.compat import UTC
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.records import Subject
from edgeid.runtime.identity.device_key import load_device_key
from edgeid.runtime.web import operations as ops
from edgeid.runtime.web.access import PageAccess, posted
from edgeid.runtime.web.audit_trail import record
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.rendering import flash, render
from edgeid.runtime.web.state import WebState, web_state

router = APIRouter(include_in_schema=False)

Auditor = Annotated[Principal, Depends(PageAccess(Permission.AUDIT_READ))]
RetentionOfficer = Annotated[Principal, Depends(PageAccess(Permission.RETENTION))]
AUDIT_PAGE_SIZE = 100


# -- audit -----------------------------------------------------------------------------------


def _day(value: str, name: str) -> date | None:
    if not value.strip():
        return None
    try:
        return date.fromisoformat(value.strip())
    except ValueError:
        raise BadInputError(
            f"the {name} date {value.strip()!r} is not a date; write it as year-month-day, "
            "for example 2027-01-31"
        ) from None


def audit_filter(params: dict[str, str]) -> RecordFilter:
    """The page's filters: user, the start of a case number, action, and a range of whole days
    (UTC, inclusive)."""
    since = _day(params.get("since", ""), "from")
    until = _day(params.get("until", ""), "to")
    action = params.get("action", "").strip()
    if action and action not in {a.value for a in AuditAction}:
        raise BadInputError("choose an action from the list")
    return RecordFilter(
        user=params.get("user", "").strip() or None,
        case_prefix=params.get("case", "").strip() or None,
        action=AuditAction(action) if action else None,
        since=datetime.combine(since, daytime(), UTC) if since else None,
        until=datetime.combine(until + timedelta(days=1), daytime(), UTC) if until else None,
    )


@router.get("/audit")
def audit_page(request: Request, principal: Auditor) -> Response:
    state = web_state(request)
    params = dict(request.query_params)
    error = None
    records: list[AuditRecord] = []
    before: int | None = None
    try:
        wanted = audit_filter(params)
        before_text = params.get("before", "").strip()
        before = int(before_text) if before_text.isdigit() else None
        records = state.audit.query(
            user=wanted.user,
            case_prefix=wanted.case_prefix,
            action=wanted.action,
            since=wanted.since,
            until=wanted.until,
            limit=AUDIT_PAGE_SIZE,
            before_seq=before,
        )
        record(state, principal, AuditAction.AUDIT_VIEWED, detail=wanted.describe())
    except BadInputError as exc:
        error = str(exc)
    older = None
    if len(records) == AUDIT_PAGE_SIZE:
        keep = {k: v for k, v in params.items() if k != "before"}
        older = {**keep, "before": str(records[-1].seq)}
    return render(
        request,
        "audit.html",
        principal=principal,
        status_code=400 if error else 200,
        records=records,
        params=params,
        actions=[a.value for a in AuditAction],
        error=error,
        older=older,
    )


@router.post("/audit/export")
def audit_export(request: Request, principal: Auditor) -> Response:
    """A signed export of the filtered records (the format ``edgeid audit export`` writes),
    checkable anywhere with the box's public key."""
    state = web_state(request)
    form = posted(request)
    wanted = audit_filter({k: form.get(k) for k in ("user", "case", "action", "since", "until")})
    record(state, principal, AuditAction.AUDIT_EXPORTED, detail=wanted.describe())
    with tempfile.TemporaryDirectory(prefix=".audit-export-", dir=state.home) as folder:
        output = Path(folder) / "export.jsonl"
        export_log(
            audit_dir(state.home),
            state.galleries.store.keyring,
            load_device_key(state.home),
            output,
            wanted=wanted,
            device_id=state.settings.device.device_id,
        )
        body = output.read_bytes()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"edgeid-audit-{state.settings.device.device_id}-{stamp}.jsonl"
    return Response(
        body,
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


# -- retention -------------------------------------------------------------------------------


def expired_subjects(
    state: WebState, today: date
) -> tuple[list[tuple[str, Subject]], dict[str, int]]:
    """Subjects past their retention date, and per gallery how many have no date at all."""
    expired: list[tuple[str, Subject]] = []
    undated: dict[str, int] = {}
    for info in state.galleries.list_galleries():
        for subject in state.galleries.subjects(info.name):
            if subject.retention_until is None:
                undated[info.name] = undated.get(info.name, 0) + 1
            elif subject.retention_until < today:
                expired.append((info.name, subject))
    return expired, undated


@router.get("/retention")
def retention_page(request: Request, principal: RetentionOfficer) -> Response:
    expired, undated = expired_subjects(web_state(request), date.today())
    return render(
        request,
        "retention.html",
        principal=principal,
        expired=expired,
        undated=undated,
        error=None,
    )


def _due_subject(state: WebState, gallery: str, subject_id: str) -> Subject:
    subject = state.galleries.subject(gallery, subject_id)
    if subject.retention_until is None or subject.retention_until >= date.today():
        raise BadInputError(
            "this subject's retention period is not over; the Retention page lists those that are"
        )
    return subject


@router.get("/retention/{gallery}/{subject_id}")
def retention_erase_confirm(
    request: Request, gallery: str, subject_id: str, principal: RetentionOfficer
) -> Response:
    """Erasure has its own page: what goes, for good, and a confirmation (no button in a
    table row to hit by mistake). Ids and dates only, never a name or a face."""
    subject = _due_subject(web_state(request), gallery, subject_id)
    return render(
        request,
        "retention_erase.html",
        principal=principal,
        gallery=gallery,
        subject=subject,
    )


@router.post("/retention/{gallery}/{subject_id}")
def retention_erase(
    request: Request, gallery: str, subject_id: str, principal: RetentionOfficer
) -> Response:
    state = web_state(request)
    form = posted(request)
    if form.get("confirm") != subject_id:
        flash(principal, "Nothing was erased: tick the box to confirm the erasure, then erase.")
        return RedirectResponse(f"/retention/{quote(gallery)}/{subject_id}", status_code=303)
    _due_subject(state, gallery, subject_id)
    ops.delete_subject(
        state, principal, gallery, subject_id, reason=form.get("reason") or "retention period over"
    )
    flash(principal, f"Subject {subject_id} erased from {gallery}.")
    return RedirectResponse("/retention", status_code=303)
