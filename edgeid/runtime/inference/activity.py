"""Whether inference is alive, and how much of it may run at once.

Inference runs in the web server's request threads. ``InferenceActivity`` wraps each job:
while no job has been running for longer than ``stall_s`` (an idle pipeline is alive), a small
thread beats the watchdog heartbeat; a job stuck in the runtime stops the beats, so systemd
restarts the service. The number of jobs in flight is the queue depth the telemetry reports.

Admission: at most ``InferenceLimits.max_running`` jobs run at once and ``max_waiting`` more
wait for a slot (each for at most ``wait_s``); beyond that a job is refused at once with
``InferenceBusyError`` (HTTP 503 with Retry-After), so a burst of heavy uploads queues up
instead of multiplying the memory one photo costs. After the last running job the freed heap is
handed back to the system (glibc keeps it otherwise).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeid.runtime.errors import OverloadedError
from edgeid.runtime.inference.image_decode import MAX_WORKING_PIXELS
from edgeid.runtime.system.metrics import SERVICE_METRICS, ServiceMetrics

if TYPE_CHECKING:
    from edgeid.runtime.config.settings import InferenceSettings

# The slowest healthy job: MMOD upsampled on a 50-megapixel photo takes well under 20 s on a
# 2-core box; a job older than this is taken to be hung.
STALL_S = 30.0
BEAT_INTERVAL_S = 5.0


@dataclass(frozen=True)
class InferenceLimits:
    """How much inference one box admits (``[inference]`` in edgeid.toml sets them)."""

    # Two jobs keep both cores of a small box busy; each more only adds its memory.
    max_running: int = 2
    # Of which photos over the working size (reduced for detection: the heavy ones): one, so a
    # burst of large uploads never takes every slot from ordinary searches.
    max_large_running: int = 1
    # A few more wait their turn (a search takes about a second); more are refused.
    max_waiting: int = 6
    # Waiting longer than this means the box is saturated: refuse rather than time out.
    wait_s: float = 20.0
    # What a refused client is told to wait before retrying.
    retry_after_s: float = 5.0
    # Detection sees a large photo reduced to this many pixels (faces are cut at full size).
    max_working_pixels: int = MAX_WORKING_PIXELS
    # A crowd photo's faces beyond this many (the least confident) are counted, not analysed.
    max_faces: int = 100
    # A case ingest analyses this many photos or frames at once (its own threads, outside the
    # admission slots, as the ingest always ran); photos over the working size still one at a
    # time (max_large_running).
    ingest_streams: int = 2

    @classmethod
    def of(cls, section: InferenceSettings) -> InferenceLimits:
        """The limits the ``[inference]`` section of edgeid.toml sets."""
        return cls(
            max_running=section.max_running_jobs,
            max_large_running=section.max_large_running_jobs,
            max_waiting=section.max_waiting_jobs,
            wait_s=section.admission_wait_s,
            max_working_pixels=section.max_working_pixels,
            max_faces=section.max_faces_per_image,
            ingest_streams=section.ingest_streams,
        )


class InferenceBusyError(OverloadedError):
    """Every inference slot is taken and the waiting line is full (HTTP 503, Retry-After)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InferenceActivity:
    def __init__(
        self,
        beat: Callable[[], None] | None = None,
        *,
        stall_s: float = STALL_S,
        interval_s: float = BEAT_INTERVAL_S,
        metrics: ServiceMetrics = SERVICE_METRICS,
        clock: Callable[[], float] = time.monotonic,
        limits: InferenceLimits | None = None,
    ) -> None:
        self._beat = beat
        self._stall_s = stall_s
        self._interval_s = interval_s
        self._metrics = metrics
        self._clock = clock
        self.limits = limits or InferenceLimits()
        self._slots = threading.BoundedSemaphore(self.limits.max_running)
        self._large_slots = threading.BoundedSemaphore(self.limits.max_large_running)
        self._waiting = 0
        self._lock = threading.Lock()
        self._running: dict[int, float] = {}  # job number -> start time
        self._numbers = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def job(self, *, large: bool = False) -> Iterator[None]:
        """One inference job, admitted within the limits or refused with InferenceBusyError;
        a ``large`` one (a photo over the working size) also needs one of the large slots."""
        gates = (self._large_slots, self._slots) if large else (self._slots,)
        deadline = self._clock() + self.limits.wait_s
        taken: list[threading.BoundedSemaphore] = []
        try:
            for gate in gates:
                self._admit(gate, deadline)
                taken.append(gate)
        except InferenceBusyError:
            for gate in taken:
                gate.release()
            raise
        number = next(self._numbers)
        with self._lock:
            self._running[number] = self._clock()
            self._metrics.set_queue_depth(len(self._running) + self._waiting)
        try:
            yield
        finally:
            with self._lock:
                del self._running[number]
                self._metrics.set_queue_depth(len(self._running) + self._waiting)
                last = not self._running
            for gate in gates:
                gate.release()
            if last:
                release_memory()

    def _admit(self, gate: threading.BoundedSemaphore, deadline: float) -> None:
        with self._lock:
            if gate.acquire(blocking=False):
                return
            if self._waiting >= self.limits.max_waiting:
                raise self._busy()
            self._waiting += 1
        try:
            admitted = gate.acquire(timeout=max(0.0, deadline - self._clock()))
        finally:
            with self._lock:
                self._waiting -= 1
        if not admitted:
            raise self._busy()

    def _busy(self) -> InferenceBusyError:
        return InferenceBusyError(
            "the box is busy analysing other photos; try again in a few seconds",
            self.limits.retry_after_s,
        )

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


def release_memory() -> None:
    """Hand freed heap pages back to the system (glibc's malloc_trim; nothing elsewhere), so one
    50-megapixel photo does not leave the service hundreds of MB fatter for good."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # musl and macOS have no malloc_trim
        return None
    return libc


_LIBC = _glibc()
