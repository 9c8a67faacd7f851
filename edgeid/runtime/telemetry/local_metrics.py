"""The box's own ``/metrics``, for the technician's Prometheus or a look from the box's shell:
the figures of a health report under the fleet manager's names and labels (``exposition``), with
the request counters and the latency histogram counted since the service started.

Numbers only, as in the health report: nothing here knows what a request was about.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from edgeid.runtime.inference.model_home import models_dir
from edgeid.runtime.system.metrics import SERVICE_METRICS, BackendState, ServiceMetrics
from edgeid.runtime.telemetry.exposition import Families, FamiliesCollector
from edgeid.runtime.telemetry.report import HealthCollector
from edgeid.runtime.telemetry.schema import SpoolState
from edgeid.runtime.telemetry.software import model_ids

# The box's /metrics says nothing of the telemetry spool (the agent's, reported to the fleet).
_NO_SPOOL = SpoolState(pending=0, dropped_total=0)


def box_collector(
    home: Path,
    version: str,
    *,
    site: str,
    device: str,
    backend_state: Callable[[], BackendState | None],
    metrics: ServiceMetrics = SERVICE_METRICS,
    health: HealthCollector | None = None,
) -> FamiliesCollector:
    """A collector reading this box at each scrape; CPU use is measured since the last one."""
    reader = health or HealthCollector(
        home,
        version,
        metrics=metrics,
        backend_state=backend_state,
        model_ids=lambda: model_ids(models_dir(home)),
    )
    lock = threading.Lock()  # the CPU sampler keeps the previous scrape's counters
    labels = (site, device)

    def fill(families: Families) -> None:
        with lock:
            report = reader.collect(0, _NO_SPOOL, reset_metrics=False)
        families.health(labels, report)
        families.inference(labels, metrics.totals())

    return FamiliesCollector(fill)
