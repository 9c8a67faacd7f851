"""The service's conversation with systemd, in one object for `edgeid serve`.

    with service_lifecycle() as life:
        life.status("loading models")
        worker_beat = life.heartbeat("inference worker")   # beaten by the worker thread
        ...load, bind...
        life.ready("ready: 4 models on cpu")                # READY=1, watchdog starts
        serve_forever()
    # leaving the block: watchdog stopped, STOPPING=1

Every call is a no-op outside systemd, so the same code runs in a terminal.
"""

from __future__ import annotations

import time
from types import TracebackType

from edgeid.runtime.system.notify import Notifier
from edgeid.runtime.system.watchdog import DEFAULT_MAX_AGE_S, Clock, Heartbeat, Watchdog


class ServiceLifecycle:
    def __init__(self, notifier: Notifier | None = None, *, clock: Clock = time.monotonic) -> None:
        self.notifier = notifier or Notifier()
        self.watchdog = Watchdog(self.notifier, clock=clock)

    def heartbeat(self, name: str, max_age_s: float = DEFAULT_MAX_AGE_S) -> Heartbeat:
        """A part the watchdog pings depend on; register before ``ready``."""
        return self.watchdog.register(name, max_age_s)

    def status(self, text: str) -> None:
        self.notifier.status(text)

    def extend_start_timeout(self, seconds: float) -> None:
        """Ask systemd for ``seconds`` more start-up time (TimeoutStartSec= is for the normal
        case; a first TensorRT engine build on a Jetson can take minutes)."""
        self.notifier.extend_timeout(seconds)

    def ready(self, status: str) -> None:
        """READY=1 with ``status``, then start the watchdog pings."""
        self.watchdog.healthy_status = status
        self.notifier.ready(status)
        self.watchdog.start()

    def stopping(self, status: str = "stopping") -> None:
        self.watchdog.stop()
        self.notifier.stopping(status)

    def __enter__(self) -> ServiceLifecycle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stopping("stopping" if exc is None else f"stopping after {type(exc).__name__}")


def service_lifecycle(notifier: Notifier | None = None) -> ServiceLifecycle:
    return ServiceLifecycle(notifier)
