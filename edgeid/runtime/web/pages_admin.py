"""Admin pages: users (roles, galleries, one-time passwords, tokens, slowed sign-ins),
galleries, settings.

Admins never see faces or names of enrolled people: the gallery page shows counts only.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from edgeid.runtime.accounts.roles import ROLE_DESCRIPTIONS, Permission, Role
from edgeid.runtime.audit.justification import JustificationError
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.services import user_requests
from edgeid.runtime.web import admin
from edgeid.runtime.web.access import PageAccess, posted
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.rendering import flash, render
from edgeid.runtime.web.state import web_state

router = APIRouter(include_in_schema=False)

UserAdmin = Annotated[Principal, Depends(PageAccess(Permission.USERS))]
GalleryAdmin = Annotated[Principal, Depends(PageAccess(Permission.GALLERIES))]
SettingsReader = Annotated[Principal, Depends(PageAccess(Permission.SETTINGS))]


def _role_descriptions() -> dict[str, str]:
    return {r.value: ROLE_DESCRIPTIONS[r] for r in Role}


def _users_page(
    request: Request,
    principal: Principal,
    *,
    error: str | None = None,
    created: tuple[str, str] | None = None,
    note: str = "",
    status_code: int = 200,
) -> Response:
    state = web_state(request)
    users = state.users.list()
    # Only accounts that exist: names typed by guessers (or passwords typed into the name
    # field) are not shown.
    names = {u.username for u in users}
    throttled = [t for t in state.throttle.throttled() if t.username in names]
    return render(
        request,
        "admin_users.html",
        principal=principal,
        status_code=status_code,
        users=users,
        throttled=throttled,
        slowed={t.username for t in throttled},
        roles=[r.value for r in Role],
        role_descriptions=_role_descriptions(),
        galleries=[g.name for g in state.galleries.list_galleries()],
        error=error,
        created=created,
        note=note,
        dual_control=state.approvals.dual_control,
    )


@router.get("/admin/users")
def users_page(request: Request, principal: UserAdmin) -> Response:
    return _users_page(request, principal)


@router.post("/admin/users")
def user_create(request: Request, principal: UserAdmin) -> Response:
    form = posted(request)
    try:
        change = user_requests.create_user(
            web_state(request).approvals,
            principal,
            form.get("username").strip().lower(),
            form.get("role"),
            form.all("gallery"),
            reason=form.get("reason") or None,
            where="web /admin/users",
        )
    except BadInputError as exc:
        return _users_page(request, principal, error=str(exc), status_code=400)
    # Shown once, on this response only; it is stored nowhere but as a hash.
    created = (
        (change.user.username, change.one_time_password)
        if change.user and change.one_time_password
        else None
    )
    return _users_page(request, principal, created=created, note=change.note())


def _user_page(
    request: Request,
    principal: Principal,
    username: str,
    *,
    error: str | None = None,
    password: str | None = None,
    status_code: int = 200,
) -> Response:
    state = web_state(request)
    return render(
        request,
        "admin_user.html",
        principal=principal,
        status_code=status_code,
        user=state.users.require(username),
        roles=[r.value for r in Role],
        role_descriptions=_role_descriptions(),
        throttled=[t for t in state.throttle.throttled() if t.username == username],
        galleries=[g.name for g in state.galleries.list_galleries()],
        tokens=state.tokens.list(username),
        error=error,
        password=password,
        dual_control=state.approvals.dual_control,
    )


@router.get("/admin/users/{username}")
def user_page(request: Request, username: str, principal: UserAdmin) -> Response:
    return _user_page(request, principal, username)


@router.post("/admin/users/{username}")
def user_update(request: Request, username: str, principal: UserAdmin) -> Response:
    form = posted(request)
    try:
        change = user_requests.update_user(
            web_state(request).approvals,
            principal,
            username,
            role=form.get("role") or None,
            galleries=form.all("gallery"),
            disabled=form.get("disabled") == "yes",
            reason=form.get("reason") or None,
            where="web /admin/users/{username}",
        )
    except BadInputError as exc:
        return _user_page(request, principal, username, error=str(exc), status_code=400)
    flash(principal, " ".join(p for p in (f"User {username} saved.", change.note()) if p))
    return RedirectResponse(f"/admin/users/{username}", status_code=303)


@router.post("/admin/users/{username}/password")
def user_reset_password(request: Request, username: str, principal: UserAdmin) -> Response:
    password = web_state(request).accounts.reset_password(
        principal, username, where="web /admin/users/{username}/password"
    )
    return _user_page(request, principal, username, password=password)


@router.post("/admin/users/{username}/unlock")
def user_unlock(request: Request, username: str, principal: UserAdmin) -> Response:
    """Clear the sign-in delays of an account (recorded as ``lock_cleared``)."""
    cleared = web_state(request).accounts.clear_lock(
        principal, username, where="web /admin/users/{username}/unlock"
    )
    flash(
        principal,
        f"{username} may sign in again: {cleared} sign-in delay(s) cleared. The audit log "
        "records that you cleared them.",
    )
    back = "/admin/users/" + username if posted(request).get("back") == "user" else "/admin/users"
    return RedirectResponse(back, status_code=303)


# -- galleries -------------------------------------------------------------------------------


def _galleries_page(
    request: Request, principal: Principal, *, error: str | None = None, status_code: int = 200
) -> Response:
    return render(
        request,
        "admin_galleries.html",
        principal=principal,
        status_code=status_code,
        galleries=web_state(request).galleries.list_galleries(),
        error=error,
    )


@router.get("/admin/galleries")
def galleries_page(request: Request, principal: GalleryAdmin) -> Response:
    return _galleries_page(request, principal)


@router.post("/admin/galleries")
def gallery_create(request: Request, principal: GalleryAdmin) -> Response:
    form = posted(request)
    try:
        info = admin.create_gallery(
            web_state(request), principal, form.get("name"), form.get("description")
        )
    except BadInputError as exc:
        return _galleries_page(request, principal, error=str(exc), status_code=400)
    flash(principal, f"Gallery {info.name} created; give users access on the Users page.")
    return RedirectResponse("/admin/galleries", status_code=303)


def _erase_page(
    request: Request,
    principal: Principal,
    gallery: str,
    *,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    state = web_state(request)
    return render(
        request,
        "admin_gallery_delete.html",
        principal=principal,
        status_code=status_code,
        info=state.galleries.gallery(gallery).info(),
        error=error,
        dual_control=state.approvals.dual_control,
    )


@router.get("/admin/galleries/{gallery}/delete")
def gallery_delete_confirm(request: Request, gallery: str, principal: GalleryAdmin) -> Response:
    return _erase_page(request, principal, gallery)


@router.post("/admin/galleries/{gallery}/delete")
def gallery_delete(request: Request, gallery: str, principal: GalleryAdmin) -> Response:
    form = posted(request)
    if form.get("confirm_name") != gallery:
        error = "type the gallery's name exactly to confirm"
        return _erase_page(request, principal, gallery, error=error, status_code=400)
    try:
        outcome = web_state(request).approvals.erase_gallery(
            principal,
            gallery,
            reason=form.get("reason"),
            where="web /admin/galleries/{gallery}/delete",
        )
    except JustificationError as exc:
        return _erase_page(request, principal, gallery, error=str(exc), status_code=400)
    if outcome.done:
        flash(principal, f"Gallery {gallery} erased.")
    else:
        proposal_id = outcome.proposal.proposal_id if outcome.proposal else "?"
        flash(
            principal,
            f"Erasing gallery {gallery} waits for a second person: proposal {proposal_id} is on "
            "the Approvals page.",
        )
    return RedirectResponse("/admin/galleries", status_code=303)


# -- settings --------------------------------------------------------------------------------


@router.get("/admin/settings")
def settings_page(request: Request, principal: SettingsReader) -> Response:
    state = web_state(request)
    sections: dict[str, Any] = state.settings.model_dump()
    return render(
        request,
        "admin_settings.html",
        principal=principal,
        sections=sections,
        config_file=str(state.home / "edgeid.toml"),
    )
