"""Threads that walk an index's other graphs while the searching thread walks its first.

hnswlib's ``knn_query`` releases the GIL, so a walk handed to another thread runs on another
core. The hand-over is on the search's critical path twice (the walker waking up, then the
searcher waking when it is done), so it is kept to C-level primitives: a ``SimpleQueue`` and
one plain lock per walk, not a ``concurrent.futures.Future`` and its Python-level
``Condition`` (``python -m benchmarks.search_overhead`` times both hand-overs).

The threads are shared by every index of the process and started on first use, one per core.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeid.runtime.inference.types import FloatArray

Labels = npt.NDArray[np.int64]

THREAD_NAME = "index-walk"


class Walk:
    """One graph's ``knn_query`` handed to a walker thread; ``result()`` waits for it."""

    __slots__ = ("_done", "_error", "_found", "_graph", "_k", "_query")

    def __init__(self, graph: Any, query: FloatArray, k: int) -> None:
        self._graph = graph
        self._query = query
        self._k = k
        self._found: tuple[Labels, FloatArray] | None = None
        self._error: BaseException | None = None
        self._done = threading.Lock()
        self._done.acquire()  # released by the walker when the walk has ended

    def run(self) -> None:
        try:
            self._found = knn(self._graph, self._query, self._k)
        except BaseException as exc:
            self._error = exc
        finally:
            self._done.release()

    def wait(self) -> None:
        """Block until the walk has ended (raised or not)."""
        with self._done:
            pass

    def result(self) -> tuple[Labels, FloatArray]:
        """The walk's labels and distances; re-raises what the walk raised."""
        self.wait()
        if self._error is not None:
            raise self._error
        assert self._found is not None
        return self._found


def knn(graph: Any, query: FloatArray, k: int) -> tuple[Labels, FloatArray]:
    """One query's ``k`` nearest labels in ``graph`` and their distances, on this thread."""
    labels, distances = graph.knn_query(query, k=k, num_threads=1)
    return labels[0], distances[0]


_jobs: queue.SimpleQueue[Walk] = queue.SimpleQueue()
_threads: list[threading.Thread] = []
_threads_lock = threading.Lock()


def hand_over(graph: Any, query: FloatArray, k: int) -> Walk:
    """Start ``graph.knn_query(query, k)`` on a walker thread."""
    if not _threads:
        _start_threads()
    walk = Walk(graph, query, k)
    _jobs.put(walk)
    return walk


def _start_threads() -> None:
    with _threads_lock:
        while len(_threads) < (os.cpu_count() or 1):
            thread = threading.Thread(
                target=_serve, name=f"{THREAD_NAME}-{len(_threads)}", daemon=True
            )
            thread.start()
            _threads.append(thread)


def _serve() -> None:
    while True:
        _jobs.get().run()
