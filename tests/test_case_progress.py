"""The progress page's words (edgeid/runtime/cases/jobs.py ``IngestJob.pace``) and the units
every page shows (edgeid/runtime/human_units.py): the step in plain words, its rate and the
time it has left, measured on a job whose ingest reports progress on a clock the test moves."""

from __future__ import annotations

from pathlib import Path
from threading import Event

from edgeid.runtime.cases.farmed import ImageFarm
from edgeid.runtime.cases.ingest import (
    IngestProgress,
    IngestRequest,
    ProgressCallback,
    Requester,
)
from edgeid.runtime.cases.jobs import IngestJob
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.human_units import duration, size, time_left


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class SteppedIngest:
    """An ingest that lists, then reads 10 of 30 files in a minute, then waits to be released."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.reading, self.release = Event(), Event()

    def ingest(
        self,
        request: IngestRequest,
        *,
        progress: ProgressCallback,
        stop: Event,
        farm: ImageFarm | None = None,
    ) -> None:
        progress(IngestProgress(phase="listing"))
        self.clock.now += 3
        progress(IngestProgress(phase="reading", files_total=30, files_seen=0))
        self.clock.now += 60
        progress(IngestProgress(phase="reading", files_total=30, files_seen=10))
        self.reading.set()
        self.release.wait(30)
        raise BadInputError("stopped by the test")


def test_the_progress_says_the_step_its_rate_and_the_time_left_in_words() -> None:
    clock = Clock()
    ingest = SteppedIngest(clock)
    request = IngestRequest(Path("/nonexistent"), "CASE-1", "a reason long enough", Requester("u"))
    job = IngestJob(ingest, request, monotonic=clock)  # type: ignore[arg-type]
    job.start()
    try:
        assert ingest.reading.wait(30)
        pace = job.pace()
        assert pace.step == "Finding faces in the files"
        assert pace.rate == "10 files a minute"
        assert pace.left == "about 2 minutes"  # 20 files left
        assert pace.elapsed == "1 minute 3 seconds"  # listing included
    finally:
        ingest.release.set()
        assert job.wait(30)
    clock.now += 600
    assert job.pace().elapsed == "1 minute 3 seconds"  # an ended job's time stops with it
    assert job.pace().rate is None and job.pace().left is None  # ended: nothing left


def test_durations_and_sizes_read_as_a_person_says_them() -> None:
    assert duration(0.4) == "0 seconds"
    assert duration(45) == "45 seconds"
    assert duration(185) == "3 minutes 5 seconds"
    assert duration(2 * 3600 + 10 * 60 + 7) == "2 hours 10 minutes"
    assert duration(3 * 86400 + 3600 + 59) == "3 days 1 hour"
    assert duration(86400 + 30) == "1 day"
    assert time_left(20) == "less than a minute"
    assert time_left(150) == "about 2 minutes"  # rounded to the minute (banker's: 2.5 -> 2)
    assert time_left(3 * 3600 + 29 * 60) == "about 3 hours 29 minutes"
    assert size(512) == "512 bytes"
    assert size(388_000_000) == "388 MB"
    assert size(25.3e9) == "25.3 GB"
