"""The service scrubs its own sealed files on a schedule (weekly by default), so damage is
found before someone needs the data: the counts go to health telemetry, the damaged objects'
ids to the service log with the repair command. Writes are held off while it reads, so a
frame being appended is never mistaken for damage; a case ingest in progress postpones it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edgeid.runtime.gallery.service import GalleryService
from edgeid.runtime.services.scrub import Checked, scrub
from edgeid.runtime.system.integrity import IntegrityStatus, ScrubFigures

logger = logging.getLogger(__name__)

BUSY_RETRY_S = 600.0  # an ingest holds the box: look again in ten minutes


class ScrubSchedule:
    """``start`` runs a scrub ``first_after_s`` after the service starts, then every
    ``interval_s``; ``run_once`` is one scrub now (what the thread does)."""

    def __init__(
        self,
        home: Path,
        galleries: GalleryService,
        status: IntegrityStatus,
        *,
        interval_s: float,
        first_after_s: float,
        busy: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.home = home
        self.galleries = galleries
        self.status = status
        self.interval_s = interval_s
        self.first_after_s = first_after_s
        self.busy = busy
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> list[Checked]:
        with self.galleries.exclusive():  # no write lands mid-read
            checked = scrub(self.home, self.galleries.store)
        damaged = [c for c in checked if not c.ok]
        self.status.record(ScrubFigures(len(checked), len(damaged), self._clock()))
        for item in damaged:
            logger.warning("scrub: %s %s is damaged: %s", item.kind, item.name, item.problem)
        logger.info("scrub: %d sealed objects checked, %d damaged", len(checked), len(damaged))
        return checked

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="scrub", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        wait = self.first_after_s
        while not self._stop.wait(wait):
            if self.busy():
                wait = BUSY_RETRY_S
                continue
            try:
                self.run_once()
            except Exception:  # a failed scrub must not take the service down; try next time
                logger.exception("scrub failed")
            wait = self.interval_s
