"""The Approvals page: proposals under the two-person rule, for admins and supervisors to
approve or reject (and for a proposer to withdraw). The rules themselves are enforced in
``edgeid.runtime.services.approvals``; this page only shows and forwards."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.services.caller import same_person
from edgeid.runtime.services.proposals import Proposal
from edgeid.runtime.web.access import PageAccess
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.rendering import flash, render
from edgeid.runtime.web.state import web_state

router = APIRouter(include_in_schema=False)

Approver = Annotated[Principal, Depends(PageAccess(Permission.APPROVALS))]


@dataclass(frozen=True)
class Row:
    proposal: Proposal
    age: str
    expires: str
    own: bool


def age_text(delta: timedelta) -> str:
    minutes = max(0, int(delta.total_seconds() // 60))
    if minutes < 60:
        return f"{minutes} min"
    if minutes < 48 * 60:
        return f"{minutes // 60} h"
    return f"{minutes // (24 * 60)} days"


def _rows(request: Request, principal: Principal) -> list[Row]:
    approvals = web_state(request).approvals
    now: datetime = approvals.now()
    return [
        Row(
            proposal=p,
            age=age_text(now - p.created_at),
            expires=f"{p.expires_at(approvals.ttl):%Y-%m-%d %H:%M}",
            own=same_person(p.proposer, principal.actor.user),
        )
        for p in approvals.pending(principal)
    ]


def _page(
    request: Request,
    principal: Principal,
    *,
    created: tuple[str, str] | None = None,
) -> Response:
    return render(
        request,
        "approvals.html",
        principal=principal,
        rows=_rows(request, principal),
        dual_control=web_state(request).approvals.dual_control,
        created=created,
    )


@router.get("/approvals")
def approvals_page(request: Request, principal: Approver) -> Response:
    return _page(request, principal)


@router.post("/approvals/{proposal_id}/approve")
def approve(request: Request, proposal_id: str, principal: Approver) -> Response:
    outcome = web_state(request).approvals.approve(
        principal, proposal_id, where="web /approvals/{proposal_id}/approve"
    )
    if outcome.user is not None and outcome.one_time_password:
        # The new admin's one-time password, shown once, to the person who approved.
        return _page(request, principal, created=(outcome.user.username, outcome.one_time_password))
    flash(principal, f"Approved and done: {outcome.summary}.")
    return RedirectResponse("/approvals", status_code=303)


@router.post("/approvals/{proposal_id}/reject")
def reject(request: Request, proposal_id: str, principal: Approver) -> Response:
    proposal = web_state(request).approvals.reject(
        principal, proposal_id, where="web /approvals/{proposal_id}/reject"
    )
    done = "Withdrawn" if same_person(proposal.proposer, principal.actor.user) else "Rejected"
    flash(principal, f"{done}: {proposal.summary()}.")
    return RedirectResponse("/approvals", status_code=303)
