"""Builds one health report from the host, the sensors and the service's own metrics."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import get_args

from edgeid.runtime.inference.model_home import models_dir
from edgeid.runtime.system.integrity import INTEGRITY, IntegrityStatus
from edgeid.runtime.system.metrics import BackendState, MetricsSnapshot, ServiceMetrics
from edgeid.runtime.telemetry.host import (
    PROC,
    CpuSampler,
    read_cpu,
    read_disk,
    read_host_uptime,
    read_memory,
)
from edgeid.runtime.telemetry.schema import (
    MODEL_ID_PATTERN,
    MODEL_NAME_PATTERN,
    EngineMemory,
    HealthReport,
    Inference,
    Integrity,
    Software,
    SpoolState,
    coarse,
)
from edgeid.runtime.telemetry.sensors import SensorReader
from edgeid.runtime.telemetry.software import embedder_id, schema_version

logger = logging.getLogger(__name__)

BackendSource = Callable[[], BackendState | None]
ModelIdSource = Callable[[], Sequence[str]]
CountSource = Callable[[], int]
_MODEL_ID = re.compile(MODEL_ID_PATTERN)
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
BACKENDS: tuple[BackendState, ...] = get_args(BackendState)
MAX_MODELS = 32  # the schema's bound


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else coarse(min(seconds * 1000.0, 3.6e6))


class HealthCollector:
    """Everything a health report says; each source that fails leaves a gap, not a crash."""

    def __init__(
        self,
        home: Path,
        version: str,
        *,
        metrics: ServiceMetrics,
        backend_state: BackendSource,
        model_ids: ModelIdSource,
        enrolled_faces: CountSource | None = None,
        scrub: IntegrityStatus = INTEGRITY,
        proc: Path = PROC,
        sensors: SensorReader | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._home = home
        self._version = schema_version(version)
        self._metrics = metrics
        self._backend_state = backend_state
        self._model_ids = model_ids
        self._enrolled_faces = enrolled_faces
        self._scrub = scrub
        self._proc = proc
        self._sensors = sensors or SensorReader()
        self._clock = clock
        self._monotonic = monotonic
        self._started = monotonic()
        self._cpu = CpuSampler(proc)

    def collect(self, seq: int, spool: SpoolState, *, reset_metrics: bool) -> HealthReport:
        figures = self._metrics.snapshot_and_reset() if reset_metrics else self._metrics.snapshot()
        temperatures, gpus = self._sensors.read()
        return HealthReport(
            seq=seq,
            measured_at=coarse(self._clock()),
            uptime_s=coarse(max(0.0, self._monotonic() - self._started)),
            host_uptime_s=read_host_uptime(self._proc),
            cpu=read_cpu(self._cpu, self._proc),
            memory=read_memory(self._proc),
            disk=read_disk(self._home),
            temperatures=temperatures,
            gpus=gpus,
            inference=self._inference(figures),
            software=Software(
                edgeid=self._version,
                models=self._models(),
                embedder=embedder_id(models_dir(self._home)),
            ),
            spool=spool,
            enrolled_faces=self._count(),
            integrity=self._integrity(),
        )

    def _integrity(self) -> Integrity | None:
        last = self._scrub.last()
        if last is None:
            return None
        return Integrity(
            objects_checked=last.objects_checked,
            damaged=last.damaged,
            finished_at=coarse(last.finished_at),
        )

    def backend(self) -> BackendState | None:
        try:
            state = self._backend_state()
        except Exception:
            logger.exception("reading the backend state failed")
            return None
        if state is not None and state not in BACKENDS:
            logger.warning("backend state is not one of %s; reported as unknown", BACKENDS)
            return None
        return state

    def _inference(self, figures: MetricsSnapshot) -> Inference:
        backend = self.backend() or figures.backend_state
        return Inference(
            backend=backend,
            requests=figures.requests,
            errors=figures.errors,
            latency_p50_ms=_ms(figures.latency_p50_s),
            latency_p95_ms=_ms(figures.latency_p95_s),
            queue_depth=figures.queue_depth,
            queue_depth_max=figures.queue_depth_max,
            engine_memory=[
                EngineMemory(model=name, bytes=min(value, 1 << 60))
                for name, value in sorted(figures.engine_memory_bytes.items())
                if _MODEL_NAME.match(name)
            ][:MAX_MODELS],
            latency_buckets=list(figures.latency_buckets),
            latency_sum_s=coarse(min(figures.latency_sum_s, 1e10)),
        )

    def _models(self) -> list[str]:
        try:
            ids = list(self._model_ids())
        except Exception:
            logger.exception("listing the model ids failed")
            return []
        valid = [i for i in ids if isinstance(i, str) and _MODEL_ID.match(i)]
        if len(valid) != len(ids):
            logger.warning(
                "%d model id(s) do not match the telemetry pattern; left out", len(ids) - len(valid)
            )
        return valid[:MAX_MODELS]

    def _count(self) -> int | None:
        if self._enrolled_faces is None:
            return None
        try:
            return max(0, int(self._enrolled_faces()))
        except Exception:
            logger.exception("counting enrolled faces failed")
            return None
