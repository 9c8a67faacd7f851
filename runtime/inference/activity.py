"""Whether inference is alive, for the systemd watchdog and the health report.

Inference runs in the web server's request threads. ``InferenceActivity`` wraps each job:
while no job has been running for longer than ``stall_s`` (an idle pipeline is alive), a small
thread beats the watchdog heartbeat; a job stuck in the runtime stops the beats, so systemd
restarts the service. The number of jobs in flight is the queue depth the telemetry reports.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator

from runtime.system.metrics import SERVICE_METRICS, ServiceMetrics

# The slowest healthy job: MMOD upsampled on a 50-megapixel photo takes well under 20 s on a
# 2-core box; a job older than this is taken to be hung.
STALL_S = 30.0
BEAT_INTERVAL_S = 5.0


class InferenceActivity:
    def __init__(
        self,
        beat: Callable[[], None] | None = None,
        *,
        stall_s: float = STALL_S,
        interval_s: float = BEAT_INTERVAL_S,
        metrics: ServiceMetrics = SERVICE_METRICS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._beat = beat
        self._stall_s = stall_s
        self._interval_s = interval_s
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._running: dict[int, float] = {}  # job number -> start time
        self._numbers = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def job(self) -> Iterator[None]:
        number = next(self._numbers)
        with self._lock:
            self._running[number] = self._clock()
            self._metrics.set_queue_depth(len(self._running))
        try:
            yield
        finally:
            with self._lock:
                del self._running[number]
                self._metrics.set_queue_depth(len(self._running))

    def alive(self) -> bool:
        """No job has been running for longer than ``stall_s``."""
        with self._lock:
            oldest = min(self._running.values(), default=None)
        return oldest is None or self._clock() - oldest <= self._stall_s

    def start(self) -> None:
        if self._beat is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="inference-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._interval_s + 1)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            if self._beat is not None and self.alive():
                self._beat()
