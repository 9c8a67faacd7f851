"""The last scrub's counts, for health telemetry: how many sealed objects were checked and how
many were damaged, and when. Counts only; which object is damaged stays in the service's log
(by id) and in `edgeid scrub`'s own report."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class ScrubFigures:
    objects_checked: int
    damaged: int
    finished_at: float  # Unix time


class IntegrityStatus:
    """Written by the scrub schedule, read by the telemetry agent (thread-safe)."""

    def __init__(self) -> None:
        self._last: ScrubFigures | None = None
        self._lock = threading.Lock()

    def record(self, figures: ScrubFigures) -> None:
        with self._lock:
            self._last = figures

    def last(self) -> ScrubFigures | None:
        with self._lock:
            return self._last


INTEGRITY = IntegrityStatus()  # the service's one status, as SERVICE_METRICS is
