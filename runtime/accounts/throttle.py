"""Login throttling, per account and per network address.

After ``ACCOUNT_MAX_FAILURES`` wrong passwords in a row an account refuses every login, right
or wrong, for ``ACCOUNT_LOCKOUT_S``; a success resets the count. An address that fails
``ADDRESS_MAX_FAILURES`` times within ``ADDRESS_WINDOW_S`` is refused until the oldest of
those failures leaves the window, whatever names it tries. A refused attempt never reaches
the password hash. State is in memory: a restart clears it, which only the box's operator
can cause.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

# Ten guesses in a row is far beyond a person's typing mistakes and far below what guessing
# a 12-character password needs.
ACCOUNT_MAX_FAILURES = 10
ACCOUNT_LOCKOUT_S = 15 * 60.0
# An office shares a few addresses (NAT): allow several people's typos, stop a sweep of names.
ADDRESS_MAX_FAILURES = 50
ADDRESS_WINDOW_S = 15 * 60.0
# Bounds the tables an attacker can grow by trying random names from random addresses.
MAX_TRACKED = 10_000

T = TypeVar("T")


@dataclass
class _Account:
    failures: int = 0
    locked_until: float = 0.0


@dataclass
class _Address:
    failures: deque[float] = field(default_factory=lambda: deque(maxlen=ADDRESS_MAX_FAILURES))


class LoginThrottle:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._accounts: OrderedDict[str, _Account] = OrderedDict()
        self._addresses: OrderedDict[str, _Address] = OrderedDict()

    def retry_after(self, username: str, address: str) -> float | None:
        """Seconds until this name from this address may try again; None when it may now."""
        now = self._clock()
        with self._lock:
            waits: list[float] = []
            account = self._accounts.get(username)
            if account is not None and account.locked_until > now:
                waits.append(account.locked_until - now)
            place = self._addresses.get(address)
            if place is not None and len(place.failures) == ADDRESS_MAX_FAILURES:
                until = place.failures[0] + ADDRESS_WINDOW_S
                if until > now:
                    waits.append(until - now)
            return max(waits) if waits else None

    def failure(self, username: str, address: str) -> None:
        now = self._clock()
        with self._lock:
            account = self._touch(self._accounts, username, _Account)
            if account.locked_until <= now and account.locked_until:
                account.failures, account.locked_until = 0, 0.0  # lockout over: count afresh
            account.failures += 1
            if account.failures >= ACCOUNT_MAX_FAILURES:
                account.locked_until = now + ACCOUNT_LOCKOUT_S
            self._touch(self._addresses, address, _Address).failures.append(now)

    def success(self, username: str) -> None:
        with self._lock:
            self._accounts.pop(username, None)

    @staticmethod
    def _touch(table: OrderedDict[str, T], key: str, make: Callable[[], T]) -> T:
        entry = table.get(key)
        if entry is None:
            entry = make()
            table[key] = entry
            while len(table) > MAX_TRACKED:
                table.popitem(last=False)
        else:
            table.move_to_end(key)
        return entry
