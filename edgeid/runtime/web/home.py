"""The home page: what each role needs today, and nothing personal beyond the person's own.

Investigators see their newest searches, cases and running ingests; supervisors and admins
what waits for them (proposals to approve, locked accounts); admins and technicians the box's
health in brief (the same facts ``/healthz`` gives anyone). No subject, face or other person's case.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.human_units import duration
from edgeid.runtime.web import case_operations as cops
from edgeid.runtime.web.pages_health import health_summary
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.rendering import render
from edgeid.runtime.web.state import WebState, web_state

RECENT_CASES = 5
RECENT_SEARCHES = 5


def _investigator(state: WebState, principal: Principal) -> dict[str, Any]:
    searches = state.history.mine(principal)[:RECENT_SEARCHES]  # the person's own, newest first
    if state.case_access is None or state.cases is None:
        return {"cases": [], "jobs": [], "searches": searches}
    return {
        "searches": searches,
        "cases": cops.my_cases(state, principal)[:RECENT_CASES],
        "jobs": [j for j in state.cases.jobs.of_user(principal.username) if j.running],
    }


def home_page(request: Request, principal: Principal) -> Response:
    state = web_state(request)
    facts: dict[str, Any] = {
        "cases": [],
        "jobs": [],
        "searches": [],
        "pending": None,
        "locked": None,
    }
    if principal.may(Permission.SEARCH):
        facts |= _investigator(state, principal)
    if principal.may(Permission.APPROVALS):
        facts["pending"] = len(state.approvals.pending(principal))
    if principal.may(Permission.USERS):
        names = {u.username for u in state.users.list()}
        slowed = {t.username for t in state.throttle.throttled()}
        facts["locked"] = len(slowed & names)
    health = None
    if principal.may(Permission.HEALTH) or principal.may(Permission.SETTINGS):
        summary = health_summary(state)
        health = summary | {"uptime": duration(float(summary["uptime_s"]))}
    return render(request, "home.html", principal=principal, health=health, **facts)
