"""Opening what the web app stands on, for ``edgeid serve``: the galleries (with their lock and
the face pipeline), the audit log (on the galleries' keyring) and the cases (on the same
keyring, pipeline and audit log), closed in reverse order."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from edgeid.runtime.audit import AuditLog
from edgeid.runtime.cases.service import CaseService
from edgeid.runtime.config.settings import Settings
from edgeid.runtime.gallery.service import GalleryService
from edgeid.runtime.inference.activity import InferenceActivity
from edgeid.runtime.inference.pipeline import FacePipeline
from edgeid.runtime.services.scrub_schedule import ScrubSchedule
from edgeid.runtime.system.integrity import INTEGRITY
from edgeid.runtime.web.app import create_app

# At shutdown a running case ingest stops after the file in hand; it resumes on the next one.
INGEST_STOP_WAIT_S = 30.0


@contextlib.contextmanager
def open_web_app(
    home: Path,
    settings: Settings,
    *,
    version: str,
    pipeline: FacePipeline | None = None,
    passphrase: str | None = None,
    health_extra: Callable[[], dict[str, Any]] | None = None,
    activity: InferenceActivity | None = None,
) -> Iterator[FastAPI]:
    """The app over this box's galleries and audit log; both close when the block ends."""
    with contextlib.ExitStack() as stack:
        galleries = stack.enter_context(
            GalleryService.open(
                home, settings, pipeline=pipeline, passphrase=passphrase, activity=activity
            )
        )
        audit = stack.enter_context(AuditLog.open(home, galleries.store.keyring))
        cases = stack.enter_context(
            CaseService(home, galleries, audit, detector=settings.inference.detector)
        )
        app = create_app(
            home,
            settings,
            galleries=galleries,
            audit=audit,
            version=version,
            health_extra=health_extra,
            cases=cases,
        )
        desk = app.state.web.cases
        stack.callback(desk.jobs.stop_all, INGEST_STOP_WAIT_S)
        every = settings.maintenance.scrub_interval_hours
        if every is not None:
            schedule = ScrubSchedule(
                home,
                galleries,
                INTEGRITY,
                interval_s=every * 3600,
                first_after_s=settings.maintenance.scrub_first_after_minutes * 60,
                busy=desk.jobs.busy,
            )
            schedule.start()
            stack.callback(schedule.stop)
        yield app
