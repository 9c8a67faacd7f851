"""``create_app``: the web UI and ``/api/v1`` over one ``GalleryService`` and one audit log.

Pages are server-rendered and work without JavaScript; the Content-Security-Policy allows no
script at all and nothing from another origin. Every response is ``no-store``: pages and
images show faces and names, which must not linger in a browser cache.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeid.runtime.accounts.sealing import accounts_key
from edgeid.runtime.accounts.sessions import Session, SessionStore
from edgeid.runtime.accounts.throttle import LoginThrottle
from edgeid.runtime.accounts.tokens import TokenNotFoundError, TokenStore
from edgeid.runtime.accounts.users import UserExistsError, UserNotFoundError, UserStore
from edgeid.runtime.audit import AuditLog
from edgeid.runtime.audit.recorder import Recorder
from edgeid.runtime.cases.errors import CaseBusyError, CaseNotFoundError
from edgeid.runtime.cases.jobs import FarmOpener
from edgeid.runtime.cases.service import CaseService
from edgeid.runtime.cluster.opening import open_farm
from edgeid.runtime.config.settings import Settings
from edgeid.runtime.errors import AccessDeniedError, BadInputError, EdgeidError, OverloadedError
from edgeid.runtime.gallery.errors import GalleryExistsError, GalleryNotFoundError
from edgeid.runtime.gallery.service import DuplicateSubjectError, GalleryService, QualityGateError
from edgeid.runtime.inference.model_home import models_dir as installed_models
from edgeid.runtime.services.accounts import AccountAdmin
from edgeid.runtime.services.approvals import Approvals, UnavailableHereError
from edgeid.runtime.services.cases import AccountableCases
from edgeid.runtime.services.erasures import ErasureParticipant
from edgeid.runtime.services.galleries import AccountableGalleries
from edgeid.runtime.services.proposals import ProposalNotFoundError, ProposalStore
from edgeid.runtime.services.search_history import SearchHistory, SearchNotFoundError
from edgeid.runtime.services.searches import AccountableSearches
from edgeid.runtime.system.metrics import SERVICE_METRICS
from edgeid.runtime.telemetry.local_metrics import box_collector
from edgeid.runtime.web import (
    api,
    api_cases,
    pages_account,
    pages_admin,
    pages_approvals,
    pages_audit,
    pages_cases,
    pages_context,
    pages_health,
    pages_history,
    pages_metrics,
    pages_search,
    pages_subjects,
)
from edgeid.runtime.web.access import requirement_of
from edgeid.runtime.web.access_log import redacted_stack, route_template
from edgeid.runtime.web.case_jobs import CaseDesk, PendingIngest
from edgeid.runtime.web.case_uploads import CaseUploads
from edgeid.runtime.web.errors import (
    CsrfError,
    ForbiddenError,
    LoginRequiredError,
    NotFoundError,
    PasswordChangeRequiredError,
    ThrottledError,
)
from edgeid.runtime.web.forms import BodyTooLargeError, UnsupportedBodyError
from edgeid.runtime.web.rendering import STATIC_DIR, make_environment, render
from edgeid.runtime.web.state import WebState, web_state
from edgeid.runtime.web.work_context import WorkContextRequiredError
from edgeid.runtime.web.workspace import HeldSearches, PendingEnrolment, SearchContext, Workspace

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
# An overloaded service without a better estimate asks clients to come back after this long.
OVERLOADED_RETRY_AFTER_S = 5
# HTTP status for each refusal; the first matching class wins (subclasses before bases).
STATUS_OF: tuple[tuple[type[Exception], int], ...] = (
    (LoginRequiredError, 401),
    (PasswordChangeRequiredError, 403),
    (ForbiddenError, 403),
    (AccessDeniedError, 403),
    (CsrfError, 403),
    (ThrottledError, 429),
    (BodyTooLargeError, 413),
    (UnsupportedBodyError, 415),
    (NotFoundError, 404),
    (CaseNotFoundError, 404),
    (CaseBusyError, 409),
    (GalleryNotFoundError, 404),
    (UserNotFoundError, 404),
    (TokenNotFoundError, 404),
    (ProposalNotFoundError, 404),
    (SearchNotFoundError, 404),
    (DuplicateSubjectError, 409),
    (GalleryExistsError, 409),
    (UserExistsError, 409),
    (UnavailableHereError, 409),  # e.g. a model change is approved at the shell
    (QualityGateError, 422),
    (OverloadedError, 503),
    (WorkContextRequiredError, 400),
    (BadInputError, 400),
    (EdgeidError, 500),
)
API_ROUTERS = (api.router, api_cases.router)
# Paths kept out of the request metrics: they are not work anyone asked the box for.
UNMETERED_PREFIXES = ("/static/", "/healthz", "/metrics")
# The routes that take a case's archive (streamed to disk, web.max_case_upload_bytes); every
# other body keeps the small in-memory limit.
CASE_UPLOAD_PATHS = re.compile(r"/cases/new/[^/]+/archive|/api/v1/case-ingests/[^/]+/archive")
# Room for the form's fields and multipart framing around an archive.
UPLOAD_OVERHEAD_BYTES = 256 * 1024


def create_app(
    home: Path,
    settings: Settings,
    *,
    galleries: GalleryService,
    audit: AuditLog,
    version: str,
    health_extra: Callable[[], dict[str, Any]] | None = None,
    models_dir: Path | None = None,
    cases: CaseService | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    """The ASGI app. ``settings.web`` gives cookie security (TLS configured or not), session
    lifetimes and the upload limits; ``health_extra`` adds figures to the health page;
    ``models_dir`` (default ``<home>/models``) is where the health page reads the manifests;
    ``cases`` (over the same galleries and audit log) enables case ingest."""
    searches: Workspace[SearchContext] = Workspace(ttl_s=settings.web.session_idle_s, clock=clock)
    enrolments: Workspace[PendingEnrolment] = Workspace(
        ttl_s=settings.web.session_idle_s, clock=clock
    )

    desk = (
        CaseDesk(
            service=cases,
            uploads=CaseUploads(home),
            plans=Workspace[PendingIngest](ttl_s=settings.web.session_idle_s, clock=clock),
            farm=_cluster_farm(home, settings, cases) if settings.cluster.address else None,
        )
        if cases is not None
        else None
    )

    def session_ended(session: Session) -> None:
        searches.drop_owner(session.owner)
        enrolments.drop_owner(session.owner)
        if desk is not None:
            desk.plans.drop_owner(session.owner)

    sessions = SessionStore(
        idle_s=settings.web.session_idle_s,
        max_s=settings.web.session_max_s,
        clock=clock,
        on_end=session_ended,
    )
    recorder = Recorder(audit, clock=clock)
    # The service holds the galleries' lock, so its keyring may gain the accounts key.
    accounts_sealing = accounts_key(galleries.store.keyring)
    users, tokens = UserStore(home, accounts_sealing), TokenStore(home, accounts_sealing)
    case_access = AccountableCases(cases, recorder) if cases is not None else None
    throttle = LoginThrottle(clock)
    # An erasure reaches the cases' leads and the search results held here, or says it could not.
    participants: list[ErasureParticipant] = [HeldSearches(searches)]
    if case_access is not None:
        participants.append(case_access)
    history = SearchHistory(
        home, galleries.store.keyring, keep=timedelta(days=settings.searches.history_days)
    )
    history.purge_expired()  # past the retention while the service was down
    participants.append(history)
    if case_access is not None:
        case_access.on_purged.append(history.forget_case)
    accountable = AccountableGalleries(galleries, recorder, clock=clock, participants=participants)
    accountable.finish_pending()  # erasures a crash or a failure left unfinished
    accounts = AccountAdmin(
        users,
        tokens,
        recorder,
        gallery_names=lambda: [g.name for g in galleries.list_galleries()],
        end_sessions=sessions.end_user,
        throttle=throttle,
    )
    approvals = Approvals(
        ProposalStore(home, galleries.store.keyring),
        recorder,
        accounts,
        galleries=accountable,
        cases=case_access,
        dual_control=settings.security.dual_control,
        ttl=timedelta(days=settings.security.proposal_ttl_days),
    )
    state = WebState(
        home=home,
        settings=settings,
        version=version,
        galleries=galleries,
        audit=audit,
        recorder=recorder,
        accountable=accountable,
        users=users,
        tokens=tokens,
        sessions=sessions,
        throttle=throttle,
        searches=searches,
        enrolments=enrolments,
        templates=make_environment(),
        secure_cookies=bool(settings.web.tls_cert and settings.web.tls_key),
        started=clock(),
        clock=clock,
        accounts=accounts,
        approvals=approvals,
        history=AccountableSearches(history, accountable, recorder),
        box_metrics=box_collector(
            home,
            version,
            site=settings.device.site,
            device=settings.device.device_id,
            backend_state=lambda: galleries.pipeline.backend_state,
        ),
        health_extra=health_extra,
        models_dir=models_dir or installed_models(home),
        cases=desk,
        case_access=case_access,
    )
    app = FastAPI(
        title="edgeid",
        version=version,
        description=(
            "Face search for victim identification, on the box. Authenticate with an API token "
            "(`Authorization: Bearer edgeid_...`), made on the Account > API tokens page. "
            "A search needs a case number and a reason before a photo is accepted; results "
            "are investigative leads for a person to confirm, never identifications."
        ),
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    app.state.web = state
    _document_bearer_tokens(app)
    pages = (
        pages_account,
        pages_context,
        pages_search,
        pages_history,
        pages_cases,
        pages_subjects,
        pages_admin,
        pages_approvals,
        pages_audit,
        pages_health,
        pages_metrics,
    )
    for module in pages:
        app.include_router(module.router)
    for api_router in API_ROUTERS:
        app.include_router(api_router, prefix=API_PREFIX)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_error_handlers(app)
    app.add_middleware(
        GuardMiddleware,
        max_body_bytes=settings.web.max_upload_bytes + UPLOAD_OVERHEAD_BYTES,
        max_case_body_bytes=settings.web.max_case_upload_bytes + UPLOAD_OVERHEAD_BYTES,
        hsts=state.secure_cookies,
    )
    return app


def _cluster_farm(home: Path, settings: Settings, cases: CaseService) -> FarmOpener:
    """The lab's cluster for the Cases page: joined by each cluster ingest, left when it ends."""
    return lambda: open_farm(home, settings, cases.galleries)


def _document_bearer_tokens(app: FastAPI) -> None:
    """OpenAPI names the token scheme (the access checks are our own dependencies, which
    FastAPI cannot describe) and says which scope each operation needs."""
    from fastapi.openapi.utils import get_openapi

    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            doc.setdefault("components", {})["securitySchemes"] = {
                "token": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "edgeid_<id>_<secret>",
                }
            }
            doc["security"] = [{"token": []}]
            schemas = doc["components"].setdefault("schemas", {})
            schemas["Error"] = ERROR_SCHEMA
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            for route in (r for api_router in API_ROUTERS for r in api_router.routes):
                requirement = requirement_of(route)
                for method in getattr(route, "methods", set()) - {"HEAD"}:
                    operation = doc["paths"][API_PREFIX + getattr(route, "path", "")][
                        method.lower()
                    ]
                    scope = (
                        requirement.permission.value
                        if requirement and requirement.permission
                        else None
                    )
                    operation["x-edgeid-scope"] = scope
                    _document_errors(operation)
                    note = f"Needs the token scope `{scope}`." if scope else "Any valid token."
                    operation["description"] = (
                        f"{operation.get('description', '')}\n\n{note}".strip()
                    )
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]


# Every refusal of the API has one shape, ``{"error": "..."}`` (``_error_response``); these are
# the statuses any operation may answer, and those only an operation with a body may.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string", "description": "what is wrong and the fix"}},
}
ERRORS_OF_EVERY_OPERATION = {
    "400": "bad input: a missing or malformed field, case number or reason",
    "401": "no valid token (Authorization: Bearer edgeid_...)",
    "403": "the token's scope, its owner's role or gallery list does not allow it (recorded)",
    "404": "no such search, gallery, subject, case or token among the caller's",
    "422": "a field of the request does not match this schema",
}
ERRORS_OF_A_BODY = {
    "413": "the body is over the upload limit",
    "415": "the body is not of a type this operation takes",
}


def _document_errors(operation: dict[str, Any]) -> None:
    """The API's real error responses, in its real shape, beside the operation's own."""
    responses = operation.setdefault("responses", {})
    for answer in responses.values():
        # An image or HTML answer: FastAPI also lists an untyped JSON body it never sends.
        content = answer.get("content", {})
        if len(content) > 1 and content.get("application/json") == {"schema": {}}:
            del content["application/json"]
    errors = dict(ERRORS_OF_EVERY_OPERATION)
    if "requestBody" in operation:
        errors |= ERRORS_OF_A_BODY
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for status, meaning in errors.items():
        known = responses.get(status, {})
        responses[status] = {
            "description": known.get("description") or meaning,
            "content": _own_content(known) or content,
        }
    # Refusals an operation declares itself (409, 503, ...): the same shape, unless the
    # operation gave a richer one (the faces found, the matching subjects).
    for status, known in responses.items():
        if status.startswith(("4", "5")) and not known.get("content"):
            known["content"] = content


def _own_content(response: dict[str, Any]) -> dict[str, Any] | None:
    """A refusal body the operation declared itself; FastAPI's own 422 shape is never sent."""
    content: dict[str, Any] | None = response.get("content")
    if not content or "HTTPValidationError" in str(content):
        return None
    return content


# -- errors ----------------------------------------------------------------------------------


def status_of(exc: Exception) -> int:
    for kind, status in STATUS_OF:
        if isinstance(exc, kind):
            return status
    return 500


def _is_api(request: Request) -> bool:
    """Machines' paths: refusals in JSON with a Bearer challenge, never a sign-in redirect."""
    return request.url.path.startswith(API_PREFIX + "/") or request.url.path == "/metrics"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EdgeidError)
    async def edgeid_error(request: Request, exc: EdgeidError) -> Response:
        if isinstance(exc, AccessDeniedError) and not exc.recorded:
            _record_refusal(request)
        status = status_of(exc)
        if status == 500:
            logger.error(
                "%s %s failed: %s", request.method, _route_path(request), type(exc).__name__
            )
        return _error_response(request, exc, status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        # Say which field, never echo the value (it may be a name or a reason).
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request"
        return _error_response(request, exc, 422, message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error_response(request, exc, exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.error(  # the stack without the message, which may quote a name
            "%s %s failed unexpectedly: %s",
            request.method,
            _route_path(request),
            redacted_stack(exc),
        )
        return _error_response(request, exc, 500, "internal error; the operator's log has details")


def _error_response(request: Request, exc: Exception, status: int, message: str) -> Response:
    headers: dict[str, str] = {}
    if isinstance(exc, ThrottledError | OverloadedError):
        # Throttled logins and a saturated inference queue say when to come back.
        retry_after_s = getattr(exc, "retry_after_s", OVERLOADED_RETRY_AFTER_S)
        headers["Retry-After"] = str(max(1, round(retry_after_s)))
    if _is_api(request):
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    if isinstance(exc, LoginRequiredError):
        target = "/login"
        if request.method in ("GET", "HEAD") and request.url.path != "/":
            target += "?next=" + quote(request.url.path, safe="/")
        return RedirectResponse(target, status_code=303)
    if isinstance(exc, WorkContextRequiredError):
        return RedirectResponse(exc.form_url, status_code=303)
    if isinstance(exc, PasswordChangeRequiredError) and request.method in ("GET", "HEAD"):
        return RedirectResponse("/account/password", status_code=303)
    response = render(
        request,
        "error.html",
        principal=getattr(request.state, "principal", None),
        status_code=status,
        status=status,
        message=message,
    )
    response.headers.update(headers)
    return response


def _record_refusal(request: Request) -> None:
    """An ``access_denied`` record for a refusal the route's access check made (role, token
    scope); the core records its own (gallery grants, another's case) before raising."""
    principal = getattr(request.state, "principal", None)
    if principal is None:
        return  # not signed in: nobody to account for (failed logins are recorded apart)
    params = request.scope.get("path_params") or {}
    resource = ", ".join(f"{k} {v}" for k, v in sorted(params.items())) or None
    try:
        web_state(request).recorder.denied(
            principal.actor,
            where=f"{request.method} {_route_path(request)}",
            resource=resource,
            why="role or token scope does not allow it",
        )
    except EdgeidError as exc:  # the refusal stands whether or not it could be recorded
        logger.error("could not record a refusal: %s", type(exc).__name__)


def _route_path(request: Request) -> str:
    """The route's template (``/search/{search_id}``), never the ids in the real path."""
    return route_template(request.scope, (API_PREFIX,))


# -- the guard: body limit, security headers, metrics ----------------------------------------


class GuardMiddleware:
    """Refuses bodies over the limit before the app reads them, adds the security headers to
    every response, and records each request's latency and outcome for health telemetry."""

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, max_case_body_bytes: int, hsts: bool
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_case_body_bytes = max_case_body_bytes
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope.get("path", "")
        limit = (
            self.max_case_body_bytes
            if scope.get("method") in ("POST", "PUT") and CASE_UPLOAD_PATHS.fullmatch(path)
            else self.max_body_bytes
        )
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = JSONResponse({"error": "request body too large"}, status_code=413)
            await response(scope, receive, self._sender(send, path))
            _meter(path, started, 413)
            return
        seen = 0

        async def bounded_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLargeError("request body too large")
            return message

        status = 500
        sender = self._sender(send, path)

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await sender(message)

        try:
            await self.app(scope, bounded_receive, send_and_note)
        except ClientDisconnect:
            # The client hung up (or lied about its body's length): nobody to answer and
            # nothing broken on our side, so one line, not an error with a stack.
            route = getattr(scope.get("route"), "path", "-")
            logger.info("%s %s: the client went away mid-request", scope["method"], route)
        finally:
            _meter(path, started, status)

    def _sender(self, send: Send, path: str) -> Send:
        static = path.startswith("/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() not in (b"cache-control", b"server")
                ]
                headers += [
                    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"),
                    (b"cross-origin-opener-policy", b"same-origin"),
                    (b"cross-origin-resource-policy", b"same-origin"),
                    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
                    (b"cache-control", b"max-age=3600" if static else b"no-store"),
                ]
                if self.hsts:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                message = {**message, "headers": headers}
            await send(message)

        return with_headers


def _meter(path: str, started: float, status: int) -> None:
    if path.startswith(UNMETERED_PREFIXES):
        return
    SERVICE_METRICS.record_request(time.perf_counter() - started, error=status >= 500)
