"""Everything a request handler needs, built once per app by ``create_app``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import jinja2
from prometheus_client.registry import Collector
from starlette.requests import Request

from edgeid.runtime.accounts.sessions import SessionStore
from edgeid.runtime.accounts.throttle import LoginThrottle
from edgeid.runtime.accounts.tokens import TokenStore
from edgeid.runtime.accounts.users import UserStore
from edgeid.runtime.audit import AuditLog
from edgeid.runtime.audit.recorder import Recorder
from edgeid.runtime.config.settings import Settings
from edgeid.runtime.gallery.service import GalleryService
from edgeid.runtime.services.accounts import AccountAdmin
from edgeid.runtime.services.approvals import Approvals
from edgeid.runtime.services.cases import AccountableCases
from edgeid.runtime.services.galleries import AccountableGalleries
from edgeid.runtime.services.searches import AccountableSearches
from edgeid.runtime.web.case_jobs import CaseDesk
from edgeid.runtime.web.workspace import PendingEnrolment, SearchContext, Workspace

# ``__Host-`` binds the cookie to this exact origin (Secure, Path=/, no Domain); browsers only
# accept it over HTTPS, so plain-HTTP development on loopback uses the bare name.
SECURE_SESSION_COOKIE = "__Host-edgeid-session"
PLAIN_SESSION_COOKIE = "edgeid-session"


@dataclass
class WebState:
    home: Path
    settings: Settings
    version: str
    galleries: GalleryService
    audit: AuditLog
    recorder: Recorder  # every audit record the web writes goes through the core's recorder
    accountable: AccountableGalleries  # the galleries as every door must reach them
    users: UserStore
    tokens: TokenStore
    sessions: SessionStore
    throttle: LoginThrottle
    searches: Workspace[SearchContext]
    enrolments: Workspace[PendingEnrolment]
    templates: jinja2.Environment
    secure_cookies: bool
    started: float
    clock: Callable[[], float]
    accounts: AccountAdmin  # every change to users and tokens an admin makes
    approvals: Approvals  # the two-person rule
    history: AccountableSearches  # searches run, kept per user and case, and their decisions
    box_metrics: Collector  # what /metrics exposes (edgeid.runtime.telemetry.local_metrics)
    health_extra: Callable[[], dict[str, Any]] | None = None
    models_dir: Path | None = None
    cases: CaseDesk | None = None  # case ingest, when the app was given a CaseService
    case_access: AccountableCases | None = None  # the cases as every door must reach them

    @property
    def cookie_name(self) -> str:
        return SECURE_SESSION_COOKIE if self.secure_cookies else PLAIN_SESSION_COOKIE

    @property
    def max_upload_bytes(self) -> int:
        return self.settings.web.max_upload_bytes

    @property
    def max_case_upload_bytes(self) -> int:
        return self.settings.web.max_case_upload_bytes


def web_state(request: Request) -> WebState:
    return cast(WebState, request.app.state.web)
