"""Repairing damaged galleries and cases through the accountable layer.

A repair rewrites a gallery or case from everything in it that still authenticates, under a
new data key, and drops what does not (it was unreadable already). It needs a reason and is
recorded as ``store_repaired`` with what was kept and lost (counts and record ids, never
content) before it is acknowledged; a repair that fails after it started is recorded as
``operation_failed``.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.audit.events import AuditAction
from edgeid.runtime.audit.justification import check_reason
from edgeid.runtime.audit.recorder import Recorder
from edgeid.runtime.cases.repair import SalvagedCase
from edgeid.runtime.cases.store import CaseStore
from edgeid.runtime.gallery.service import GalleryService
from edgeid.runtime.gallery.store import RepairReport
from edgeid.runtime.services.caller import Caller

MAX_IDS_RECORDED = 20  # lost record ids named in the record; the rest are counted


def lost_ids(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:MAX_IDS_RECORDED])
    more = len(ids) - MAX_IDS_RECORDED
    return shown + (f" and {more} more" if more > 0 else "")


class AccountableRepair:
    """``repair_gallery`` and ``repair_case``, each allowed, recorded, then acknowledged."""

    def __init__(
        self, galleries: GalleryService, recorder: Recorder, cases: CaseStore | None = None
    ) -> None:
        self.galleries = galleries
        self.recorder = recorder
        self.cases = cases

    def _require(self, caller: Caller, permission: Permission, where: str, resource: str) -> None:
        if caller.may(permission):
            return
        raise self.recorder.refused(
            caller.actor,
            f"repairing {resource} needs {permission.value}",
            where=where,
            resource=resource,
            why=f"needs {permission.value}",
        )

    def repair_gallery(self, caller: Caller, name: str, *, reason: str, where: str) -> RepairReport:
        self._require(caller, Permission.GALLERIES, where, f"gallery {name}")
        reason = check_reason(reason)
        with self.recorder.failure_recorded(
            caller.actor, AuditAction.STORE_REPAIRED, about=f"gallery {name}"
        ):
            report = self.galleries.repair_gallery(name)
        lost = f"; lost ids: {lost_ids(report.lost_records)}" if report.lost_records else ""
        no_thumbs = (
            f"; faces without thumbnail: {lost_ids(report.lost_thumbnails)}"
            if report.lost_thumbnails
            else ""
        )
        self.recorder.record(
            caller.actor,
            AuditAction.STORE_REPAIRED,
            gallery=name,
            reason=reason,
            detail=f"gallery {report.gallery_id}: {report.summary()}{lost}{no_thumbs}",
        )
        return report

    def repair_case(self, caller: Caller, ref: str, *, reason: str, where: str) -> SalvagedCase:
        if self.cases is None:
            raise ValueError("no case store given")
        self._require(caller, Permission.CASES_ANY, where, f"case {ref}")
        reason = check_reason(reason)
        with self.recorder.failure_recorded(
            caller.actor, AuditAction.STORE_REPAIRED, about=f"case {ref}"
        ):
            salvaged = self.cases.repair(ref)
        lost = f"; lost ids: {lost_ids(salvaged.lost_records)}" if salvaged.lost_records else ""
        self.recorder.record(
            caller.actor,
            AuditAction.STORE_REPAIRED,
            reason=reason,
            detail=f"case {salvaged.case_id}: {salvaged.summary()}{lost}",
        )
        return salvaged
