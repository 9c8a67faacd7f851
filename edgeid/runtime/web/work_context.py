""" "Working on case X because Y": the justification a browser session states once, and an API
call states in its headers, for browsing what the galleries and cases hold.

A page that reveals personal data asks for it (``require``); without one the person is sent to
the form at ``/context`` and comes back. Setting it is itself recorded (``work_context_set``),
and every page it covers records its own view under it, so the audit log says who looked at
what for which case, without asking for a reason on every click.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

from starlette.requests import Request

from edgeid.runtime.audit.events import AuditAction
from edgeid.runtime.audit.justification import Justification, JustificationError
from edgeid.runtime.errors import EdgeidError
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.state import WebState

CASE_KEY = "work_case"
REASON_KEY = "work_reason"
CASE_HEADER = "Edgeid-Case"
REASON_HEADER = "Edgeid-Reason"  # percent-encoded UTF-8 where it is not plain ASCII
CONTEXT_PATH = "/context"


class WorkContextRequiredError(EdgeidError):
    """A page needs the session's case and reason first (pages redirect to the form)."""

    def __init__(self, next_path: str, case_hint: str | None = None) -> None:
        super().__init__("state the case and reason you are working on first")
        self.next_path = next_path
        self.case_hint = case_hint

    @property
    def form_url(self) -> str:
        url = f"{CONTEXT_PATH}?next={quote(self.next_path, safe='')}"
        return f"{url}&case={quote(self.case_hint, safe='')}" if self.case_hint else url


def current(principal: Principal) -> Justification | None:
    session = principal.session
    if session is None or CASE_KEY not in session.values:
        return None
    return Justification(session.values[CASE_KEY], session.values[REASON_KEY])


def set_context(state: WebState, principal: Principal, case: str, reason: str) -> Justification:
    """Check, record, then keep the session's justification."""
    justification = Justification.of(case, reason)
    state.recorder.record(
        principal.actor, AuditAction.WORK_CONTEXT_SET, justification=justification
    )
    if principal.session is not None:
        principal.session.values[CASE_KEY] = justification.case
        principal.session.values[REASON_KEY] = justification.reason
    return justification


def adopt(principal: Principal, justification: Justification) -> None:
    """Take the case and reason of an action just recorded with them (a search, an ingest)
    as the session's context: that record already says what the session is working on."""
    if principal.session is not None:
        principal.session.values[CASE_KEY] = justification.case
        principal.session.values[REASON_KEY] = justification.reason


def require(request: Request, principal: Principal, *, case: str | None = None) -> Justification:
    """The justification for this request: the API's headers, or the session's context (for
    ``case``, only a context stated for that very case)."""
    if principal.via == "token":
        stated = from_headers(request)
        if case is not None and stated.case != case:
            raise JustificationError(f"the {CASE_HEADER} header must name this case")
        return stated
    found = current(principal)
    if found is None or (case is not None and found.case != case):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise WorkContextRequiredError(target, case)
    return found


def from_headers(request: Request) -> Justification:
    case = request.headers.get(CASE_HEADER)
    reason = request.headers.get(REASON_HEADER)
    return Justification.of(
        unquote(case) if case is not None else None, unquote(reason) if reason else None
    )


def safe_next(path: str | None) -> str:
    """Only a local path: never an open redirect to another site."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path
