"""``/metrics``: the box's health for Prometheus, under the fleet manager's metric names.

Open to a client on the box's loopback; from elsewhere an API token with the ``health`` scope
(a technician's) is required. Numbers only: no face, name, case or count of people.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import Response

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.telemetry.exposition import CONTENT_TYPE, render
from edgeid.runtime.web.access import LocalOrApiAccess
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.state import web_state

router = APIRouter(include_in_schema=False)

METRICS_PATH = "/metrics"
LocalOrTechnician = Annotated[Principal | None, Depends(LocalOrApiAccess(Permission.HEALTH))]


@router.get(METRICS_PATH)
def metrics(request: Request, _who: LocalOrTechnician) -> Response:
    return Response(render(web_state(request).box_metrics), media_type=CONTENT_TYPE)
