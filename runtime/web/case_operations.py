"""Case ingest for the pages and the API, written once (like ``operations.py``).

Who sees a case: the investigator who opened it (its ``created_by``), and only the leads in
galleries they may still search. Supervisors account for cases through the audit log (each
ingest, each cluster search, each report download) and never see a case's faces or names,
as everywhere else on the box. Another investigator cannot add media to, or read, a case
someone else opened: they ask its owner, or an admin moves the work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import date

from runtime.accounts.roles import Permission
from runtime.audit import AuditAction
from runtime.cases.errors import CaseNotFoundError
from runtime.cases.ingest import IngestRequest, Requester
from runtime.cases.jobs import IngestJob
from runtime.cases.records import CaseMeta, ClusterSearch
from runtime.cases.report import render_report
from runtime.cases.store import Case
from runtime.cases.video import DEFAULT_FRAME_INTERVAL_S, MIN_FRAME_INTERVAL_S
from runtime.cases.views import CaseView, case_view
from runtime.errors import BadInputError
from runtime.vault.crypto import utc_now
from runtime.web.audit_trail import record
from runtime.web.case_jobs import CaseDesk, CaseJob, PendingIngest
from runtime.web.case_uploads import SavedArchive, source_label
from runtime.web.errors import ForbiddenError, NotFoundError
from runtime.web.operations import (
    MAX_GALLERY_FIELD_CHARS,
    check_case,
    check_reason,
    choose_galleries,
    require_gallery,
)
from runtime.web.principal import Principal
from runtime.web.state import WebState
from runtime.web.workspace import Workspace

MAX_FRAME_INTERVAL_S = 3600.0  # one frame an hour already misses nearly everything


def desk(state: WebState) -> CaseDesk:
    if state.cases is None:
        raise NotFoundError("case ingest is not set up on this box")
    return state.cases


# -- checks ----------------------------------------------------------------------------------


def check_frame_interval(value: str | float | None) -> float:
    if value in (None, ""):
        return DEFAULT_FRAME_INTERVAL_S
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not MIN_FRAME_INTERVAL_S <= seconds <= MAX_FRAME_INTERVAL_S:
        raise BadInputError(
            f"the video frame interval is seconds between {MIN_FRAME_INTERVAL_S} and "
            f"{MAX_FRAME_INTERVAL_S:g}"
        )
    return seconds


def check_retention(value: str | None, today: date | None = None) -> date | None:
    if not value or not value.strip():
        return None
    try:
        until = date.fromisoformat(value.strip())
    except ValueError:
        raise BadInputError("give the retention date as YYYY-MM-DD") from None
    if until <= (today or date.today()):
        raise BadInputError("the retention date must be in the future")
    return until


def _owns(meta: CaseMeta, principal: Principal) -> bool:
    return meta.created_by == principal.username


# -- ingest ----------------------------------------------------------------------------------


def plan_ingest(
    state: WebState,
    principal: Principal,
    *,
    case: str,
    reason: str,
    galleries: Sequence[str] = (),
    frame_interval_s: str | float | None = None,
    retention_until: str | None = None,
    children: bool | None = None,
) -> PendingIngest:
    """Case number, reason and galleries first, before any media is accepted."""
    cases = desk(state)
    number = check_case(case)
    plan = PendingIngest(
        entry_id=Workspace.new_id(),
        owner=principal.owner,
        username=principal.username,
        case=number,
        reason=check_reason(reason),
        galleries=choose_galleries(state, principal, galleries),
        frame_interval_s=check_frame_interval(frame_interval_s),
        retention_until=check_retention(retention_until),
        children=children,
    )
    _check_may_ingest_into(cases, principal, number)
    cases.plans.put(plan)
    return plan


def _check_may_ingest_into(cases: CaseDesk, principal: Principal, number: str) -> None:
    try:
        meta = cases.service.store.find(number).meta
    except CaseNotFoundError:
        return
    if not _owns(meta, principal):
        raise ForbiddenError(
            f"case {number} was opened by another investigator; ask them to add this media"
        )


def _setting(children: bool | None) -> str:
    return "as the case is set" if children is None else str(children).lower()


def load_plan(state: WebState, principal: Principal, entry_id: str) -> PendingIngest:
    plan = desk(state).plans.get(principal.owner, entry_id)
    if plan is None:
        raise NotFoundError(
            "this ingest has expired or is not yours; start again with its case and reason"
        )
    return plan


def ready_for_upload(state: WebState, principal: Principal, plan: PendingIngest) -> None:
    """Checks made before a byte of the archive is read: access still held, box not busy."""
    for name in plan.galleries:
        require_gallery(principal, Permission.SEARCH, name)
    desk(state).jobs.check_free()


def start_ingest(
    state: WebState, principal: Principal, plan: PendingIngest, archive: SavedArchive
) -> CaseJob:
    """Record the ingest, then run it in a worker; the archive is shredded when it ends.

    The caller shreds the archive if this raises (nothing started)."""
    cases = desk(state)
    ready_for_upload(state, principal, plan)
    _check_may_ingest_into(cases, principal, plan.case)
    request = IngestRequest(
        source=archive.path,
        case_number=plan.case,
        reason=plan.reason,
        requester=Requester(principal.username, principal.role.value),
        galleries=plan.galleries,
        frame_interval_s=plan.frame_interval_s,
        retention_until=plan.retention_until,
        source_label=source_label(archive.filename),
        children=plan.children,
    )
    job = CaseJob(
        job_id=cases.jobs.new_id(),
        username=principal.username,
        case=plan.case,
        galleries=plan.galleries,
        job=IngestJob(cases.service, request, on_end=lambda: cases.uploads.discard(archive.path)),
    )
    cases.jobs.add(job)  # refuses when another ingest took the box meanwhile
    joined = ", ".join(plan.galleries)
    try:
        record(
            state,
            principal,
            AuditAction.CASE_INGESTED,
            case=plan.case,
            reason=plan.reason,
            gallery=joined if len(joined) <= MAX_GALLERY_FIELD_CHARS else None,
            probe_sha256=archive.sha256,
            detail=(
                f"archive of {archive.size} bytes uploaded; galleries {joined}; video frame "
                f"interval {plan.frame_interval_s:g} s; may include children "
                f"{_setting(plan.children)}; job {job.job_id}"
            ),
        )
    except BaseException:
        cases.jobs.forget(job.job_id)  # never started: an ingest nobody can account for
        raise
    job.job.start()
    cases.plans.remove(plan.entry_id)
    return job


def load_job(state: WebState, principal: Principal, job_id: str) -> CaseJob:
    job = desk(state).jobs.get(principal.username, job_id)
    if job is None:
        raise NotFoundError("no such ingest job, or it is not yours (jobs end with a restart)")
    return job


def job_json(state: WebState, job: CaseJob) -> dict[str, object]:
    return {
        "job_id": job.job_id,
        "case": job.case,
        "case_id": desk(state).case_id_of(job),
        **job.job.snapshot(),
    }


# -- reading cases ---------------------------------------------------------------------------


def my_cases(state: WebState, principal: Principal) -> list[CaseMeta]:
    metas = desk(state).service.list_cases()
    return sorted(
        (m for m in metas if _owns(m, principal)), key=lambda m: m.created_at, reverse=True
    )


def load_case(state: WebState, principal: Principal, case_id: str) -> Case:
    for meta in desk(state).service.list_cases():
        if meta.case_id == case_id and _owns(meta, principal):
            return desk(state).service.store.find(meta.number)
    raise NotFoundError("no such case, or it is not yours")


def visible_view(case: Case, principal: Principal) -> CaseView:
    """The case as this user may see it: leads only from galleries they may still search."""
    view = case_view(case)
    clusters = tuple(replace(c, search=_visible_search(c.search, principal)) for c in view.clusters)
    return replace(view, clusters=clusters)


def _visible_search(search: ClusterSearch | None, principal: Principal) -> ClusterSearch | None:
    if search is None:
        return None
    leads = tuple(
        lead for lead in search.leads if principal.may_use_gallery(Permission.SEARCH, lead.gallery)
    )
    return search if len(leads) == len(search.leads) else replace(search, leads=leads)


def report(state: WebState, principal: Principal, case: Case) -> str:
    """The report of what this user may see, recorded in the audit log before it is given."""
    html = render_report(visible_view(case, principal), case.thumbnail, generated_at=utc_now())
    record(
        state,
        principal,
        AuditAction.CASE_REPORT,
        case=case.meta.number,
        detail=f"case report downloaded ({len(html)} bytes)",
    )
    return html


def thumbnail(state: WebState, principal: Principal, case_id: str, face_id: str) -> bytes:
    case = load_case(state, principal, case_id)
    try:
        case.face(face_id)
    except BadInputError:
        raise NotFoundError("no such face in this case") from None
    return case.thumbnail(face_id)
