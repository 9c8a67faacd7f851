"""Every page and API endpoint states what it needs with one of these dependencies.

``PageAccess(permission)``: a browser session whose user holds ``permission``; for a state
change also a same-site request carrying the session's CSRF token (the body is read here,
bounded, into ``request.state.form``). ``ApiAccess(permission)``: a bearer token whose scopes
(within its owner's current role) include ``permission``; cookies are ignored, so the API
cannot be driven cross-site. ``permission=None``: any signed-in user (their own account).

Tests walk the app's routes for these objects, so a route without one is caught.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.accounts.sessions import Session
from edgeid.runtime.accounts.users import User
from edgeid.runtime.addresses import is_loopback
from edgeid.runtime.web.errors import (
    CsrfError,
    ForbiddenError,
    LoginRequiredError,
    PasswordChangeRequiredError,
)
from edgeid.runtime.web.forms import FormData, read_form
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.state import WebState, web_state

SAFE_METHODS = frozenset({"GET", "HEAD"})
CSRF_FIELD = "csrf_token"


class Requirement:
    """Base of the access dependencies; ``permission`` is what tests enumerate."""

    def __init__(self, permission: Permission | None) -> None:
        self.permission = permission

    def _check(self, principal: Principal) -> Principal:
        if self.permission is not None and not principal.may(self.permission):
            raise ForbiddenError(
                f"{principal.role.value}s may not do this (needs {self.permission.value})"
            )
        return principal


class PageAccess(Requirement):
    """``streams_body``: the route reads the body itself (a case archive, streamed to disk)
    and must call ``check_csrf`` on the token it finds before it writes a byte."""

    def __init__(
        self,
        permission: Permission | None,
        *,
        during_password_change: bool = False,
        streams_body: bool = False,
    ):
        super().__init__(permission)
        self.during_password_change = during_password_change
        self.streams_body = streams_body

    async def __call__(self, request: Request) -> Principal:
        state = web_state(request)
        unsafe = request.method not in SAFE_METHODS
        if unsafe:
            check_same_site(request)
        session = state.sessions.get(request.cookies.get(state.cookie_name))
        if session is None or session.username is None:
            raise LoginRequiredError("sign in first")
        user = state.users.get(session.username)
        if user is None or user.disabled:
            state.sessions.end(session.sid)
            raise LoginRequiredError("this account is disabled; ask an admin")
        if user.must_change_password and not self.during_password_change:
            raise PasswordChangeRequiredError("change your one-time password first")
        principal = session_principal(user, session)
        request.state.principal = principal  # so an error page still shows the navigation
        self._check(principal)
        if unsafe and not self.streams_body:
            form = await read_form(request, max_file_bytes=state.max_upload_bytes)
            check_csrf(principal, form)
            request.state.form = form
        return principal


def check_csrf(principal: Principal, form: FormData) -> None:
    """The form must carry the session's CSRF token."""
    if principal.session is None or not principal.session.csrf_ok(form.get(CSRF_FIELD)):
        raise CsrfError("this form is stale or came from another site; reload the page")


class ApiAccess(Requirement):
    async def __call__(self, request: Request) -> Principal:
        state = web_state(request)
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        token = state.tokens.authenticate(presented.strip()) if scheme.lower() == "bearer" else None
        if token is None:
            raise LoginRequiredError("send a valid API token: Authorization: Bearer edgeid_...")
        user = state.users.get(token.username)
        if user is None or user.disabled:
            raise LoginRequiredError("the token's user is disabled; ask an admin")
        principal = Principal(
            username=user.username,
            role=user.role,
            permissions=token.scopes & user.permissions,
            galleries=user.galleries,
            via="token",
            owner=f"token:{token.token_id}",
            token_id=token.token_id,
        )
        request.state.principal = principal  # so a refusal is recorded against the token
        if self.permission is not None and not principal.may(self.permission):
            raise ForbiddenError(f"this token lacks the scope {self.permission.value}")
        return principal


class LocalOrApiAccess(Requirement):
    """A client on this box's loopback (the technician at its shell) as it is, anyone else with
    an API token holding ``permission`` (as ``ApiAccess``). For figures that show no personal
    data: the box's ``/metrics``. None for the local client, who has no account."""

    def __init__(self, permission: Permission) -> None:
        super().__init__(permission)
        self._token = ApiAccess(permission)

    async def __call__(self, request: Request) -> Principal | None:
        if is_loopback_client(request) and "authorization" not in request.headers:
            return None
        return await self._token(request)


def is_loopback_client(request: Request) -> bool:
    """The peer is this machine (uvicorn runs without proxy headers: the address is real)."""
    host = request.client.host if request.client else ""
    return host != "localhost" and is_loopback(host)  # a peer's address is an IP, never a name


def requirement_of(route: object) -> Requirement | None:
    """The access requirement a route declares (through any depth of dependencies)."""
    dependant = getattr(route, "dependant", None)
    stack = [dependant] if dependant is not None else []
    while stack:
        current = stack.pop()
        if isinstance(current.call, Requirement):
            return current.call
        stack.extend(current.dependencies)
    return None


def session_principal(user: User, session: Session) -> Principal:
    return Principal(
        username=user.username,
        role=user.role,
        permissions=user.permissions,
        galleries=user.galleries,
        via="session",
        owner=session.owner,
        session=session,
    )


def check_same_site(request: Request) -> None:
    """Refuse a state change a browser says came from another site.

    ``Sec-Fetch-Site`` is set by the browser and cannot be forged by a page, so when present it
    decides; otherwise ``Origin``, when sent, must be this box. SameSite=Strict already keeps
    the cookie off cross-site requests; this is the second lock.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        if site not in ("same-origin", "none"):
            raise CsrfError("cross-site request refused")
        return
    origin = request.headers.get("origin")
    if origin is None:
        return
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    parts = urlsplit(origin)
    if origin == "null" or f"{parts.scheme}://{parts.netloc}" != own:
        raise CsrfError("cross-site request refused")


def posted(request: Request) -> FormData:
    """The form ``PageAccess`` read and checked for this state change."""
    form: FormData = request.state.form
    return form


def current_session(request: Request, state: WebState) -> Session | None:
    return state.sessions.get(request.cookies.get(state.cookie_name))
