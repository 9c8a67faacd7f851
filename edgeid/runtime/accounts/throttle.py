"""Login throttling that an attacker cannot turn against the people it protects.

The unit is the pair (account, network address). A pair's first ``PAIR_FREE_FAILURES`` wrong
passwords in a row cost nothing (typos); from the next one on, each makes the pair wait
before its next attempt, twice as long as the last time (``BASE_DELAY_S``: 2 s, 4 s, ...), up
to ``MAX_DELAY_S``. A success from the pair clears it. Failures against an account from one
address never slow the same account from another address, nor another account from the same
address: nobody can lock someone out by typing their name, and a pair without failures is
never refused.

Two wider guards take the free failures away (a pair then waits after its first failure):

- from every address not known for an account, when the account failed
  ``ACCOUNT_MAX_FAILURES`` times within ``WINDOW_S`` (guessing spread over many machines; one
  address cannot get there through its own delays);
- from an address, for the accounts not known there, when it failed ``ADDRESS_MAX_FAILURES``
  times within ``WINDOW_S`` (a sweep of names); the people behind that address (an office
  behind one NAT address) still sign in, at once when they type their password right.

A pair is known once it signed in (within ``KNOWN_PAIR_S``). A refused attempt never reaches
the password hash and is not counted. Admins see the accounts being slowed (``throttled``) and
clear them (``clear``). State is in memory: a restart clears it, which only the box's operator
can cause.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

# Five typos in a row are ordinary; from the sixth, each wrong guess doubles the wait.
PAIR_FREE_FAILURES = 5
BASE_DELAY_S = 2.0
MAX_DELAY_S = 15 * 60.0
WINDOW_S = 15 * 60.0
# One address's pair delays (5 free, then 2 + 4 + ... s) allow about 13 failures in
# ``WINDOW_S``: only guessing from several addresses reaches the account-wide guard.
ACCOUNT_MAX_FAILURES = 30
# An office shares a few addresses (NAT): allow several people's typos, slow a sweep of names.
ADDRESS_MAX_FAILURES = 50
# A pair's failures are forgotten after a day without one (last week's typos do not count).
PAIR_FORGET_S = 24 * 3600.0
# A pair that signed in within this time is someone's usual place, spared the wider guards.
KNOWN_PAIR_S = 30 * 24 * 3600.0
# Bounds the tables an attacker can grow by trying random names from random addresses.
MAX_TRACKED = 10_000
MAX_NAME_CHARS = 64  # a longer name is no user's; the table keeps only its start

T = TypeVar("T")
K = TypeVar("K")


def delay_after(excess: int) -> float:
    """The wait after the ``excess``-th failure beyond the free ones (1, 2, ...)."""
    if excess <= 0:
        return 0.0
    return min(BASE_DELAY_S * 2.0 ** min(excess - 1, 40), MAX_DELAY_S)


@dataclass
class _Pair:
    failures: int = 0  # in a row, since the last success
    last_failure: float = 0.0
    signed_in_at: float | None = None


@dataclass
class _Failures:
    """Failure times within the window (a bounded number kept)."""

    times: deque[float] = field(default_factory=deque)

    def add(self, now: float, limit: int) -> None:
        self.times.append(now)
        while len(self.times) > limit:
            self.times.popleft()

    def over(self, now: float, limit: int) -> bool:
        while self.times and self.times[0] <= now - WINDOW_S:
            self.times.popleft()
        return len(self.times) >= limit


@dataclass(frozen=True)
class Throttled:
    """One slowed account as the admin sees it: who, from where, how long still."""

    username: str
    address: str | None  # None: the account as a whole (guessing from many addresses)
    failures: int
    wait_s: float


class LoginThrottle:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._pairs: OrderedDict[tuple[str, str], _Pair] = OrderedDict()
        self._accounts: OrderedDict[str, _Failures] = OrderedDict()
        self._addresses: OrderedDict[str, _Failures] = OrderedDict()

    def retry_after(self, username: str, address: str) -> float | None:
        """Seconds until this name from this address may try again; None when it may now."""
        username = username[:MAX_NAME_CHARS]
        now = self._clock()
        with self._lock:
            wait = self._wait(username, address, now)
            return wait if wait > 0 else None

    def _wait(self, username: str, address: str, now: float) -> float:
        pair = self._pairs.get((username, address))
        if pair is None or not pair.failures or now - pair.last_failure > PAIR_FORGET_S:
            return 0.0
        allowance = PAIR_FREE_FAILURES
        known = pair.signed_in_at is not None and now - pair.signed_in_at < KNOWN_PAIR_S
        if not known and self._pressed(username, address, now):
            allowance = 0
        return pair.last_failure + delay_after(pair.failures - allowance) - now

    def _pressed(self, username: str, address: str, now: float) -> bool:
        account = self._accounts.get(username)
        place = self._addresses.get(address)
        return (account is not None and account.over(now, ACCOUNT_MAX_FAILURES)) or (
            place is not None and place.over(now, ADDRESS_MAX_FAILURES)
        )

    def failure(self, username: str, address: str) -> None:
        username = username[:MAX_NAME_CHARS]
        now = self._clock()
        with self._lock:
            pair = self._touch(self._pairs, (username, address), _Pair)
            if now - pair.last_failure > PAIR_FORGET_S:
                pair.failures = 0
            pair.failures += 1
            pair.last_failure = now
            self._touch(self._accounts, username, _Failures).add(now, ACCOUNT_MAX_FAILURES)
            self._touch(self._addresses, address, _Failures).add(now, ADDRESS_MAX_FAILURES)

    def success(self, username: str, address: str) -> None:
        """The pair starts afresh and is known from now on. The account's and the address's
        failures stay: someone else may still be guessing."""
        username = username[:MAX_NAME_CHARS]
        with self._lock:
            pair = self._touch(self._pairs, (username, address), _Pair)
            pair.failures, pair.signed_in_at = 0, self._clock()

    def throttled(self) -> list[Throttled]:
        """The accounts being slowed now: per address (with the wait left), and as a whole
        when guessed from many addresses (``address`` None); longest wait first."""
        now = self._clock()
        found: list[Throttled] = []
        with self._lock:
            for (username, address), pair in self._pairs.items():
                wait = self._wait(username, address, now)
                if wait > 0:
                    found.append(Throttled(username, address, pair.failures, wait))
            for username, account in self._accounts.items():
                if account.over(now, ACCOUNT_MAX_FAILURES):
                    found.append(Throttled(username, None, len(account.times), 0.0))
        return sorted(found, key=lambda t: (-t.wait_s, t.username, t.address or ""))

    def is_throttled(self, username: str) -> bool:
        return any(t.username == username for t in self.throttled())

    def clear(self, username: str) -> int:
        """Forget every failure against this account (an admin's doing); how many pairs and
        account-wide counts were cleared. The addresses' counts stay (sweeps go on)."""
        username = username[:MAX_NAME_CHARS]
        now = self._clock()
        with self._lock:
            keys = [k for k, p in self._pairs.items() if k[0] == username and p.failures]
            for key in keys:
                self._pairs[key].failures = 0
            account = self._accounts.pop(username, None)
            return len(keys) + (1 if account is not None and account.over(now, 1) else 0)

    @staticmethod
    def _touch(table: OrderedDict[K, T], key: K, make: Callable[[], T]) -> T:
        entry = table.get(key)
        if entry is None:
            entry = make()
            table[key] = entry
            while len(table) > MAX_TRACKED:
                table.popitem(last=False)
        else:
            table.move_to_end(key)
        return entry
