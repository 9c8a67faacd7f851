"""The technician's health page and the public ``/healthz``: the box, never a face, a name,
a case or a count of people."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.inference.manifest import list_manifests
from edgeid.runtime.system.metrics import SERVICE_METRICS
from edgeid.runtime.web.access import PageAccess
from edgeid.runtime.web.principal import Principal
from edgeid.runtime.web.rendering import render
from edgeid.runtime.web.state import WebState, web_state

router = APIRouter(include_in_schema=False)

Technician = Annotated[Principal, Depends(PageAccess(Permission.HEALTH))]


def health_summary(state: WebState) -> dict[str, Any]:
    """What ``/healthz`` answers: no faces, names, cases or counts of people."""
    pipeline = state.galleries.pipeline
    try:
        models = [m.name for m in list_manifests(state.models_dir or state.home / "models")]
    except (OSError, ValueError, BadInputError):
        models = []
    return {
        "state": "ready",
        "version": state.version,
        "backend": pipeline.backend_state,
        # Bytes of GPU memory per model running on TensorRT (numbers only; empty on a CPU).
        "gpu_memory_bytes": pipeline.gpu_memory(),
        "detector": state.settings.inference.detector,
        "models": models,
        "uptime_s": round(state.clock() - state.started, 1),
    }


@router.get("/healthz")
def healthz(request: Request) -> Response:
    return JSONResponse(health_summary(web_state(request)))


@router.get("/health")
def health_page(request: Request, principal: Technician) -> Response:
    state = web_state(request)
    try:
        manifests = list_manifests(state.models_dir or state.home / "models")
    except (OSError, ValueError, BadInputError):
        manifests = []
    disk = shutil.disk_usage(state.home)
    extra = state.health_extra() if state.health_extra else {}
    return render(
        request,
        "health.html",
        principal=principal,
        summary=health_summary(state),
        manifests=manifests,
        disk={"total_gb": disk.total / 1e9, "free_gb": disk.free / 1e9},
        metrics=asdict(SERVICE_METRICS.snapshot()),
        audit_records=state.audit.last_seq,
        extra=extra,
    )
