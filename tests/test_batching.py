"""Micro-batching with real threads, and the batched embedder against the plain one.

Nothing here sleeps or times anything: batches are made deterministic with a frozen injected
clock (a partial batch then runs only when the test advances the clock or closes the batcher)
or by holding the worker inside the batch function until every caller has queued.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from edgeid.runtime.errors import BadInputError, EdgeidError, OverloadedError
from edgeid.runtime.inference.batched_embedder import BatchedEmbedder
from edgeid.runtime.inference.batching import BatcherClosedError, MicroBatcher
from edgeid.runtime.inference.embedder import Embedder
from edgeid.runtime.inference.image_decode import load_image
from edgeid.runtime.inference.manifest import read_verified_model
from edgeid.runtime.inference.onnx_backend import create_cpu_session
from edgeid.runtime.inference.types import FloatArray, RGBImage

# Hang guard only: a broken batcher fails the test instead of hanging it. No test measures time.
WAIT_S = 60.0
CALLERS = 16
# Batched and single-call ONNX Runtime results may differ in float rounding, not more.
EMBEDDING_TOLERANCE = 1e-5
CHIP = 150
# LFW images are 250x250 with the face centred; the central 150x150 region is a usable chip.
LFW_CROP = slice(50, 200)

V = TypeVar("V")


class FrozenClock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    """A batch function doubling its items, recording every batch it was given."""

    def __init__(self, poison: int | None = None, error: Exception | None = None) -> None:
        self.batches: list[list[int]] = []
        self.poison = poison
        self.error = error or BadInputError("poisoned item")
        self.lock = threading.Lock()

    def __call__(self, items: list[int]) -> list[int]:
        with self.lock:
            self.batches.append(list(items))
        if self.poison is not None and self.poison in items:
            raise self.error
        return [item * 2 for item in items]

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


def run_concurrently(calls: Sequence[Callable[[], V]]) -> list[Future[V]]:
    """Start every call on its own thread, released together by a barrier."""
    barrier = threading.Barrier(len(calls))

    def released(call: Callable[[], V]) -> V:
        barrier.wait(WAIT_S)
        return call()

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(released, call) for call in calls]
        for future in futures:
            future.exception(WAIT_S)  # wait for all, whatever their outcome
    return futures


# MicroBatcher.


def test_concurrent_callers_get_their_own_results_in_shared_batches() -> None:
    all_queued = threading.Event()
    recorder = Recorder()

    def held(items: list[int]) -> list[int]:
        # The first batch holds the worker until every caller has queued, so the rest of the
        # callers must share batches.
        assert all_queued.wait(WAIT_S)
        return recorder(items)

    max_batch = 5
    with MicroBatcher(held, max_batch=max_batch, max_wait=0.0) as batcher:
        submitted = threading.Barrier(CALLERS + 1)

        def caller(i: int) -> Callable[[], int]:
            def call() -> int:
                future = batcher.submit(i)
                submitted.wait(WAIT_S)
                return future.result(WAIT_S)

            return call

        with ThreadPoolExecutor(max_workers=CALLERS) as pool:
            futures = [pool.submit(caller(i)) for i in range(CALLERS)]
            submitted.wait(WAIT_S)
            all_queued.set()
            results = [f.result(WAIT_S) for f in futures]

    assert results == [2 * i for i in range(CALLERS)]
    assert sorted(i for batch in recorder.batches for i in batch) == list(range(CALLERS))
    assert max(recorder.sizes) > 1
    assert max(recorder.sizes) <= max_batch
    stats = batcher.stats()
    assert stats.items_processed == CALLERS
    assert stats.largest_batch == max(recorder.sizes)
    assert stats.batches_run == len(recorder.batches)
    assert stats.queue_depth == 0


def test_full_batches_run_without_waiting_and_never_exceed_max_batch() -> None:
    recorder = Recorder()
    clock = FrozenClock()  # frozen: only a full batch (or close) can start a run
    batcher = MicroBatcher(recorder, max_batch=7, max_wait=1.0, clock=clock)
    futures = batcher.submit_many(list(range(50)))
    assert [f.result(WAIT_S) for f in futures[:49]] == [2 * i for i in range(49)]
    assert not futures[49].done()  # the clock is frozen, so a lone item cannot have run
    batcher.close()
    assert futures[49].result(WAIT_S) == 98
    assert recorder.sizes == [7] * 7 + [1]
    assert [i for batch in recorder.batches for i in batch] == list(range(50))


def test_max_wait_counts_from_the_first_item_of_a_batch() -> None:
    recorder = Recorder()
    clock = FrozenClock()
    with MicroBatcher(recorder, max_batch=10, max_wait=5.0, clock=clock) as batcher:
        first = batcher.submit(1)
        clock.advance(4.0)
        second = batcher.submit(2)  # arrives before the first item's deadline: same batch
        clock.advance(1.0)  # the first item's deadline, though only 1 s after the second's arrival
        assert (first.result(WAIT_S), second.result(WAIT_S)) == (2, 4)
        assert recorder.batches == [[1, 2]]

        third = batcher.submit(3)
        clock.advance(5.0)
        assert third.result(WAIT_S) == 6
        assert recorder.batches == [[1, 2], [3]]


def test_one_poisoned_item_fails_only_its_own_caller() -> None:
    recorder = Recorder(poison=13)
    clock = FrozenClock()
    with MicroBatcher(recorder, max_batch=CALLERS, max_wait=1.0, clock=clock) as batcher:
        futures = [
            f.result()
            for f in run_concurrently([lambda i=i: batcher.submit(i) for i in range(CALLERS)])
        ]
        for i, future in enumerate(futures):
            if i == 13:
                # The typed error reaches the caller unchanged.
                assert future.exception(WAIT_S) is recorder.error
            else:
                assert future.result(WAIT_S) == 2 * i
    # One batch of all, then each item alone so the failure is pinned on its item.
    assert recorder.sizes == [CALLERS] + [1] * CALLERS
    stats = batcher.stats()
    assert (stats.items_processed, stats.items_failed) == (CALLERS, 1)
    assert stats.batches_run == CALLERS + 1


def test_an_unexpected_error_also_stays_with_its_item() -> None:
    recorder = Recorder(poison=3, error=ValueError("broken item"))
    with MicroBatcher(recorder, max_batch=4, max_wait=1.0, clock=FrozenClock()) as batcher:
        futures = batcher.submit_many([1, 2, 3, 4])
        assert [f.result(WAIT_S) for f in futures if f is not futures[2]] == [2, 4, 8]
        with pytest.raises(ValueError, match="broken item"):
            futures[2].result(WAIT_S)


def test_a_batch_function_returning_the_wrong_count_fails_every_item() -> None:
    def lossy(items: list[int]) -> list[int]:
        return items[1:]

    with MicroBatcher(lossy, max_batch=2, max_wait=1.0, clock=FrozenClock()) as batcher:
        futures = batcher.submit_many([1, 2])
        for future in futures:
            with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
                future.result(WAIT_S)


def test_a_full_queue_refuses_with_overloaded_error() -> None:
    recorder = Recorder()
    # Frozen clock and a batch that never fills: the worker takes nothing, the queue stays full.
    batcher = MicroBatcher(recorder, max_batch=10, max_wait=1.0, max_queue=3, clock=FrozenClock())
    queued = [batcher.submit(i) for i in range(3)]
    with pytest.raises(OverloadedError, match="overloaded"):
        batcher.submit(3)
    stats = batcher.stats()
    assert (stats.queue_depth, stats.rejected) == (3, 1)
    batcher.close()
    assert [f.result(WAIT_S) for f in queued] == [0, 2, 4]


def test_a_request_is_queued_whole_or_not_at_all() -> None:
    batcher = MicroBatcher(Recorder(), max_batch=10, max_wait=1.0, max_queue=3, clock=FrozenClock())
    batcher.submit(0)
    with pytest.raises(OverloadedError):
        batcher.submit_many([1, 2, 3])
    assert batcher.stats().queue_depth == 1
    batcher.close()


def test_close_runs_every_pending_item() -> None:
    recorder = Recorder()
    batcher = MicroBatcher(recorder, max_batch=100, max_wait=1.0, clock=FrozenClock())
    futures = batcher.submit_many(list(range(5)))
    batcher.close()
    assert [f.result(0) for f in futures] == [0, 2, 4, 6, 8]  # done once close returns
    assert recorder.batches == [[0, 1, 2, 3, 4]]
    with pytest.raises(BatcherClosedError, match="closed"):
        batcher.submit(5)
    batcher.close()  # a second close is harmless


def test_close_without_drain_fails_every_pending_item() -> None:
    recorder = Recorder()
    batcher = MicroBatcher(recorder, max_batch=100, max_wait=1.0, clock=FrozenClock())
    futures = batcher.submit_many(list(range(5)))
    batcher.close(drain=False)
    for future in futures:
        error = future.exception(0)
        assert isinstance(error, BatcherClosedError)
        assert isinstance(error, OverloadedError)  # callers told to retry, as for a full queue
    assert recorder.batches == []


def test_close_of_a_busy_worker_fails_what_is_still_queued() -> None:
    release = threading.Event()
    started = threading.Event()

    def stuck(items: list[int]) -> list[int]:
        started.set()
        assert release.wait(WAIT_S)
        return items

    batcher = MicroBatcher(stuck, max_batch=1, max_wait=0.0)
    running = batcher.submit(1)
    assert started.wait(WAIT_S)
    queued = batcher.submit(2)
    batcher.close(timeout=0)
    assert isinstance(queued.exception(0), BatcherClosedError)
    release.set()
    assert running.result(WAIT_S) == 1


def test_process_blocks_for_the_result_and_times_out_as_overloaded() -> None:
    recorder = Recorder()
    with MicroBatcher(recorder, max_batch=1, max_wait=1.0) as batcher:
        assert batcher.process(21, timeout=WAIT_S) == 42
    clock = FrozenClock()
    with (
        MicroBatcher(recorder, max_batch=10, max_wait=1.0, clock=clock) as batcher,
        pytest.raises(OverloadedError, match="no result"),
    ):
        batcher.process(5, timeout=0)
    # The timed-out item was withdrawn before it ran.
    assert recorder.batches == [[21]]
    assert batcher.stats().items_processed == 0


def test_invalid_settings_are_refused() -> None:
    for kwargs in ({"max_batch": 0}, {"max_wait": -1.0}, {"max_queue": 0}):
        with pytest.raises(ValueError):
            MicroBatcher(Recorder(), **kwargs)  # type: ignore[arg-type]


# BatchedEmbedder.


@pytest.fixture(scope="module")
def embedder(models_dir: Path) -> Embedder:
    _, data = read_verified_model(models_dir, "dlib_resnet_v1")
    return Embedder(create_cpu_session(data), "dlib_resnet_v1")


@pytest.fixture(scope="module")
def chips(lfw_dir: Path) -> list[RGBImage]:
    paths = sorted((lfw_dir / "images").glob("*/*.jpg"))[:12]
    assert len(paths) == 12, f"too few LFW images under {lfw_dir}"
    out = [np.ascontiguousarray(load_image(p)[LFW_CROP, LFW_CROP]) for p in paths]
    assert all(c.shape == (CHIP, CHIP, 3) for c in out)
    return out


def requests_of(chips: list[RGBImage]) -> list[list[RGBImage]]:
    """Requests of one to three chips, as images with one or several faces would make."""
    sizes = [1, 3, 2, 1, 1, 2, 1, 1]
    assert sum(sizes) == len(chips)
    bounds = itertools.accumulate(sizes, initial=0)
    return [chips[a:b] for a, b in itertools.pairwise(bounds)]


def test_batched_embedder_matches_the_embedder_across_concurrent_callers(
    embedder: Embedder, chips: list[RGBImage]
) -> None:
    requests = requests_of(chips)
    expected = [embedder.embed(request) for request in requests]
    # Frozen clock and max_batch = every chip: one ONNX Runtime call, once all callers queued.
    with BatchedEmbedder(embedder, max_batch=len(chips), max_wait=1.0, clock=FrozenClock()) as be:
        calls: list[Callable[[], FloatArray]] = [
            (lambda r=r: be.embed(r, timeout=WAIT_S))
            if len(r) > 1
            else (lambda r=r: be.embed_one(r[0], timeout=WAIT_S)[np.newaxis])
            for r in requests
        ]
        results = [f.result() for f in run_concurrently(calls)]
        stats = be.stats()
    assert (stats.batches_run, stats.largest_batch, stats.items_processed) == (
        1,
        len(chips),
        len(chips),
    )
    for got, want in zip(results, expected, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=EMBEDDING_TOLERANCE)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((CHIP - 1, CHIP, 3), np.uint8),
        np.zeros((CHIP, CHIP), np.uint8),
        np.zeros((CHIP, CHIP, 3), np.float32),
    ],
    ids=["wrong-shape", "grey", "float"],
)
def test_a_malformed_chip_fails_only_its_caller(
    embedder: Embedder, chips: list[RGBImage], bad: Any
) -> None:
    good = chips[:6]
    expected = embedder.embed(good)
    with BatchedEmbedder(embedder, max_batch=len(good), max_wait=1.0, clock=FrozenClock()) as be:
        calls: list[Callable[[], FloatArray]] = [
            lambda c=c: be.embed_one(c, timeout=WAIT_S) for c in good
        ]
        calls.insert(3, lambda: be.embed([good[0], bad], timeout=WAIT_S))
        futures = run_concurrently(calls)
    with pytest.raises(BadInputError, match="face chip 1"):
        futures.pop(3).result()
    got = np.stack([f.result() for f in futures])
    np.testing.assert_allclose(got, expected, rtol=0, atol=EMBEDDING_TOLERANCE)


def test_an_inference_failure_fails_only_the_request_it_belongs_to() -> None:
    """A session that rejects one particular chip: only the request holding it fails."""

    class Input:
        name = "chips"
        shape = ("batch", CHIP, CHIP, 3)

    class PickySession:
        def get_inputs(self) -> list[Input]:
            return [Input()]

        def run(self, _outputs: None, feeds: dict[str, Any]) -> list[Any]:
            batch = feeds["chips"]
            if (batch == 7).all(axis=(1, 2, 3)).any():
                raise EdgeidError("inference refused chip 7")
            return [batch.reshape(len(batch), -1)[:, :4].astype(np.float32) + 1]

    fake = Embedder(PickySession(), "fake")  # type: ignore[arg-type]
    chip = [np.full((CHIP, CHIP, 3), v, np.uint8) for v in range(10)]
    with BatchedEmbedder(fake, max_batch=8, max_wait=1.0, clock=FrozenClock()) as be:
        ok_before = be.submit([chip[1], chip[2]])
        poisoned = be.submit([chip[3], chip[7], chip[4]])
        ok_after = be.submit([chip[5], chip[6], chip[8]])  # 8 chips: the batch is full
        with pytest.raises(EdgeidError, match="chip 7"):
            poisoned.result(WAIT_S)
        for future, values in ((ok_before, [1, 2]), (ok_after, [5, 6, 8])):
            got = future.result(WAIT_S)
            want = np.array([[v + 1] * 4 for v in values], np.float32)
            np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True))
    assert be.stats().items_failed == 1
