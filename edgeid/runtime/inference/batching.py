"""Micro-batching: concurrent callers' items grouped into one call of a batch function.

Each caller submits one item and gets a ``Future`` for its own result. A single worker thread
takes queued items in arrival order and runs a batch when ``max_batch`` items are waiting, or
when ``max_wait`` seconds have passed since the oldest waiting item arrived, whichever is first.
If the batch function raises, the batch is rerun item by item so that only the offending item's
caller sees the exception. The queue is bounded: a full queue refuses new work with
``OverloadedError`` rather than letting memory and latency grow without limit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, TypeVar

from edgeid.runtime.errors import EdgeidError, OverloadedError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Sizes for a 2-core CPU box: one batched ResNet chip costs ~10 ms there, so 16 items is ~0.15 s
# of work, 5 ms of waiting is small next to one item's inference, and 256 queued items (a few
# seconds of work) is as long as a caller should wait before being told to retry.
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_WAIT_S = 0.005
DEFAULT_MAX_QUEUE = 256
# The worker re-reads the clock at least this often while a batch fills, so an injected clock
# that jumps forward (tests) is honoured without a notification; with time.monotonic the exact
# deadline is waited for and this cap only adds a few wake-ups to waits longer than it.
CLOCK_POLL_S = 0.05

BatchFunction = Callable[[list[T]], Sequence[R]]


class BatcherClosedError(OverloadedError):
    """The batcher is closed (the service is shutting down); callers may retry elsewhere."""


@dataclass(frozen=True)
class BatcherStats:
    """Counters for health telemetry, read as one consistent snapshot."""

    batches_run: int  # calls of the batch function, item-by-item reruns included
    items_processed: int  # items whose future got a result or an exception from the function
    items_failed: int  # of those, the ones that got an exception
    largest_batch: int
    queue_depth: int  # items waiting now, not yet taken by the worker
    rejected: int  # submissions refused because the queue was full


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: Future[R]
    arrived: float


class MicroBatcher(Generic[T, R]):
    """Groups concurrently submitted items into calls of ``process_batch``.

    ``process_batch`` gets a non-empty list of items and must return one result per item, in
    the same order. It always runs on the batcher's single worker thread, so it need not be
    thread-safe. An exception raised for an item reaches its caller unchanged, typed edgeid
    errors and others alike; the others are logged too, as they mean a bug. ``clock`` returns
    seconds (``time.monotonic`` by default; tests inject one).
    """

    def __init__(
        self,
        process_batch: BatchFunction[T, R],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait: float = DEFAULT_MAX_WAIT_S,
        max_queue: int = DEFAULT_MAX_QUEUE,
        name: str = "micro-batcher",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must not be negative, got {max_wait}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self._process_batch = process_batch
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.name = name
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: deque[_Pending[T, R]] = deque()
        self._closing = False
        self._batches_run = 0
        self._items_processed = 0
        self._items_failed = 0
        self._largest_batch = 0
        self._rejected = 0
        # Daemon, so a batcher someone forgot to close cannot keep the process alive.
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    # Callers.

    def submit(self, item: T) -> Future[R]:
        """Queue one item; its future resolves with that item's result or exception."""
        return self.submit_many([item])[0]

    def submit_many(self, items: Sequence[T]) -> list[Future[R]]:
        """Queue several items at once, all or none (so one request is never half-queued).

        They stay adjacent in the queue, so they usually share a batch.
        """
        futures: list[Future[R]] = [Future() for _ in items]
        with self._cond:
            if self._closing:
                raise BatcherClosedError(f"{self.name} is closed; no new requests are accepted")
            if len(self._queue) + len(items) > self.max_queue:
                self._rejected += len(items)
                raise OverloadedError(
                    f"{self.name} is overloaded ({len(self._queue)} requests waiting, limit "
                    f"{self.max_queue}); retry shortly"
                )
            now = self._clock()
            self._queue.extend(
                _Pending(item, future, now) for item, future in zip(items, futures, strict=True)
            )
            self._cond.notify_all()
        return futures

    def process(self, item: T, timeout: float | None = None) -> R:
        """Submit and wait: the item's result, or its exception re-raised.

        Raises ``OverloadedError`` when the queue is full or no result came within ``timeout``
        seconds (the item is then withdrawn if it has not started).
        """
        future = self.submit(item)
        done, _ = wait([future], timeout=timeout)
        if not done:
            future.cancel()
            raise OverloadedError(f"{self.name} gave no result within {timeout} s; retry shortly")
        return future.result()

    def stats(self) -> BatcherStats:
        with self._cond:
            return BatcherStats(
                batches_run=self._batches_run,
                items_processed=self._items_processed,
                items_failed=self._items_failed,
                largest_batch=self._largest_batch,
                queue_depth=len(self._queue),
                rejected=self._rejected,
            )

    # Lifecycle.

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting items, then finish: run what is queued (``drain``) or fail it.

        Failed items get ``BatcherClosedError``. Waits up to ``timeout`` seconds for the worker;
        items still queued after that are failed too, so no caller is left waiting for ever.
        Calling it again is harmless.
        """
        with self._cond:
            self._closing = True
            dropped = [] if drain else self._take_all()
            self._cond.notify_all()
        self._fail(dropped, f"{self.name} closed before this request ran")
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)
        if self._worker.is_alive():
            with self._cond:
                stranded = self._take_all()
            if stranded:
                logger.warning(
                    "%s: worker still busy after %s s at close; failing %s queued items",
                    self.name,
                    timeout,
                    len(stranded),
                )
            self._fail(stranded, f"{self.name} closed before this request ran")

    def __enter__(self) -> MicroBatcher[T, R]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # Worker.

    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                # A caller may have cancelled while queued; those are skipped, never run.
                live = [p for p in batch if p.future.set_running_or_notify_cancel()]
                if live:
                    try:
                        self._execute(live)
                    except BaseException:
                        for pending in live:
                            if not pending.future.done():
                                pending.future.set_exception(
                                    BatcherClosedError(f"{self.name} stopped unexpectedly")
                                )
                        raise
        finally:
            # After a normal close the queue is empty; after an escaped BaseException it may not
            # be, and no caller may be left on a future nobody will resolve.
            with self._cond:
                self._closing = True
                stranded = self._take_all()
            self._fail(stranded, f"{self.name} stopped unexpectedly")

    def _next_batch(self) -> list[_Pending[T, R]] | None:
        """The next items to run, or None once closed and empty."""
        with self._cond:
            while True:
                while not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                deadline = self._queue[0].arrived + self.max_wait
                while self._queue and len(self._queue) < self.max_batch and not self._closing:
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        break
                    self._cond.wait(min(remaining, CLOCK_POLL_S))
                if self._queue:  # close(drain=False) may have emptied it meanwhile
                    take = min(self.max_batch, len(self._queue))
                    return [self._queue.popleft() for _ in range(take)]

    def _execute(self, batch: list[_Pending[T, R]]) -> None:
        try:
            results = self._call([p.item for p in batch])
        except Exception as exc:
            if len(batch) == 1:
                self._resolve_failure(batch[0], exc)
                return
            logger.warning(
                "%s: batch of %s items failed (%s: %s); retrying item by item",
                self.name,
                len(batch),
                type(exc).__name__,
                exc,
            )
            for pending in batch:
                self._execute([pending])
            return
        with self._cond:
            self._items_processed += len(batch)
        for pending, result in zip(batch, results, strict=True):
            pending.future.set_result(result)

    def _call(self, items: list[T]) -> Sequence[R]:
        with self._cond:
            self._batches_run += 1
            self._largest_batch = max(self._largest_batch, len(items))
        logger.debug("%s: running a batch of %s", self.name, len(items))
        results = self._process_batch(items)
        if len(results) != len(items):
            # A bug in the batch function, not in any one item; every caller must hear of it.
            raise RuntimeError(
                f"{self.name}: batch function returned {len(results)} results for "
                f"{len(items)} items"
            )
        return results

    def _resolve_failure(self, pending: _Pending[T, R], exc: Exception) -> None:
        if not isinstance(exc, EdgeidError):
            # Typed errors are the caller's business; anything else is unexpected here.
            logger.error("%s: item failed with an unexpected error", self.name, exc_info=exc)
        with self._cond:
            self._items_processed += 1
            self._items_failed += 1
        pending.future.set_exception(exc)

    def _take_all(self) -> list[_Pending[T, R]]:
        """Empty the queue; the caller holds the lock."""
        taken = list(self._queue)
        self._queue.clear()
        return taken

    @staticmethod
    def _fail(pendings: list[_Pending[T, R]], message: str) -> None:
        for pending in pendings:
            if pending.future.set_running_or_notify_cancel():
                pending.future.set_exception(BatcherClosedError(message))
