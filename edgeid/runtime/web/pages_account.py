"""Signing in and out, the one-time password change, and a user's own API tokens."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from edgeid.runtime.accounts.sessions import Session
from edgeid.runtime.accounts.users import USERNAME
from edgeid.runtime.audit import AuditAction
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.web.access import (
    CSRF_FIELD,
    PageAccess,
    check_same_site,
    current_session,
    posted,
)
from edgeid.runtime.web.audit_trail import UNKNOWN_ROLE, record, record_as
from edgeid.runtime.web.errors import CsrfError, ThrottledError
from edgeid.runtime.web.forms import MAX_FORM_BYTES, read_form
from edgeid.runtime.web.home import home_page
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.rendering import flash, render
from edgeid.runtime.web.state import WebState, web_state

router = APIRouter(include_in_schema=False)

SignedIn = Annotated[Principal, Depends(PageAccess(None))]
ChangingPassword = Annotated[Principal, Depends(PageAccess(None, during_password_change=True))]

LOCAL_PATH = re.compile(r"/(?![/\\])[A-Za-z0-9/_.-]*")


def set_session_cookie(response: Response, state: WebState, session: Session) -> None:
    response.set_cookie(
        state.cookie_name,
        session.sid,
        httponly=True,
        secure=state.secure_cookies,
        samesite="strict",
        path="/",
    )


def clear_session_cookie(response: Response, state: WebState) -> None:
    response.delete_cookie(
        state.cookie_name, httponly=True, secure=state.secure_cookies, samesite="strict", path="/"
    )


@router.get("/")
def home(request: Request, principal: SignedIn) -> Response:
    return home_page(request, principal)


@router.get("/login")
async def login_form(request: Request, next: str = "") -> Response:
    state = web_state(request)
    session = current_session(request, state)
    if session is not None and session.username is not None:
        return RedirectResponse("/", status_code=303)
    if session is None:
        session = state.sessions.new()
    response = render(
        request, "login.html", csrf_token=session.csrf, next=next, error=None, username=""
    )
    set_session_cookie(response, state, session)
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    state = web_state(request)
    check_same_site(request)
    form = await read_form(request, max_file_bytes=MAX_FORM_BYTES)
    session = current_session(request, state)
    if session is None or session.username is not None or not session.csrf_ok(form.get(CSRF_FIELD)):
        raise CsrfError("the sign-in form is stale; reload the page and sign in again")
    username = form.get("username").strip().lower()
    password = form.get("password")
    address = request.client.host if request.client else "unknown"
    known = state.users.get(username) if USERNAME.fullmatch(username) else None
    audit_name = username if USERNAME.fullmatch(username) else "(not a valid user name)"
    role = known.role.value if known else UNKNOWN_ROLE
    wait = state.throttle.retry_after(username, address)
    if wait is not None:
        await run_in_threadpool(
            record_as,
            state,
            audit_name,
            role,
            AuditAction.LOGIN_FAILED,
            detail=f"throttled; from {address}",
        )
        raise ThrottledError(
            f"too many failed sign-ins for this name from here; try again in {_spell(wait)} "
            "(an admin can clear the delay on the Users page)",
            wait,
        )
    user = await run_in_threadpool(state.users.authenticate, username, password)
    if user is None:
        state.throttle.failure(username, address)
        await run_in_threadpool(
            record_as, state, audit_name, role, AuditAction.LOGIN_FAILED, detail=f"from {address}"
        )
        return render(
            request,
            "login.html",
            status_code=401,
            csrf_token=session.csrf,
            next=form.get("next"),
            error="Wrong user name or password.",
            username=username if USERNAME.fullmatch(username) else "",
        )
    state.throttle.success(username, address)
    await run_in_threadpool(
        record_as,
        state,
        user.username,
        user.role.value,
        AuditAction.LOGIN,
        detail=f"from {address}",
    )
    fresh = state.sessions.login(session, user.username)
    target = form.get("next")
    if user.must_change_password:
        target = "/account/password"
    elif not LOCAL_PATH.fullmatch(target):
        target = "/"
    response = RedirectResponse(target, status_code=303)
    set_session_cookie(response, state, fresh)
    return response


def _spell(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} second(s)"
    return f"{round(seconds / 60)} minute(s)"


@router.post("/logout")
def logout(request: Request, principal: ChangingPassword) -> Response:
    state = web_state(request)
    record(state, principal, AuditAction.LOGOUT)
    if principal.session is not None:
        state.sessions.end(principal.session.sid)
    response = RedirectResponse("/login", status_code=303)
    clear_session_cookie(response, state)
    return response


@router.get("/account/password")
def password_form(request: Request, principal: ChangingPassword) -> Response:
    return render(request, "password.html", principal=principal, error=None, first=_first(request))


def _first(request: Request) -> bool:
    principal = request.state.principal
    user = web_state(request).users.get(principal.username)
    return bool(user and user.must_change_password)


@router.post("/account/password")
def change_password(request: Request, principal: ChangingPassword) -> Response:
    state = web_state(request)
    form = posted(request)
    new = form.get("new_password")
    try:
        if new != form.get("repeat_password"):
            raise BadInputError("the two new passwords differ; type them again")
        state.users.change_password(principal.username, form.get("current_password"), new)
    except BadInputError as exc:
        return render(
            request,
            "password.html",
            principal=principal,
            status_code=400,
            error=str(exc),
            first=_first(request),
        )
    record(state, principal, AuditAction.PASSWORD_CHANGED)
    # Every other session of this user ends; this one continues under a new id.
    state.sessions.end_user(principal.username)
    fresh = state.sessions.new(principal.username)
    fresh.values["flash"] = "Password changed."
    response = RedirectResponse("/", status_code=303)
    set_session_cookie(response, state, fresh)
    return response


# -- API tokens ------------------------------------------------------------------------------


def _token_page(
    request: Request,
    principal: Principal,
    *,
    new_token: str | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    state = web_state(request)
    return render(
        request,
        "tokens.html",
        principal=principal,
        status_code=status_code,
        tokens=state.tokens.list(principal.username),
        scopes=sorted(p.value for p in principal.permissions),
        new_token=new_token,
        error=error,
    )


@router.get("/account/tokens")
def tokens_page(request: Request, principal: SignedIn) -> Response:
    return _token_page(request, principal)


@router.post("/account/tokens")
def create_token(request: Request, principal: SignedIn) -> Response:
    state = web_state(request)
    form = posted(request)
    try:
        days = int(form.get("ttl_days") or 90)
        token, secret = state.tokens.create(
            principal.username,
            form.get("name"),
            form.all("scope"),
            allowed=principal.permissions,
            ttl_days=days,
        )
    except (BadInputError, ValueError) as exc:
        message = str(exc) if isinstance(exc, BadInputError) else "days must be a whole number"
        return _token_page(request, principal, error=message, status_code=400)
    record(
        state,
        principal,
        AuditAction.TOKEN_CREATED,
        detail=f"token {token.token_id} scopes {' '.join(sorted(token.scopes))}",
    )
    return _token_page(request, principal, new_token=secret)


@router.post("/account/tokens/{token_id}/revoke")
def revoke_token(request: Request, token_id: str, principal: SignedIn) -> Response:
    token = web_state(request).accounts.revoke_token(
        principal, token_id, where="web /account/tokens/{token_id}/revoke"
    )
    flash(principal, f"Token {token.name} revoked.")
    return RedirectResponse("/account/tokens", status_code=303)
