"""A stand-in for `edgeid serve` under systemd, for tests/test_systemd_notify.py.

    python tests/notify_service_stub.py WORKER_MAX_AGE_S

It talks to systemd exactly as the service does (edgeid.runtime.system.lifecycle, so NOTIFY_SOCKET
and WATCHDOG_USEC come from the environment) and runs an inference worker that beats its
heartbeat after each job and while idle. Commands on stdin: ``job`` (one quick job), ``hang``
(a job that never returns, like a stuck inference call), ``release`` (the stuck job returns),
``quit``.
"""

from __future__ import annotations

import queue
import sys
import threading

from edgeid.runtime.system.lifecycle import service_lifecycle

IDLE_BEATS_PER_MAX_AGE = 10  # an idle worker beats often enough never to look stuck


def main() -> int:
    max_age_s = float(sys.argv[1])
    jobs: queue.Queue[str] = queue.Queue()
    unstuck = threading.Event()
    with service_lifecycle() as life:
        life.status("loading models")
        beat = life.heartbeat("inference worker", max_age_s)

        def worker() -> None:
            while True:
                try:
                    job = jobs.get(timeout=max_age_s / IDLE_BEATS_PER_MAX_AGE)
                except queue.Empty:
                    beat.beat()  # idle, and alive
                    continue
                if job == "hang":
                    unstuck.wait()
                beat.beat()

        threading.Thread(target=worker, name="inference", daemon=True).start()
        life.ready("ready: stub service")
        for line in sys.stdin:
            command = line.strip()
            if command == "quit":
                break
            if command == "release":
                unstuck.set()
            else:
                jobs.put(command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
