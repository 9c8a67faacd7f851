"""A test hook: kill the update process at its N-th step, to prove every step is recoverable.

With ``EDGEID_UPDATE_CRASH_AT=N`` in the environment, the N-th crash point an update operation
passes sends SIGKILL to its own process: no exception handler, ``finally`` or atexit runs,
exactly as if the power had been cut after that step's writes reached the kernel.
``tests/test_update_crash.py`` runs an install with N = 1, 2, 3, … until one completes, then
checks after each kill that recovery leaves the box on a working slot. Without the variable
(every real box) a crash point only counts.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping

logger = logging.getLogger(__name__)

CRASH_ENV = "EDGEID_UPDATE_CRASH_AT"


class CrashPoints:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        value = (os.environ if env is None else env).get(CRASH_ENV, "")
        self.target = int(value) if value.isdigit() and int(value) > 0 else None
        self.passed: list[str] = []

    def __call__(self, name: str) -> None:
        self.passed.append(name)
        if self.target is not None and len(self.passed) == self.target:
            logger.warning("%s=%d: killing this process at %s", CRASH_ENV, self.target, name)
            os.kill(os.getpid(), signal.SIGKILL)
