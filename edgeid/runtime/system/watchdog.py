"""The systemd watchdog, fed only while the service's workers are alive.

A thread that pinged unconditionally would keep a service with a hung inference worker "alive"
forever. So every part that can hang registers a ``Heartbeat`` and beats it (the inference
worker after each job and while idle); the watchdog sends ``WATCHDOG=1`` only while every
heartbeat is fresh. When one goes stale the pings stop, ``STATUS=`` names the silent part,
and after ``WatchdogSec=`` systemd kills and restarts the service.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edgeid.runtime.system.notify import Notifier

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

# One inference batch takes well under a second even on a Jetson's CPU fallback, and an idle
# worker beats at least every few seconds; 30 s of silence means it is stuck, not busy.
DEFAULT_MAX_AGE_S = 30.0
# sd_watchdog_enabled(3) advises pinging at half of WATCHDOG_USEC, so one late ping is harmless.
PING_FRACTION = 0.5


class Heartbeat:
    """One part of the service that must show signs of life every ``max_age_s`` seconds."""

    def __init__(self, name: str, max_age_s: float, clock: Clock = time.monotonic) -> None:
        if max_age_s <= 0:
            raise ValueError(f"max_age_s must be positive, got {max_age_s}")
        self.name = name
        self.max_age_s = max_age_s
        self._clock = clock
        self._last = clock()  # a float store is atomic: beat() needs no lock

    def beat(self) -> None:
        self._last = self._clock()

    def age_s(self) -> float:
        return self._clock() - self._last

    @property
    def stale(self) -> bool:
        return self.age_s() > self.max_age_s


class Watchdog:
    """Pings systemd at half of ``WATCHDOG_USEC`` while every registered heartbeat is fresh.

    Disabled (``enabled`` False, ``start`` a no-op) when systemd armed no watchdog for this
    process; ``interval_s`` overrides the environment (tests, a supervisor of our own).
    """

    def __init__(
        self,
        notifier: Notifier | None = None,
        *,
        interval_s: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._notifier = notifier or Notifier()
        if interval_s is None:
            armed = self._notifier.watchdog_interval_s()
            interval_s = armed * PING_FRACTION if armed else None
        self.interval_s = interval_s
        self._clock = clock
        self._sources: list[Heartbeat] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._withheld = False
        # What STATUS= goes back to when a stale part recovers (set by the lifecycle's ready()).
        self.healthy_status: str | None = None

    @property
    def enabled(self) -> bool:
        return self.interval_s is not None

    def register(self, name: str, max_age_s: float = DEFAULT_MAX_AGE_S) -> Heartbeat:
        """A new heartbeat the pings depend on; the caller beats it from the watched thread."""
        heartbeat = Heartbeat(name, max_age_s, self._clock)
        with self._lock:
            self._sources.append(heartbeat)
        return heartbeat

    def stale_sources(self) -> list[Heartbeat]:
        with self._lock:
            return [source for source in self._sources if source.stale]

    def tick(self) -> bool:
        """One check: ping if every heartbeat is fresh, else withhold it; True when pinged.

        While withheld, every tick refreshes ``STATUS=`` with how long each part has been
        silent, so `systemctl status` shows what is stuck and for how long.
        """
        stale = self.stale_sources()
        if not stale:
            if self._withheld:
                self._withheld = False
                logger.warning("watchdog: every part is alive again; pings resume")
                if self.healthy_status:
                    self._notifier.status(self.healthy_status)
            return self._notifier.watchdog()
        silent = ", ".join(f"{s.name} silent for {s.age_s():.1f} s" for s in stale)
        if not self._withheld:
            self._withheld = True
            logger.error("watchdog: pings withheld, %s; systemd will restart us", silent)
        self._notifier.status(f"watchdog withheld: {silent}")
        return False

    def start(self) -> None:
        """Start pinging from a daemon thread; a no-op when no watchdog is armed."""
        if self.interval_s is None or self._thread is not None:
            return
        with self._lock:
            for source in self._sources:  # registered during start-up; the clock starts now
                source.beat()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="systemd-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()

    def _run(self) -> None:
        assert self.interval_s is not None
        self.tick()
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:  # a bug here must not end the pings' thread silently
                logger.exception("watchdog tick failed")
