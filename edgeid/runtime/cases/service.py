"""Cases as the investigator uses them, from the CLI or the web UI: ingest, list, view,
thumbnails, report, purge.

``CaseService`` joins the case store, the gallery service (pipeline, galleries, and the device
keyring its store holds) and the audit log. It adds no lock of its own beyond the store's: the
galleries' process lock already makes one process the owner of the box's data.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from threading import Event
from types import TracebackType

from edgeid.runtime.cases.farmed import ImageFarm
from edgeid.runtime.cases.ingest import (
    CaseIngest,
    IngestOutcome,
    IngestRequest,
    ProgressCallback,
)
from edgeid.runtime.cases.leads import AuditSink
from edgeid.runtime.cases.records import CaseMeta
from edgeid.runtime.cases.report import render_report, write_report
from edgeid.runtime.cases.store import Case, CaseStore
from edgeid.runtime.cases.views import CaseView, case_view
from edgeid.runtime.gallery.service import GalleryService
from edgeid.runtime.vault.crypto import Clock, utc_now


def report_html(case: Case, *, clock: Clock = utc_now) -> str:
    """The case's self-contained HTML report (thumbnails embedded)."""
    return render_report(case_view(case), case.thumbnail, generated_at=clock())


class CaseService:
    """See the module docstring. ``detector`` names the pipeline's detector in each run."""

    def __init__(
        self,
        home: Path,
        galleries: GalleryService,
        audit: AuditSink,
        *,
        detector: str,
        clock: Clock = utc_now,
    ) -> None:
        self.galleries = galleries
        self.store = CaseStore(home, galleries.store.keyring, clock=clock)
        self.engine = CaseIngest(self.store, galleries, audit, detector=detector, clock=clock)
        self._clock = clock

    def __enter__(self) -> CaseService:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()

    def ingest(
        self,
        request: IngestRequest,
        *,
        progress: ProgressCallback | None = None,
        stop: Event | None = None,
        farm: ImageFarm | None = None,
    ) -> IngestOutcome:
        """Run an ingest to the end (or until ``stop`` is set); see ``edgeid.runtime.cases.ingest``.
        Blocking: the web UI runs it in a worker thread and reads ``progress``. ``farm``: the
        images are analysed on a cluster's nodes (``edgeid.runtime.cluster``)."""
        return self.engine.ingest(request, progress=progress, stop=stop, farm=farm)

    def list_cases(self) -> list[CaseMeta]:
        return self.store.list_cases()

    def expired(self, today: date | None = None) -> list[CaseMeta]:
        return self.store.expired(today)

    def view(self, number: str) -> CaseView:
        return case_view(self.store.find(number))

    def thumbnail(self, number: str, face_id: str) -> bytes:
        """A case face's aligned chip (JPEG)."""
        return self.store.find(number).thumbnail(face_id)

    def report(self, number: str) -> str:
        return report_html(self.store.find(number), clock=self._clock)

    def write_report(self, number: str, out: Path, *, overwrite: bool = False) -> Path:
        return write_report(self.report(number), out, overwrite=overwrite)

    def purge(self, number: str) -> CaseMeta:
        return self.store.purge(number)
