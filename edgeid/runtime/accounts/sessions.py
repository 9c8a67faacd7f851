"""Browser sessions, held in memory on the box and named by a random cookie value.

A session ends after ``idle_s`` without a request or ``max_s`` after login, whichever comes
first, and at logout, password change or when its user is disabled. Logging in always starts
a new session id (no fixation). Sessions before login exist only to carry the login form's
CSRF token. A restart ends every session.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

SESSION_ID_BYTES = 32
CSRF_BYTES = 32
# Far above the people of one office; bounds what a flood of anonymous visits can hold.
MAX_SESSIONS = 10_000
# A login form left open this long must be reloaded.
ANONYMOUS_MAX_S = 30 * 60.0


@dataclass
class Session:
    sid: str  # the cookie value: the only secret
    owner: str  # a separate random id naming the session to the rest of the service
    csrf: str
    username: str | None
    created: float
    last_seen: float
    # The investigator's current search and pending enrolment (ids into in-memory registries).
    values: dict[str, str] = field(default_factory=dict)

    def csrf_ok(self, submitted: str | None) -> bool:
        return bool(submitted) and hmac.compare_digest(self.csrf, submitted or "")


class SessionStore:
    def __init__(
        self,
        *,
        idle_s: float,
        max_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_end: Callable[[Session], None] | None = None,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self.idle_s = idle_s
        self.max_s = max_s
        self._clock = clock
        self._on_end = on_end
        self._max = max_sessions
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def new(self, username: str | None = None) -> Session:
        now = self._clock()
        session = Session(
            sid=secrets.token_urlsafe(SESSION_ID_BYTES),
            owner=secrets.token_hex(16),
            csrf=secrets.token_urlsafe(CSRF_BYTES),
            username=username,
            created=now,
            last_seen=now,
        )
        ended: list[Session] = []
        with self._lock:
            self._sessions[session.sid] = session
            while len(self._sessions) > self._max:
                ended.append(self._evict_one())
        self._ended(ended)
        return session

    def get(self, sid: str | None) -> Session | None:
        """The live session named ``sid``, its idle clock restarted; None if absent or expired."""
        if not sid:
            return None
        now = self._clock()
        ended: list[Session] = []
        with self._lock:
            session = self._sessions.get(sid)
            if session is not None and self._expired(session, now):
                ended.append(self._sessions.pop(sid))
                session = None
            if session is not None:
                session.last_seen = now
                self._sessions.move_to_end(sid)
        self._ended(ended)
        return session

    def login(self, previous: Session | None, username: str) -> Session:
        """A fresh session for ``username``; the pre-login one ends."""
        if previous is not None:
            self.end(previous.sid)
        return self.new(username)

    def end(self, sid: str) -> None:
        with self._lock:
            session = self._sessions.pop(sid, None)
        self._ended([session] if session else [])

    def end_user(self, username: str, *, keep: str | None = None) -> int:
        """End every session of ``username`` except ``keep``; how many ended."""
        with self._lock:
            doomed = [
                s for s in self._sessions.values() if s.username == username and s.sid != keep
            ]
            for s in doomed:
                del self._sessions[s.sid]
        self._ended(doomed)
        return len(doomed)

    def sweep(self) -> None:
        """Drop every expired session (called now and then; ``get`` also checks)."""
        now = self._clock()
        with self._lock:
            doomed = [s for s in self._sessions.values() if self._expired(s, now)]
            for s in doomed:
                del self._sessions[s.sid]
        self._ended(doomed)

    def _expired(self, session: Session, now: float) -> bool:
        if session.username is None:
            return now - session.created > ANONYMOUS_MAX_S
        return now - session.last_seen > self.idle_s or now - session.created > self.max_s

    def _evict_one(self) -> Session:
        # Anonymous sessions go first (oldest first), then the least recently used.
        for sid, session in self._sessions.items():
            if session.username is None:
                return self._sessions.pop(sid)
        return self._sessions.popitem(last=False)[1]

    def _ended(self, sessions: list[Session]) -> None:
        if self._on_end is not None:
            for session in sessions:
                self._on_end(session)
