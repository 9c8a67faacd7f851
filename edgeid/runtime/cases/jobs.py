"""An ingest in a worker thread, for the web UI: progress to poll, a stop button, the outcome.

The page polls ``IngestJob.snapshot()`` (counts only, JSON-ready) for live progress; ``stop()``
ends the run between files (it resumes on the next ingest of the same case).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Literal

from edgeid.runtime.cases.farmed import ImageFarm
from edgeid.runtime.cases.ingest import IngestOutcome, IngestProgress, IngestRequest
from edgeid.runtime.cases.media import RefusedSource
from edgeid.runtime.cases.service import CaseService
from edgeid.runtime.errors import EdgeidError, first_line
from edgeid.runtime.human_units import duration, time_left

logger = logging.getLogger(__name__)

JobState = Literal["pending", "running", "complete", "stopped", "failed"]

# Each phase as the progress page says it, and what it counts (None: nothing to count).
PHASE_WORDS: dict[str, tuple[str, str | None]] = {
    "listing": ("Opening the archive and counting its files", None),
    "reading": ("Finding faces in the files", "files"),
    "clustering": ("Grouping faces that look like the same person into clusters", None),
    "searching": ("Searching the galleries for each cluster", "clusters"),
    "done": ("Finished", None),
    "stopped": ("Stopped", None),
}
# Opens the farm a job's images go to (the lab's cluster), in the job's worker thread: joining
# the cluster takes seconds, and the farm must close when the ingest ends.
FarmOpener = Callable[[], AbstractContextManager[ImageFarm]]
MIN_RATE_SAMPLE_S = 2.0  # no rate or estimate from less than this: the first file misleads


@dataclass(frozen=True)
class Pace:
    """How the run goes, in words: the step, its rate and the time it has left."""

    step: str
    elapsed: str
    rate: str | None  # "24 files a minute"
    left: str | None  # "about 2 minutes", for the step in hand


def _done_and_total(progress: IngestProgress) -> tuple[int, int]:
    if progress.phase == "reading":
        return progress.files_seen, progress.files_total
    return progress.clusters_searched, progress.clusters


class IngestJob:
    def __init__(
        self,
        service: CaseService,
        request: IngestRequest,
        *,
        on_end: Callable[[], None] | None = None,
        farm: FarmOpener | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``on_end`` runs in the worker once the ingest is over and before ``state`` says so
        (the web UI shreds an uploaded archive there, so "complete" means "and it is gone");
        ``farm``: the images are analysed on the farm it opens (None: on this box)."""
        self._service = service
        self._farm = farm
        self._request = request
        self._on_end = on_end
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._progress = IngestProgress()
        self._monotonic = monotonic
        self._started = monotonic()
        self._phase_started = (self._progress.phase, self._started, 0)  # phase, when, done
        self._ended: float | None = None
        self._thread = threading.Thread(target=self._work, name="case-ingest", daemon=True)
        self.state: JobState = "pending"
        self.error: str | None = None
        self.outcome: IngestOutcome | None = None

    def start(self) -> IngestJob:
        self.state = "running"
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the run to stop after the file in hand (that file is read again on resume)."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the job has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def progress(self) -> IngestProgress:
        with self._lock:
            return replace(self._progress)

    def snapshot(self) -> dict[str, object]:
        return {"state": self.state, "error": self.error, **self.progress().to_json()}

    def pace(self) -> Pace:
        """The step in hand in plain words, with its rate and the time it has left."""
        with self._lock:
            progress = replace(self._progress)
            phase, since, done_then = self._phase_started
        now = self._ended if self._ended is not None else self._monotonic()
        step, unit = PHASE_WORDS.get(progress.phase, (progress.phase, None))
        rate = left = None
        done, total = _done_and_total(progress)
        spent = now - since
        running = self._ended is None  # an ended job has no rate and no time left
        if (
            running
            and unit
            and phase == progress.phase
            and spent >= MIN_RATE_SAMPLE_S
            and done > done_then
        ):
            per_s = (done - done_then) / spent
            per_min = per_s * 60
            if per_min >= 1:
                rate = f"{per_min:.0f} {unit} a minute"
            else:
                rate = f"one every {duration(1 / per_s)}"
            left = time_left(max(0, total - done) / per_s)
        return Pace(step=step, elapsed=duration(now - self._started), rate=rate, left=left)

    def _report(self, progress: IngestProgress) -> None:
        with self._lock:
            if progress.phase != self._phase_started[0]:
                done, _ = _done_and_total(progress)
                self._phase_started = (progress.phase, self._monotonic(), done)
            self._progress = replace(progress)

    def _shown(self, message: str) -> str:
        # A web upload is read from a temporary copy under the server's state folder: its
        # path means nothing to the user and tells them how the server is laid out.
        request = self._request
        label = request.source_label or request.source.name
        return message.replace(str(request.source), label)

    def _work(self) -> None:
        state: JobState
        error: str | None
        try:
            opened = self._farm() if self._farm is not None else contextlib.nullcontext()
            with opened as farm:
                outcome = self._service.ingest(
                    self._request, progress=self._report, stop=self._stop, farm=farm
                )
        except RefusedSource as exc:  # said to the uploader: without the server's path
            error, state = exc.for_upload, "failed"
        except EdgeidError as exc:
            error, state = self._shown(first_line(exc)), "failed"
        except Exception as exc:  # a worker thread must report, not vanish
            logger.error("case ingest job failed: %s", type(exc).__name__)
            error, state = f"internal error ({type(exc).__name__})", "failed"
        else:
            self.outcome, error = outcome, None
            state = "complete" if outcome.run.status == "complete" else "stopped"
        if self._on_end is not None:
            try:
                self._on_end()
            except Exception as exc:
                logger.error("case ingest clean-up failed: %s", type(exc).__name__)
        self._ended = self._monotonic()
        self.error, self.state = error, state
