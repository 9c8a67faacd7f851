"""The technician's health page and the public ``/healthz``: the box, never a face, a name,
a case or a count of people."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from edgeid.runtime.accounts.roles import Permission
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.human_units import duration, size
from edgeid.runtime.inference.manifest import list_manifests
from edgeid.runtime.inference.model_home import models_dir
from edgeid.runtime.system.metrics import SERVICE_METRICS
from edgeid.runtime.telemetry.host import read_host_uptime, read_memory
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
        models = [m.name for m in list_manifests(state.models_dir or models_dir(state.home))]
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


def service_memory(status: Path = Path("/proc/self/status")) -> int | None:
    """The service's resident memory in bytes (None where /proc does not say)."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def human_health(state: WebState) -> dict[str, str]:
    """The page's figures in the units a person reads: uptime in days and hours, memory and
    disk in MB or GB (``/healthz`` keeps its raw numbers for machines)."""
    memory = read_memory()
    disk = shutil.disk_usage(state.home)
    rss = service_memory()
    host_up = read_host_uptime()
    return {
        "uptime": duration(state.clock() - state.started),
        "host_uptime": duration(host_up) if host_up else "unknown",
        "memory": (
            f"{size(memory.available_bytes)} free of {size(memory.total_bytes)} "
            f"({memory.used_percent:.0f}% in use)"
            if memory.total_bytes
            else "unknown"
        ),
        "service_memory": size(rss) if rss is not None else "unknown",
        "disk": f"{size(disk.free)} free of {size(disk.total)}",
    }


@router.get("/healthz")
def healthz(request: Request) -> Response:
    return JSONResponse(health_summary(web_state(request)))


@router.get("/health")
def health_page(request: Request, principal: Technician) -> Response:
    state = web_state(request)
    try:
        manifests = list_manifests(state.models_dir or models_dir(state.home))
    except (OSError, ValueError, BadInputError):
        manifests = []
    extra = state.health_extra() if state.health_extra else {}
    return render(
        request,
        "health.html",
        principal=principal,
        summary=health_summary(state),
        manifests=manifests,
        human=human_health(state),
        metrics=asdict(SERVICE_METRICS.snapshot()),
        audit_records=state.audit.last_seq,
        extra=extra,
    )
