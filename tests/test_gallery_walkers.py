"""The walker threads that walk an index's other graphs beside the searching thread."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from edgeid.runtime.gallery import walkers


class Graph:
    """A stand-in for an hnswlib graph: answers or raises, and notes the walking thread."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.walked_on: list[str] = []

    def knn_query(self, query: Any, k: int, num_threads: int) -> tuple[Any, Any]:
        self.walked_on.append(threading.current_thread().name)
        if self.error is not None:
            raise self.error
        return np.arange(k)[None, :], np.full((1, k), 0.5, dtype=np.float32)


def test_a_walk_runs_on_a_walker_thread_and_its_error_reaches_the_searcher() -> None:
    """A walk that raises (hnswlib's RuntimeError when deletes cut a graph's reach) must raise
    in the searching thread, where the index falls back to exact scoring, and must not cost
    the walker thread: the next walk is still served."""
    query = np.zeros(4, dtype=np.float32)
    failing = Graph(RuntimeError("contiguous 2D array of 3 elements"))
    walk = walkers.hand_over(failing, query, 3)
    walk.wait()
    with pytest.raises(RuntimeError, match="contiguous"):
        walk.result()
    answering = Graph()
    labels, distances = walkers.hand_over(answering, query, 3).result()
    assert labels.tolist() == [0, 1, 2] and distances.tolist() == [0.5] * 3
    walked_on = failing.walked_on + answering.walked_on
    assert all(name.startswith(walkers.THREAD_NAME) for name in walked_on)
    assert threading.current_thread().name not in walked_on


def test_many_walks_at_once_all_end_with_their_own_answers() -> None:
    """Several searching threads share the walkers; each waits for its own walk only."""
    query = np.zeros(4, dtype=np.float32)
    walks = [walkers.hand_over(Graph(), query, k) for k in range(1, 40)]
    for k, walk in enumerate(walks, start=1):
        assert len(walk.result()[0]) == k
