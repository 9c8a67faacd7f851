"""Reconnect delays: exponential, capped, with jitter so a fleet that lost its broker together
does not come back in one synchronised wave."""

from __future__ import annotations

import random

MAX_DOUBLINGS = 32  # past this the ceiling is long since at max_s; bounds 2**attempt


class Backoff:
    """Delay n (from 0) is drawn from [c/2, c] with c = min(max_s, initial_s * 2**n)."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        if not 0 < initial_s <= max_s:
            raise ValueError("need 0 < initial_s <= max_s")
        self.initial_s = initial_s
        self.max_s = max_s
        self._rng = rng or random.Random()
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.initial_s * float(2**self._attempt))
        self._attempt = min(self._attempt + 1, MAX_DOUBLINGS)
        # "Equal jitter": half the ceiling is kept, so retries never bunch at zero.
        return ceiling / 2 + self._rng.random() * ceiling / 2

    def reset(self) -> None:
        """After a successful connection the next failure starts again from ``initial_s``."""
        self._attempt = 0
