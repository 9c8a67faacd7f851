"""`LivePage`: a slow page is rendered in the background while requested and served from the
latest rendering; a fast one is rendered per request; idleness stops the work; a renderer that
fails or falls behind is not hidden behind an old copy. Real threads, short real intervals."""

from __future__ import annotations

import threading
import time

import pytest

from edgeid.fleet.live_page import LivePage

REFRESH_S = 0.05


class Renderer:
    """Counts renderings; each returns its number and takes ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.count = 0
        self.fail = False
        self._lock = threading.Lock()

    def __call__(self) -> bytes:
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("render failed")
        with self._lock:
            self.count += 1
            return str(self.count).encode()


def _wait(predicate: object, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_fast_page_is_rendered_for_every_request() -> None:
    render = Renderer(0.0)
    page = LivePage(render, refresh_s=REFRESH_S, slow_s=0.5)
    assert [page.get() for _ in range(3)] == [b"1", b"2", b"3"]
    assert not page.background


def test_a_slow_page_is_served_from_the_background_rendering() -> None:
    render = Renderer(0.3)
    page = LivePage(render, refresh_s=REFRESH_S, slow_s=0.05, idle_s=10)
    try:
        assert page.get() == b"1"  # the first request renders, and starts the thread
        assert page.background
        _wait(lambda: render.count >= 2, "a background rendering")
        timings, bodies = [], []
        for _ in range(8):
            started = time.perf_counter()
            bodies.append(int(page.get()))
            timings.append(time.perf_counter() - started)
            time.sleep(0.1)
        assert max(timings) < 0.15, "a request waited for a rendering (0.3 s)"
        assert bodies == sorted(bodies) and bodies[-1] > bodies[0], "the copy is not refreshed"
    finally:
        page.stop()


def test_requests_arriving_together_share_one_rendering() -> None:
    render = Renderer(0.5)
    page = LivePage(render, refresh_s=10, slow_s=5)  # never in the background
    bodies: list[bytes] = []
    threads = [threading.Thread(target=lambda: bodies.append(page.get())) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # One request renders; those that arrived while it ran take its result, not a second one.
    assert render.count == 1 and bodies == [b"1"] * 6


def test_an_unwatched_page_stops_rendering_and_keeps_no_copy() -> None:
    render = Renderer(0.06)
    page = LivePage(render, refresh_s=REFRESH_S, slow_s=0.05, idle_s=0.2)
    page.get()
    _wait(lambda: not page.background, "the idle thread to stop")
    count = render.count
    time.sleep(0.2)
    assert render.count == count, "an unwatched page is still rendered"
    assert page.get() == str(count + 1).encode(), "the first request after idling renders anew"
    page.stop()


def test_a_failing_renderer_is_not_hidden_behind_an_old_copy() -> None:
    render = Renderer(0.06)
    page = LivePage(render, refresh_s=REFRESH_S, slow_s=0.05, idle_s=10)
    try:
        page.get()
        render.fail = True
        time.sleep(2 * (REFRESH_S + 0.06) + 0.1)  # the copy is now two rounds old
        with pytest.raises(RuntimeError, match="render failed"):
            page.get()
    finally:
        page.stop()
