"""The service's own figures for health telemetry: inference latency, requests, errors, queue
depth and backend state, recorded by the web API and the pipeline, read by the telemetry agent.

Numbers only: nothing here knows what a request was about. Memory is bounded: latency samples
between two reports are kept as a uniform random sample of at most ``max_samples`` values
(reservoir sampling), so p50/p95 stay unbiased under any load. Latencies are also counted in
fixed buckets (``LATENCY_BUCKETS_S``), per period for the health report and since start for the
box's own ``/metrics``: buckets add up across reports and boxes, percentiles do not.
"""

from __future__ import annotations

import bisect
import logging
import math
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger(__name__)

# The inference backend as the pipeline reports it (FacePipeline.backend_state).
BackendState = Literal["cpu", "tensorrt", "degraded"]

# Upper bounds of the latency histogram, in seconds (Prometheus client libraries' defaults). The
# health report carries one count per bound plus one for slower requests; changing them changes
# the telemetry wire format.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
LATENCY_BUCKET_COUNT = len(LATENCY_BUCKETS_S) + 1  # the last: slower than every bound

# 2,048 samples put the p95 within about half a percentile of the true one, in 16 KiB.
MAX_LATENCY_SAMPLES = 2048


@dataclass(frozen=True)
class MetricsSnapshot:
    """What happened since the previous snapshot that reset (latencies in seconds)."""

    requests: int
    errors: int
    latency_p50_s: float | None  # None when no request succeeded in the period
    latency_p95_s: float | None
    queue_depth: int  # now
    queue_depth_max: int  # the largest depth seen in the period
    backend_state: BackendState | None  # None until the service reports one
    # Bytes of GPU memory each model's TensorRT engine holds now, by model name (none on a CPU).
    engine_memory_bytes: dict[str, int] = field(default_factory=dict)
    # Successful requests per latency bucket (not cumulative; the last counts those slower than
    # every bound) and their summed latency, in the period.
    latency_buckets: tuple[int, ...] = (0,) * LATENCY_BUCKET_COUNT
    latency_sum_s: float = 0.0


@dataclass(frozen=True)
class InferenceTotals:
    """Counts since some start, never reset: the service's own (the box's ``/metrics``) or the
    fleet manager's since a device's first report."""

    requests: int
    errors: int
    # Per bucket, not cumulative, as in MetricsSnapshot; None: never reported (fleet only).
    latency_buckets: Sequence[int] | None
    latency_sum_s: float


def bucket_of(seconds: float) -> int:
    """Index of the latency bucket ``seconds`` falls in (``le`` semantics)."""
    return bisect.bisect_left(LATENCY_BUCKETS_S, seconds)


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty list."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


class ServiceMetrics:
    """Thread-safe counters and gauges; ``snapshot_and_reset`` starts a new reporting period."""

    def __init__(
        self, *, max_samples: int = MAX_LATENCY_SAMPLES, rng: random.Random | None = None
    ) -> None:
        if max_samples < 1:
            raise ValueError("max_samples must be at least 1")
        self._max_samples = max_samples
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._samples: list[float] = []
        self._seen = 0  # successful requests this period, sampled or not
        self._requests = 0
        self._errors = 0
        self._queue_depth = 0
        self._queue_depth_max = 0
        self._queue_source: Callable[[], int] | None = None
        self._backend: BackendState | None = None
        self._engine_memory_source: Callable[[], Mapping[str, int]] | None = None
        self._buckets = [0] * LATENCY_BUCKET_COUNT
        self._sum_s = 0.0
        self._total_requests = self._total_errors = 0
        self._total_buckets = [0] * LATENCY_BUCKET_COUNT
        self._total_sum_s = 0.0

    def record_request(self, seconds: float, *, error: bool = False) -> None:
        """One request done; a failed request counts as an error and adds no latency sample."""
        with self._lock:
            self._requests += 1
            self._total_requests += 1
            if error:
                self._errors += 1
                self._total_errors += 1
                return
            if not math.isfinite(seconds) or seconds < 0:
                logger.debug("ignored a latency that is not a duration")
                return
            slot = bucket_of(seconds)
            self._buckets[slot] += 1
            self._total_buckets[slot] += 1
            self._sum_s += seconds
            self._total_sum_s += seconds
            self._seen += 1
            if len(self._samples) < self._max_samples:
                self._samples.append(seconds)
            else:
                slot = self._rng.randrange(self._seen)
                if slot < self._max_samples:
                    self._samples[slot] = seconds

    def record_error(self) -> None:
        """A request that failed before it could be timed (refused, malformed)."""
        with self._lock:
            self._requests += 1
            self._errors += 1
            self._total_requests += 1
            self._total_errors += 1

    def set_queue_depth(self, depth: int) -> None:
        with self._lock:
            self._queue_depth = max(0, depth)
            self._queue_depth_max = max(self._queue_depth_max, self._queue_depth)

    def set_queue_depth_source(self, source: Callable[[], int] | None) -> None:
        """Read the depth from ``source`` at each snapshot (e.g. the micro-batcher's stats)."""
        with self._lock:
            self._queue_source = source

    def set_backend_state(self, state: BackendState) -> None:
        with self._lock:
            self._backend = state

    def backend_state(self) -> BackendState | None:
        with self._lock:
            return self._backend

    def set_engine_memory_source(self, source: Callable[[], Mapping[str, int]] | None) -> None:
        """Read each TensorRT engine's GPU memory from ``source`` at each snapshot
        (``FacePipeline.gpu_memory``)."""
        with self._lock:
            self._engine_memory_source = source

    def _engine_memory(self) -> dict[str, int]:
        source = self._engine_memory_source
        if source is None:
            return {}
        try:
            return {str(k): max(0, int(v)) for k, v in source().items()}
        except Exception:  # a broken gauge must not stop the health report
            logger.exception("reading the engines' GPU memory failed")
            return {}

    def snapshot(self) -> MetricsSnapshot:
        """The figures of the current period, leaving it open."""
        return self._take(reset=False)

    def snapshot_and_reset(self) -> MetricsSnapshot:
        """The figures of the current period, and start the next one."""
        return self._take(reset=True)

    def _take(self, *, reset: bool) -> MetricsSnapshot:
        source = self._queue_source
        if source is not None:
            try:
                self.set_queue_depth(int(source()))
            except Exception:  # a broken gauge must not stop the health report
                logger.exception("reading the queue depth failed")
        engine_memory = self._engine_memory()
        with self._lock:
            ordered = sorted(self._samples)
            snap = MetricsSnapshot(
                requests=self._requests,
                errors=self._errors,
                latency_p50_s=percentile(ordered, 0.50) if ordered else None,
                latency_p95_s=percentile(ordered, 0.95) if ordered else None,
                queue_depth=self._queue_depth,
                queue_depth_max=self._queue_depth_max,
                backend_state=self._backend,
                engine_memory_bytes=engine_memory,
                latency_buckets=tuple(self._buckets),
                latency_sum_s=self._sum_s,
            )
            if reset:
                self._samples = []
                self._buckets = [0] * len(self._buckets)
                self._sum_s = 0.0
                self._seen = self._requests = self._errors = 0
                self._queue_depth_max = self._queue_depth
            return snap

    def totals(self) -> InferenceTotals:
        """Requests, errors and the latency histogram since this object was made."""
        with self._lock:
            return InferenceTotals(
                requests=self._total_requests,
                errors=self._total_errors,
                latency_buckets=tuple(self._total_buckets),
                latency_sum_s=self._total_sum_s,
            )


# The process-wide registry: the service records into it, the telemetry agent reads it.
SERVICE_METRICS = ServiceMetrics()
