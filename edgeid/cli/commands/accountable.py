"""The command line's door into the accountable service layer (``edgeid.runtime.services``).

Gallery, case and audit commands reach personal data only through ``AccountableGalleries`` and
``AccountableCases``, as the person at the shell (``LocalOperator``: ``os:<login>``), with a
``Recorder`` over the audit log. The galleries' lock and the audit log's writer lock are held
together for the command, as ``edgeid serve`` holds them: stop the service first.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from edgeid.runtime.audit import AuditBusyError, AuditLog
from edgeid.runtime.audit.justification import MIN_REASON_CHARS
from edgeid.runtime.audit.recorder import Recorder
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.errors import EdgeidError
from edgeid.runtime.inference.model_home import models_dir
from edgeid.runtime.services.caller import LocalOperator
from edgeid.runtime.vault.keys import Keyring

if TYPE_CHECKING:  # imported where used: `edgeid audit export` needs none of the face stack
    from edgeid.runtime.config.settings import Settings
    from edgeid.runtime.gallery.service import GalleryService
    from edgeid.runtime.services.cases import AccountableCases
    from edgeid.runtime.services.galleries import AccountableGalleries
    from edgeid.runtime.services.search_history import SearchHistory


class ServiceRunningError(EdgeidError):
    """The audit log is held by another process (``edgeid serve``): exit 1, say what to do."""


@dataclass(frozen=True)
class GalleryDoor:
    caller: LocalOperator
    galleries: AccountableGalleries
    recorder: Recorder  # for what has no service method yet (key rotation)


@dataclass(frozen=True)
class CaseDoor:
    caller: LocalOperator
    cases: AccountableCases
    galleries: GalleryService  # gallery names for an ingest (names are not personal data)


@contextmanager
def open_audit_log(home: Path, keyring: Keyring, *, busy_hint: str) -> Iterator[AuditLog]:
    """The audit log for writing; a running service holding it is one line naming the fix."""
    try:
        log = AuditLog.open(home, keyring)
    except AuditBusyError:
        raise ServiceRunningError(
            f"the audit log is open for writing by edgeid serve; {busy_hint}"
        ) from None
    with log:
        yield log


@contextmanager
def _gallery_service(home: Path, *, inference: bool) -> Iterator[GalleryService]:
    from edgeid.runtime.gallery.service import GalleryService
    from edgeid.runtime.inference.pipeline import FacePipeline

    settings = load_settings(home)
    pipeline = None
    if not inference:
        # Listing, erasing, exporting or creating galleries runs no model: a CPU pipeline
        # (no TensorRT engines to load) gives the service what it needs (the template size).
        pipeline = FacePipeline.load(
            models_dir(home),
            settings.inference.detector,
            threads=1,
            backend="cpu",
            precision=settings.inference.precision,
        )
    with GalleryService.open(home, settings, pipeline=pipeline) as service:
        yield service


@contextmanager
def galleries(home: Path, *, inference: bool = False) -> Iterator[GalleryDoor]:
    """The galleries through the service layer; ``inference`` for commands that detect or
    embed (enrol, search, verify, re-embed). The cases are opened too: a subject's erasure
    reaches their leads and reports (and an erasure left unfinished is finished first)."""
    from edgeid.runtime.cases.service import CaseService
    from edgeid.runtime.services.cases import AccountableCases
    from edgeid.runtime.services.galleries import AccountableGalleries

    settings = load_settings(home)
    with (
        _gallery_service(home, inference=inference) as service,
        open_audit_log(home, service.store.keyring, busy_hint="stop it first") as log,
        CaseService(home, service, log, detector=settings.inference.detector) as case_service,
    ):
        recorder = Recorder(log)
        case_access = AccountableCases(case_service, recorder)
        history = kept_searches(home, service, settings)
        case_access.on_purged.append(history.forget_case)  # its lead reviews go with it
        # An erased subject leaves the cases' leads and every kept search too.
        accountable = AccountableGalleries(service, recorder, participants=[case_access, history])
        accountable.finish_pending()
        yield GalleryDoor(LocalOperator.current(), accountable, recorder)


@contextmanager
def cases(home: Path, *, inference: bool = False) -> Iterator[CaseDoor]:
    """The cases through the service layer; ``inference`` for an ingest."""
    from edgeid.runtime.cases.service import CaseService
    from edgeid.runtime.services.cases import AccountableCases
    from edgeid.runtime.services.galleries import AccountableGalleries

    settings = load_settings(home)
    with (
        _gallery_service(home, inference=inference) as service,
        open_audit_log(home, service.store.keyring, busy_hint="stop it first") as log,
        CaseService(home, service, log, detector=settings.inference.detector) as case_service,
    ):
        case_access = AccountableCases(case_service, Recorder(log))
        history = kept_searches(home, service, settings)
        case_access.on_purged.append(history.forget_case)  # its lead reviews go with it
        # An erasure a crash left unfinished reaches the cases before any is shown.
        AccountableGalleries(
            service, Recorder(log), participants=[case_access, history]
        ).finish_pending()
        yield CaseDoor(LocalOperator.current(), case_access, service)


def kept_searches(home: Path, service: GalleryService, settings: Settings) -> SearchHistory:
    """The web's sealed search history, so the CLI's erasures and purges reach it too."""
    from edgeid.runtime.services.search_history import SearchHistory

    keep = timedelta(days=settings.searches.history_days)
    return SearchHistory(home, service.store.keyring, keep=keep)


# -- options -----------------------------------------------------------------------------------
# Case numbers and reasons are checked by the core rule (``Justification.of``, ``check_reason``),
# not by argparse, so a missing one is the same one-line error (exit 2) as a malformed one.


def reason_option(parser: argparse.ArgumentParser, why: str) -> None:
    parser.add_argument(
        "--reason", help=f"{why} (required, at least {MIN_REASON_CHARS} characters; recorded)"
    )


def justification_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--case", help=f"case number {what} is for (required; recorded)")
    reason_option(parser, f"why {what} is needed")
