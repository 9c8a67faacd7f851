"""A page that a large fleet renders in the background while someone is reading it.

Over thousands of devices the dashboard and ``/metrics`` take about 50 µs per device to render
in Python (0.1 s for 2,000 boxes on this machine's cores, several times that when the cores are
shared), and a request that renders waits for all of it. Once one rendering has taken
``slow_s`` or more, a ``LivePage`` renders every ``refresh_s`` on its own thread for as long as
requests keep coming, and a request takes the latest rendering: its latency is a memory copy,
its data at most ``refresh_s`` older than a fresh render (boxes report every 10-30 s,
Prometheus scrapes every 15-60 s). A small fleet, whose pages render faster than ``slow_s``, is
rendered for each request, exactly as before.

Nobody asking for ``idle_s`` stops the thread and drops the copy, so an unwatched fleet
manager spends nothing on its pages; the first request after that, or one finding the copy
older than two rounds (``2 * (refresh_s + rendering time)``: the renderer fell behind or
failed), renders itself. Renderings are one at a time: a request arriving during one takes
its result.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

DEFAULT_SLOW_S = 0.025
DEFAULT_IDLE_S = 300.0


class LivePage:
    def __init__(
        self,
        render: Callable[[], bytes],
        *,
        refresh_s: float,
        slow_s: float = DEFAULT_SLOW_S,
        idle_s: float = DEFAULT_IDLE_S,
        name: str = "page",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if refresh_s <= 0 or idle_s < refresh_s or slow_s < 0:
            raise ValueError("need refresh_s > 0, idle_s >= refresh_s and slow_s >= 0")
        self._render = render
        self.refresh_s = refresh_s
        self.slow_s = slow_s
        self.idle_s = idle_s
        self._name = name
        self._clock = clock
        self._lock = threading.Lock()  # guards the fields below
        self._render_lock = threading.Lock()  # one rendering at a time
        self._body: bytes | None = None
        self._rendered_at = 0.0  # when the rendering of _body started
        self._finished_at = 0.0  # and when it ended
        self._render_s = 0.0  # how long the last rendering took
        self._last_request = 0.0
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self.renders = 0

    @property
    def background(self) -> bool:
        """Whether the page is being rendered in the background now."""
        with self._lock:
            return self._thread is not None

    def get(self) -> bytes:
        """The page: the background rendering when there is a fresh one, else rendered now."""
        now = self._clock()
        with self._lock:
            self._last_request = now
            body, age = self._body, now - self._rendered_at
            background = self._thread is not None
            on_time = age <= 2 * (self.refresh_s + self._render_s)
        if background and body is not None and on_time:
            return body
        return self._render_now(now)

    def stop(self) -> None:
        """End the background thread (for tests; the service's threads are daemons)."""
        with self._lock:
            thread, self._thread = self._thread, None
        self._wake.set()
        if thread is not None:
            thread.join()
        self._wake.clear()

    def _render_now(self, asked_at: float) -> bytes:
        with self._render_lock:
            with self._lock:
                if self._body is not None and self._finished_at >= asked_at:
                    return self._body  # finished while this request waited
            started = self._clock()
            body = self._render()
            finished = self._clock()
            took = finished - started
            with self._lock:
                self._body, self._rendered_at, self._finished_at = body, started, finished
                self._render_s = took
                self.renders += 1
                if took >= self.slow_s and self._thread is None:
                    self._thread = threading.Thread(
                        target=self._refresh, name=f"edgeid-fleet-{self._name}", daemon=True
                    )
                    self._thread.start()
            return body

    def _refresh(self) -> None:
        me = threading.current_thread()
        while not self._wake.wait(self.refresh_s):
            with self._lock:
                if self._thread is not me:
                    return
                if self._clock() - self._last_request > self.idle_s:
                    self._thread, self._body = None, None
                    return
                if self._render_s < self.slow_s:  # the fleet shrank: render per request again
                    self._thread = None
                    return
            try:
                self._render_now(self._clock())
            except Exception:  # requests render themselves once the copy is too old
                logger.exception("rendering %s in the background failed", self._name)
