"""The embedder shared by concurrent callers: their chips are stacked into one ONNX Runtime call.

Every chip is one item of a ``MicroBatcher``, so ``max_batch`` bounds the chips (and so the
memory) of one inference call however many faces each request carries. A request's chips are
queued together and come back as one array, rows in the order given.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError, wait
from types import TracebackType

import numpy as np

from edgeid.runtime.errors import BadInputError, OverloadedError
from edgeid.runtime.inference.batching import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_WAIT_S,
    BatcherStats,
    MicroBatcher,
)
from edgeid.runtime.inference.embedder import Embedder
from edgeid.runtime.inference.types import FloatArray, RGBImage

# One HTTP request waits at most this long for its embeddings before being told to retry.
DEFAULT_TIMEOUT_S = 30.0


class BatchedEmbedder:
    """Thread-safe front of an ``Embedder``; results equal ``Embedder.embed`` on the same chips."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_wait: float = DEFAULT_MAX_WAIT_S,
        max_queue: int = DEFAULT_MAX_QUEUE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._embedder = embedder
        self.chip_size = embedder.chip_size
        self.model_id = embedder.model_id
        self._batcher: MicroBatcher[RGBImage, FloatArray] = MicroBatcher(
            self._embed_batch,
            max_batch=max_batch,
            max_wait=max_wait,
            max_queue=max_queue,
            name=f"embedder-{embedder.model_id}",
            clock=clock,
        )

    def submit(self, chips: Sequence[RGBImage]) -> Future[FloatArray]:
        """Queue one image's chips; the future gives (len(chips), dim), unit-length rows.

        Raises ``BadInputError`` at once for a malformed chip (nothing of the request is queued)
        and ``OverloadedError`` when the queue cannot take all of the request's chips.
        """
        checked = [self._checked(chip, index) for index, chip in enumerate(chips)]
        if not checked:
            done: Future[FloatArray] = Future()
            done.set_result(self._embedder.embed([]))
            return done
        return _gather(self._batcher.submit_many(checked))

    def submit_one(self, chip: RGBImage) -> Future[FloatArray]:
        """Queue one chip; the future gives its embedding as a 1-d vector."""
        return self._batcher.submit(self._checked(chip, 0))

    def embed(
        self, chips: Sequence[RGBImage], timeout: float | None = DEFAULT_TIMEOUT_S
    ) -> FloatArray:
        """Blocking ``submit``: drop-in for ``Embedder.embed`` from any thread."""
        return _wait(self.submit(chips), timeout)

    def embed_one(self, chip: RGBImage, timeout: float | None = DEFAULT_TIMEOUT_S) -> FloatArray:
        return _wait(self.submit_one(chip), timeout)

    def stats(self) -> BatcherStats:
        """Counted in chips: ``largest_batch`` is the most chips in one inference call."""
        return self._batcher.stats()

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        self._batcher.close(drain=drain, timeout=timeout)

    def __enter__(self) -> BatchedEmbedder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _checked(self, chip: RGBImage, index: int) -> RGBImage:
        expected = (self.chip_size, self.chip_size, 3)
        if not isinstance(chip, np.ndarray) or chip.dtype != np.uint8 or chip.shape != expected:
            got = (
                f"{chip.dtype} {chip.shape}"
                if isinstance(chip, np.ndarray)
                else type(chip).__name__
            )
            raise BadInputError(
                f"face chip {index}: expected uint8 {expected} aligned RGB pixels, got {got}"
            )
        # A copy: the chip waits in the queue, and the caller may reuse its buffer meanwhile.
        return np.array(chip, dtype=np.uint8, order="C", copy=True)

    def _embed_batch(self, chips: list[RGBImage]) -> list[FloatArray]:
        # Rows copied, so no caller's vector keeps the whole batch's array alive.
        return [row.copy() for row in self._embedder.embed(chips)]


def _wait(future: Future[FloatArray], timeout: float | None) -> FloatArray:
    done, _ = wait([future], timeout=timeout)
    if not done:
        future.cancel()
        raise OverloadedError(f"no embeddings within {timeout} s; retry shortly")
    return future.result()


def _gather(parts: list[Future[FloatArray]]) -> Future[FloatArray]:
    """One future for a request's chips: their rows stacked in order, or the first failure.

    Cancelling it withdraws the chips still queued.
    """
    whole: Future[FloatArray] = Future()
    lock = threading.Lock()
    remaining = [len(parts)]

    def settle(outcome: FloatArray | BaseException) -> None:
        try:
            if isinstance(outcome, BaseException):
                whole.set_exception(outcome)
            else:
                whole.set_result(outcome)
        except InvalidStateError:
            pass  # the caller cancelled meanwhile; nobody is waiting for this outcome

    def part_done(part: Future[FloatArray]) -> None:
        outcome: FloatArray | BaseException
        with lock:
            if whole.done():
                return
            if part.cancelled():
                outcome = OverloadedError("embedding request withdrawn before it ran")
            elif (error := part.exception()) is not None:
                outcome = error
            else:
                remaining[0] -= 1
                if remaining[0]:
                    return
                outcome = np.stack([p.result() for p in parts])
            settle(outcome)
        if isinstance(outcome, BaseException):
            # Outside the lock: cancelling runs part_done again for each part, synchronously.
            for other in parts:
                other.cancel()  # the rest is wasted work now; skip what is still queued

    def whole_done(future: Future[FloatArray]) -> None:
        if future.cancelled():
            for part in parts:
                part.cancel()

    for part in parts:
        part.add_done_callback(part_done)
    whole.add_done_callback(whole_done)
    return whole
