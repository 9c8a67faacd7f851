"""Case ingest for the pages and the API, written once (like ``operations.py``).

Who sees a case: the investigator who opened it (its ``created_by``), and only the leads in
galleries they may still search. Supervisors account for cases through the audit log (each
ingest, each cluster search, each report download) and never see a case's faces or names,
as everywhere else on the box. Another investigator cannot add media to, or read, a case
someone else opened: they ask its owner, or an admin moves the work.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.audit.justification import Justification
from edgeid.runtime.cases.errors import CaseNotFoundError
from edgeid.runtime.cases.jobs import IngestJob
from edgeid.runtime.cases.records import CaseMeta
from edgeid.runtime.cases.video import DEFAULT_FRAME_INTERVAL_S, MIN_FRAME_INTERVAL_S
from edgeid.runtime.cases.views import CaseView
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.services.cases import AccountableCases
from edgeid.runtime.web import work_context
from edgeid.runtime.web.case_jobs import CaseDesk, CaseJob, PendingIngest
from edgeid.runtime.web.case_uploads import SavedArchive, source_label
from edgeid.runtime.web.errors import NotFoundError
from edgeid.runtime.web.operations import check_retention, choose_galleries, require_gallery
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.state import WebState
from edgeid.runtime.web.workspace import Workspace

MAX_FRAME_INTERVAL_S = 3600.0  # one frame an hour already misses nearly everything


def desk(state: WebState) -> CaseDesk:
    if state.cases is None:
        raise NotFoundError("case ingest is not set up on this box")
    return state.cases


def access(state: WebState) -> AccountableCases:
    if state.case_access is None:
        raise NotFoundError("case ingest is not set up on this box")
    return state.case_access


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
    on_cluster: bool = False,
) -> PendingIngest:
    """Case number, reason and galleries first, before any media is accepted."""
    cases = desk(state)
    why = Justification.of(case, reason)
    if on_cluster and cases.farm is None:
        raise BadInputError("this box has no cluster set up ([cluster] address in edgeid.toml)")
    plan = PendingIngest(
        entry_id=Workspace.new_id(),
        owner=principal.owner,
        username=principal.username,
        case=why.case,
        reason=why.reason,
        galleries=choose_galleries(state, principal, galleries, where="plan a case ingest"),
        frame_interval_s=check_frame_interval(frame_interval_s),
        retention_until=check_retention(retention_until),
        children=children,
        on_cluster=on_cluster,
    )
    access(state).check_may_ingest_into(principal, why.case, where="plan a case ingest")
    cases.plans.put(plan)
    return plan


def _setting(children: bool | None) -> str:
    return "as the case is set" if children is None else str(children).lower()


def _where(on_cluster: bool) -> str:
    return "on the lab's cluster" if on_cluster else "on this box"


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
        require_gallery(state, principal, Permission.SEARCH, name, where="case ingest upload")
    desk(state).jobs.check_free()


def start_ingest(
    state: WebState, principal: Principal, plan: PendingIngest, archive: SavedArchive
) -> CaseJob:
    """Record the ingest, then run it in a worker; the archive is shredded when it ends.

    The caller shreds the archive if this raises (nothing started)."""
    cases = desk(state)
    ready_for_upload(state, principal, plan)
    why = Justification(plan.case, plan.reason)
    request = access(state).ingest_request(
        principal,
        why,
        archive.path,
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
        job=IngestJob(
            cases.service,
            request,
            on_end=lambda: cases.uploads.discard(archive.path),
            farm=cases.farm if plan.on_cluster else None,
        ),
    )
    cases.jobs.add(job)  # refuses when another ingest took the box meanwhile
    try:
        access(state).record_ingest(
            principal,
            why,
            plan.galleries,
            source_sha256=archive.sha256,
            detail=(
                f"archive of {archive.size} bytes uploaded; video frame interval "
                f"{plan.frame_interval_s:g} s; may include children {_setting(plan.children)}; "
                f"images analysed {_where(plan.on_cluster)}; job {job.job_id}"
            ),
            where="case ingest",
        )
    except BaseException:
        cases.jobs.forget(job.job_id)  # never started: an ingest nobody can account for
        raise
    job.job.start()
    cases.plans.remove(plan.entry_id)
    work_context.adopt(principal, why)
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
    return access(state).mine(principal)


def case_number(state: WebState, principal: Principal, case_id: str) -> str:
    """The case's number, if this user may open it (a refusal is recorded)."""
    try:
        return access(state).open(principal, case_id, where="open a case").meta.number
    except CaseNotFoundError:
        raise NotFoundError("no such case, or it is not yours") from None


def reason_for(request: Request, principal: Principal, number: str) -> str:
    """The reason stated for this very case: the session's context, or the API headers."""
    return work_context.require(request, principal, case=number).reason


def view(request: Request, state: WebState, principal: Principal, case_id: str) -> CaseView:
    number = case_number(state, principal, case_id)
    reason = reason_for(request, principal, number)
    return access(state).view(principal, case_id, reason, where="case page")


def report(request: Request, state: WebState, principal: Principal, case_id: str) -> str:
    """The report of what this user may see, recorded in the audit log before it is given."""
    number = case_number(state, principal, case_id)
    reason = reason_for(request, principal, number)
    return access(state).report(principal, case_id, reason, where="case report")


def thumbnail(
    request: Request, state: WebState, principal: Principal, case_id: str, face_id: str
) -> bytes:
    """Free after this session's recorded case page; otherwise recorded with its reason."""
    number = case_number(state, principal, case_id)
    now = work_context.current(principal)
    if principal.via == "token":
        reason: str | None = (
            work_context.from_headers(request).reason
            if request.headers.get(work_context.REASON_HEADER)
            else None
        )
    else:
        reason = now.reason if now is not None and now.case == number else None
    try:
        return access(state).thumbnail(principal, case_id, face_id, reason, where="case photo")
    except CaseNotFoundError:
        raise NotFoundError("no such face in this case") from None
