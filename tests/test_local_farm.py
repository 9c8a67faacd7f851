"""The local farm's scheduling (``edgeid/runtime/cases/local_farm.py``): order, bounds, large
photos, failures, stopping. The analysis here is a stand-in the test controls (when each job
finishes); tests/test_case_farmed.py runs the real pipeline through it in a whole ingest."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from edgeid.runtime.cases.farmed import FrameJob, ImageJob, ImageResult, Job
from edgeid.runtime.cases.local_farm import JOBS_PER_STREAM, LocalFarm

WAIT_S = 10.0


class Gate:
    """Jobs wait until their key is opened; the gate records who ran and how many at once."""

    def __init__(self) -> None:
        self.opened: set[int] = set()
        self.started: list[int] = []
        self.running = 0
        self.most_at_once = 0
        self.threads: set[str] = set()
        self._cond = threading.Condition()

    def open(self, *keys: int) -> None:
        with self._cond:
            self.opened.update(keys)
            self._cond.notify_all()

    def analyse(self, job: Job) -> ImageResult:
        with self._cond:
            self.started.append(job.key)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.threads.add(threading.current_thread().name)
            assert self._cond.wait_for(lambda: job.key in self.opened, WAIT_S)
            self.running -= 1
        return ImageResult(job.key, None, job.key, 1)

    def wait_started(self, count: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while len(self.started) < count:
            assert time.monotonic() < deadline, f"only {self.started} started"
            time.sleep(0.005)


def image(key: int, size: int = 10) -> ImageJob:
    return ImageJob(key, b"x" * size)


@contextmanager
def farm(analyse: Callable[[Job], ImageResult], **options: object) -> Iterator[LocalFarm]:
    made = LocalFarm(analyse, **options)  # type: ignore[arg-type]
    try:
        yield made
    finally:
        made.close()


def in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    return thread, out


def test_results_come_back_in_submission_order_whatever_order_they_finish() -> None:
    gate = Gate()
    with farm(gate.analyse, streams=2) as local:
        assert local.submit(image(0)) == []
        assert local.submit(image(1)) == []
        gate.wait_started(2)
        assert sorted(gate.threads) == ["ingest-stream_0", "ingest-stream_1"]
        gate.open(1)  # the later job finishes first: held back until job 0 is done
        time.sleep(0.05)
        assert local.submit(image(2)) == []
        gate.open(0, 2)
        assert [r.key for r in local.drain()] == [0, 1, 2]
        assert gate.most_at_once == 2


def test_submit_blocks_once_two_jobs_per_stream_wait_or_run() -> None:
    gate = Gate()
    with farm(gate.analyse, streams=1) as local:
        for key in range(JOBS_PER_STREAM):
            assert local.submit(image(key)) == []
        thread, out = in_thread(lambda: local.submit(image(JOBS_PER_STREAM)))
        thread.join(0.2)
        assert thread.is_alive(), "a full farm took a third job without waiting"
        gate.open(0)  # the oldest is back: the blocked submit returns it
        thread.join(WAIT_S)
        assert [r.key for r in out[0]] == [0]  # type: ignore[attr-defined]
        gate.open(*range(1, JOBS_PER_STREAM + 1))
        assert [r.key for r in local.drain()] == list(range(1, JOBS_PER_STREAM + 1))
        assert gate.most_at_once == 1


def test_large_photos_take_the_large_slots_others_run_beside_them() -> None:
    gate = Gate()
    large = {0, 1}
    with farm(gate.analyse, streams=3, max_large=1, is_large=lambda j: j.key in large) as local:
        for key in range(3):
            local.submit(image(key))
        gate.wait_started(2)  # one large photo and the ordinary one; the other large waits
        time.sleep(0.1)
        assert sorted(gate.started) in ([0, 2], [1, 2])
        gate.open(0, 1, 2)
        assert [r.key for r in local.drain()] == [0, 1, 2]
        assert gate.most_at_once == 2


def test_a_failure_in_the_analysis_reaches_the_ingests_thread() -> None:
    def analyse(job: Job) -> ImageResult:
        if job.key == 1:
            raise MemoryError("the analysis ran out of memory")
        return ImageResult(job.key)

    with farm(analyse, streams=2) as local:
        local.submit(image(0))
        local.submit(image(1))
        with pytest.raises(MemoryError, match="ran out of memory"):
            local.drain()


def test_forget_drops_waiting_jobs_and_close_leaves_no_thread() -> None:
    gate = Gate()
    local = LocalFarm(gate.analyse, streams=1)
    local.submit(image(0))
    local.submit(image(1))
    gate.wait_started(1)
    thread, _ = in_thread(local.forget)  # waits for the running job only
    gate.open(0)
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert gate.started == [0]  # job 1 never ran
    assert local.drain() == []
    local.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("ingest-stream")]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (image(0, 200), image(1, 100)),  # photo bytes: 300 > 250
        (FrameJob(0, np.zeros((10, 10, 3), np.uint8)), FrameJob(1, np.zeros((5, 5, 3), np.uint8))),
    ],
    ids=["photo bytes", "frame pixels"],
)
def test_bytes_in_flight_are_bounded_too(first: Job, second: Job) -> None:
    gate = Gate()
    with farm(gate.analyse, streams=4, max_inflight_bytes=first.size + 1) as local:
        assert local.submit(first) == []
        thread, out = in_thread(lambda: local.submit(second))
        thread.join(0.2)
        assert thread.is_alive(), "the farm took more bytes than its bound without waiting"
        gate.open(0)
        thread.join(WAIT_S)
        assert [r.key for r in out[0]] == [0]  # type: ignore[attr-defined]
        gate.open(1)
        assert [r.key for r in local.drain()] == [1]


def test_a_farm_needs_a_stream() -> None:
    with pytest.raises(ValueError, match="at least one stream"):
        LocalFarm(lambda job: ImageResult(job.key), streams=0)
