"""Cases through the accountable layer: every door's ingest, case page, case photos, report
and purge.

Who sees a case: the investigator who opened it (its ``created_by``), and the box's operator at
its shell (``Permission.CASES_ANY``); leads are shown only from galleries the caller may still
search. Opening a case, one of its photos or its report reveals evidence and is recorded under
the case's own number with the caller's reason before anything is returned.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import date
from pathlib import Path

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.audit.events import AuditAction
from edgeid.runtime.audit.justification import Justification, check_reason
from edgeid.runtime.audit.recorder import Recorder
from edgeid.runtime.cases.errors import CaseNotFoundError
from edgeid.runtime.cases.ingest import IngestRequest, Requester
from edgeid.runtime.cases.records import CaseMeta, ClusterSearch
from edgeid.runtime.cases.report import render_report, write_report
from edgeid.runtime.cases.service import CaseService
from edgeid.runtime.cases.store import Case
from edgeid.runtime.cases.views import CaseView, case_view
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.errors import GalleryError
from edgeid.runtime.services.caller import Caller
from edgeid.runtime.services.consent import ChangeKind, Consent, redeem
from edgeid.runtime.services.galleries import gallery_field
from edgeid.runtime.vault.crypto import Clock, utc_now

REVEAL_TTL_S = 30 * 60  # case photos shown on a recorded case page stay viewable this long
MAX_CASES_TRACKED = 1000


class AccountableCases:
    """See the module docstring."""

    def __init__(
        self,
        cases: CaseService,
        recorder: Recorder,
        *,
        clock: Clock = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cases = cases
        self.recorder = recorder
        self._clock = clock
        self._monotonic = monotonic
        self._shown: OrderedDict[tuple[str, str], float] = OrderedDict()  # (session, case id)
        # Called with a purged case's id: what else holds its evidence (the search history's
        # reviews of its leads hold its faces) erases it too.
        self.on_purged: list[Callable[[str], object]] = []
        self._lock = threading.Lock()

    # -- erasure ----------------------------------------------------------------------------

    def erase_subjects(self, gallery: str, subject_ids: frozenset[str]) -> int:
        """An ``ErasureParticipant``: a gallery subject's erasure reaches every case's leads
        and reports (``CaseStore.erase_subjects``). Recorded with the erasure itself."""
        return self.cases.store.erase_subjects(gallery, subject_ids)

    # -- access ------------------------------------------------------------------------------

    def owns(self, caller: Caller, meta: CaseMeta) -> bool:
        return meta.created_by == caller.actor.user or caller.may(Permission.CASES_ANY)

    def mine(self, caller: Caller) -> list[CaseMeta]:
        """The cases this caller may open, newest first (case numbers and counts only)."""
        metas = [m for m in self.cases.list_cases() if self.owns(caller, m)]
        return sorted(metas, key=lambda m: m.created_at, reverse=True)

    def open(self, caller: Caller, case_ref: str, *, where: str) -> Case:
        """A case by its id or number, if the caller may open it; a refusal is recorded."""
        for meta in self.cases.list_cases():
            if case_ref in (meta.case_id, meta.number):
                if not self.owns(caller, meta):
                    raise self.recorder.refused(
                        caller.actor,
                        "this case was opened by another investigator; ask them, or an admin",
                        where=where,
                        resource=f"case {meta.case_id}",
                        why="the case was opened by another investigator",
                    )
                return self.cases.store.find(meta.number)
        raise CaseNotFoundError(f"no case {case_ref!r} on this box")

    def _find(self, case_ref: str) -> Case:
        """A case by its id or number, no access check (an approved purge: the proposer's
        access was checked when they proposed)."""
        for meta in self.cases.list_cases():
            if case_ref in (meta.case_id, meta.number):
                return self.cases.store.find(meta.number)
        raise CaseNotFoundError(f"no case {case_ref!r} on this box")

    def check_may_ingest_into(self, caller: Caller, number: str, *, where: str) -> None:
        try:
            meta = self.cases.store.find(number).meta
        except CaseNotFoundError:
            return
        if not self.owns(caller, meta):
            raise self.recorder.refused(
                caller.actor,
                f"case {number} was opened by another investigator; ask them to add this media",
                where=where,
                resource=f"case {meta.case_id}",
                why="adding media to another investigator's case",
            )

    def check_galleries(self, caller: Caller, galleries: Sequence[str], *, where: str) -> None:
        for name in galleries:
            if not caller.may_use_gallery(Permission.SEARCH, name):
                raise self.recorder.refused(
                    caller.actor,
                    f"you may not search gallery {name!r}; ask an admin for access",
                    where=where,
                    resource=f"gallery {name}",
                    why="needs search",
                )

    # -- ingest ------------------------------------------------------------------------------

    def requester(self, caller: Caller) -> Requester:
        return Requester(caller.actor.user, caller.actor.role)

    def record_ingest(
        self,
        caller: Caller,
        justification: Justification,
        galleries: Sequence[str],
        *,
        source_sha256: str | None,
        detail: str,
        where: str,
    ) -> None:
        """Account for an ingest before it starts (its cluster searches are recorded one by
        one as they run). Raises, and nothing starts, if the record cannot be written."""
        self.check_galleries(caller, galleries, where=where)
        self.check_may_ingest_into(caller, justification.case, where=where)
        field, overflow = gallery_field(galleries) if galleries else ("every gallery", None)
        self.recorder.record(
            caller.actor,
            AuditAction.CASE_INGESTED,
            justification=justification,
            gallery=field,
            probe_sha256=source_sha256,
            detail="; ".join(p for p in (detail, overflow) if p),
        )

    def ingest_request(
        self,
        caller: Caller,
        justification: Justification,
        source: Path,
        *,
        galleries: tuple[str, ...] | None,
        frame_interval_s: float,
        retention_until: date | None,
        source_label: str | None = None,
        children: bool | None = None,
    ) -> IngestRequest:
        return IngestRequest(
            source=source,
            case_number=justification.case,
            reason=justification.reason,
            requester=self.requester(caller),
            galleries=galleries,
            frame_interval_s=frame_interval_s,
            retention_until=retention_until,
            source_label=source_label,
            children=children,
        )

    # -- reveals -----------------------------------------------------------------------------

    def visible_view(self, caller: Caller, case: Case) -> CaseView:
        """The case as this caller may see it: leads only from galleries they may search."""
        view = case_view(case)
        clusters = tuple(
            replace(c, search=_visible_search(c.search, caller)) for c in view.clusters
        )
        return replace(view, clusters=clusters)

    def view(self, caller: Caller, case_ref: str, reason: str, *, where: str) -> CaseView:
        """A case's clusters, leads and files: recorded as ``case_viewed``."""
        case = self.open(caller, case_ref, where=where)
        why = Justification.of(case.meta.number, reason)
        view = self.visible_view(caller, case)
        self.recorder.record(
            caller.actor,
            AuditAction.CASE_VIEWED,
            justification=why,
            detail=f"case page: {len(view.clusters)} clusters, {view.faces} faces",
        )
        self._note(caller, case.meta.case_id)
        return view

    def thumbnail(
        self, caller: Caller, case_ref: str, face_id: str, reason: str | None, *, where: str
    ) -> bytes:
        """A case face's aligned chip: free after a recorded case page in the same session,
        otherwise recorded (and a reason is needed)."""
        case = self.open(caller, case_ref, where=where)
        try:
            case.face(face_id)
        except BadInputError:
            raise CaseNotFoundError("no such face in this case") from None
        if self._covered(caller, case.meta.case_id):
            return case.thumbnail(face_id)
        if reason is None:
            raise BadInputError("state the reason you are working on this case first")
        jpeg = case.thumbnail(face_id)
        self.recorder.record(
            caller.actor,
            AuditAction.CASE_VIEWED,
            justification=Justification.of(case.meta.number, reason),
            detail=f"case face {face_id}",
        )
        return jpeg

    def report(self, caller: Caller, case_ref: str, reason: str, *, where: str) -> str:
        """The case's report of what this caller may see, recorded before it is given."""
        case = self.open(caller, case_ref, where=where)
        shown: list[str] = []

        def enrolled(gallery: str, face_id: str) -> bytes | None:
            # Only leads of galleries this caller may search reach the report (visible_view).
            try:
                jpeg = self.cases.galleries.thumbnail(gallery, face_id)
            except GalleryError:  # erased, or its gallery damaged, since the search
                return None
            shown.append(face_id)
            return jpeg

        html = render_report(
            self.visible_view(caller, case),
            case.thumbnail,
            generated_at=self._clock(),
            enrolled=enrolled,
        )
        self.recorder.record(
            caller.actor,
            AuditAction.CASE_REPORT,
            justification=Justification.of(case.meta.number, reason),
            detail=f"case report made ({len(html)} bytes, enrolled photos of "
            f"{len(set(shown))} face(s))",
        )
        return html

    def write_report(
        self,
        caller: Caller,
        case_ref: str,
        reason: str,
        out: Path,
        *,
        overwrite: bool = False,
        where: str,
    ) -> Path:
        return write_report(
            self.report(caller, case_ref, reason, where=where), out, overwrite=overwrite
        )

    # -- changes -----------------------------------------------------------------------------

    def purge(
        self,
        caller: Caller,
        case_ref: str,
        reason: str,
        *,
        where: str,
        consent: Consent | None = None,
        detail: str | None = None,
        today: date | None = None,
    ) -> CaseMeta:
        """Erase a case as a unit, recorded (with its reason) before the erasure.

        A case past its retention date is purged by whoever may open it. Before that date
        (or with no date set) the purge needs the two-person rule's ``consent`` for this
        case; an approved consent carries the proposer's right to the case.
        """
        reason = check_reason(reason)
        approved = consent is not None and consent.approved
        case = self._find(case_ref) if approved else self.open(caller, case_ref, where=where)
        meta = case.meta
        due = self.past_retention(meta, today)
        if not due:
            redeem(
                consent,
                ChangeKind.PURGE_CASE,
                meta.case_id,
                what="purging a case before its retention date",
            )
        agreed = consent.detail() if consent is not None and not due else None
        self.recorder.record(
            caller.actor,
            AuditAction.CASE_PURGED,
            justification=Justification.of(meta.number, reason),
            detail="; ".join(
                p
                for p in (
                    f"case {meta.case_id}",
                    f"{meta.summary.files} files, {meta.summary.faces} faces",
                    "past its retention date" if due else "before its retention date",
                    agreed,
                    detail,
                )
                if p
            ),
        )
        with self.recorder.failure_recorded(
            caller.actor, AuditAction.CASE_PURGED, about=f"case {meta.case_id}"
        ):
            purged = self.cases.purge(meta.number)
            for hook in self.on_purged:
                hook(meta.case_id)
            return purged

    def expired(self, today: date | None = None) -> list[CaseMeta]:
        return self.cases.expired(today)

    def past_retention(self, meta: CaseMeta, today: date | None = None) -> bool:
        """Its retention date has passed (a case with no date is kept until purged)."""
        today = today or self._clock().date()
        return meta.retention_until is not None and meta.retention_until < today

    def find(self, caller: Caller, case_ref: str, *, where: str) -> CaseMeta:
        """The case's record (number, counts, retention), if the caller may open it."""
        return self.open(caller, case_ref, where=where).meta

    # -- internals ---------------------------------------------------------------------------

    def _note(self, caller: Caller, case_id: str) -> None:
        with self._lock:
            key = (caller.session_key, case_id)
            self._shown[key] = self._monotonic()
            self._shown.move_to_end(key)
            while len(self._shown) > MAX_CASES_TRACKED:
                self._shown.popitem(last=False)

    def _covered(self, caller: Caller, case_id: str) -> bool:
        with self._lock:
            when = self._shown.get((caller.session_key, case_id))
            return when is not None and self._monotonic() - when < REVEAL_TTL_S


def _visible_search(search: ClusterSearch | None, caller: Caller) -> ClusterSearch | None:
    if search is None:
        return None
    leads = tuple(
        lead for lead in search.leads if caller.may_use_gallery(Permission.SEARCH, lead.gallery)
    )
    return search if len(leads) == len(search.leads) else replace(search, leads=leads)
