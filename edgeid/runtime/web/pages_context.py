"""The page where a session states the case and reason it is working on (see
``edgeid.runtime.web.work_context``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from edgeid.runtime.audit.justification import CASE_NUMBER_PATTERN, MIN_REASON_CHARS
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.web import work_context
from edgeid.runtime.web.access import PageAccess, posted
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.rendering import render
from edgeid.runtime.web.state import web_state

router = APIRouter(include_in_schema=False)

SignedIn = Annotated[Principal, Depends(PageAccess(None))]


def _page(
    request: Request,
    principal: Principal,
    *,
    next_path: str,
    values: dict[str, str],
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    return render(
        request,
        "context.html",
        principal=principal,
        status_code=status_code,
        current=work_context.current(principal),
        next_path=work_context.safe_next(next_path),
        values=values,
        case_pattern=CASE_NUMBER_PATTERN,
        min_reason=MIN_REASON_CHARS,
        error=error,
    )


@router.get("/context")
def context_form(request: Request, principal: SignedIn) -> Response:
    now = work_context.current(principal)
    case = request.query_params.get("case") or (now.case if now else "")
    reason = now.reason if now and now.case == case else ""
    return _page(
        request,
        principal,
        next_path=request.query_params.get("next", "/"),
        values={"case": case, "reason": reason},
    )


@router.post("/context")
def context_set(request: Request, principal: SignedIn) -> Response:
    form = posted(request)
    values = {"case": form.get("case"), "reason": form.get("reason")}
    try:
        work_context.set_context(web_state(request), principal, values["case"], values["reason"])
    except BadInputError as exc:
        return _page(
            request,
            principal,
            next_path=form.get("next"),
            values=values,
            error=str(exc),
            status_code=400,
        )
    return RedirectResponse(work_context.safe_next(form.get("next")), status_code=303)
