"""The one way services write to the audit log: ``Recorder`` over an ``AuditSink``.

Services hold a ``Recorder`` and call ``record`` before they return personal data or
acknowledge a change: if the sink refuses (disk full, log closed, a malformed event), the
exception propagates and the caller reveals or changes nothing. Refusals go through ``denied``,
which is rate-limited per actor so that a flood of refused requests cannot fill the disk; the
refusals it suppresses are counted and reported in that actor's next recorded refusal.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from edgeid.runtime.audit.actor import Actor
from edgeid.runtime.audit.events import AuditAction, AuditEvent, Candidate
from edgeid.runtime.audit.justification import Justification
from edgeid.runtime.errors import AccessDeniedError

logger = logging.getLogger(__name__)

# At most this many refusals per actor per window are written; a client hammering a door it
# may not use costs a few records a minute, not a record per request.
DENIALS_PER_WINDOW = 10
DENIAL_WINDOW_S = 60.0
MAX_TRACKED_ACTORS = 4096  # bounds the limiter's memory; the oldest actor is forgotten first


class AuditSink(Protocol):
    """Where records go: ``edgeid.runtime.audit.log.AuditLog`` (or a test's list)."""

    def append(self, event: AuditEvent) -> object: ...


@dataclass
class _Window:
    started: float
    written: int = 0
    suppressed: int = 0


class Recorder:
    """See the module docstring."""

    def __init__(
        self,
        sink: AuditSink,
        *,
        clock: Callable[[], float] = time.monotonic,
        denials_per_window: int = DENIALS_PER_WINDOW,
        window_s: float = DENIAL_WINDOW_S,
    ) -> None:
        self.sink = sink
        self._clock = clock
        self._limit = denials_per_window
        self._window_s = window_s
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self._lock = threading.Lock()

    def record(
        self,
        actor: Actor,
        action: AuditAction,
        *,
        justification: Justification | None = None,
        reason: str | None = None,
        gallery: str | None = None,
        subject_id: str | None = None,
        probe_sha256: str | None = None,
        candidates: Sequence[Candidate] = (),
        decision: str | None = None,
        age_band: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Append one record; raises (and so stops the caller) if it cannot be written.
        ``reason`` is for changes that need a reason but no case (an erasure)."""
        if justification is not None and reason is not None:
            raise ValueError("give a justification or a reason, not both")
        self.sink.append(
            AuditEvent(
                user=actor.user,
                role=actor.role,
                action=action,
                case=justification.case if justification else None,
                reason=justification.reason if justification else reason,
                gallery=gallery,
                probe_sha256=probe_sha256,
                candidates=tuple(candidates),
                decision=decision,
                subject_id=subject_id,
                age_band=age_band,
                detail=_with_via(actor, detail),
            )
        )

    @contextlib.contextmanager
    def failure_recorded(
        self,
        actor: Actor,
        action: AuditAction,
        *,
        gallery: str | None = None,
        subject_id: str | None = None,
        about: str | None = None,
    ) -> Iterator[None]:
        """Around a change already recorded as ``action``: if it then fails, an
        ``operation_failed`` record follows, and the change's own error goes on up (a failure
        to write that second record is logged, never put in its place)."""
        try:
            yield
        except BaseException as exc:
            what = f"{action.value} failed" + (f" for {about}" if about else "")
            try:
                self.record(
                    actor,
                    AuditAction.OPERATION_FAILED,
                    gallery=gallery,
                    subject_id=subject_id,
                    detail=f"{what}: {type(exc).__name__}",
                )
            except Exception:
                logger.exception("could not record that a %s failed", action.value)
            raise

    def refused(
        self,
        actor: Actor,
        message: str,
        *,
        where: str,
        resource: str | None = None,
        why: str,
        justification: Justification | None = None,
    ) -> AccessDeniedError:
        """Record a refusal (as ``denied``) and return the error to raise, marked recorded:
        callers write ``raise recorder.refused(...)``, so a refusal is neither raised
        unrecorded nor recorded twice by a front end."""
        self.denied(actor, where=where, resource=resource, why=why, justification=justification)
        return AccessDeniedError(message, recorded=True)

    def denied(
        self,
        actor: Actor,
        *,
        where: str,
        resource: str | None = None,
        why: str,
        justification: Justification | None = None,
    ) -> bool:
        """Record an ``access_denied``; False when this actor's allowance for the window is
        spent (the refusal is counted and reported with the next one written)."""
        with self._lock:
            now = self._clock()
            window = self._windows.get(actor.user)
            if window is None or now - window.started >= self._window_s:
                carried = window.suppressed if window else 0
                window = _Window(started=now, suppressed=carried)
                self._windows[actor.user] = window
            self._windows.move_to_end(actor.user)
            while len(self._windows) > MAX_TRACKED_ACTORS:
                self._windows.popitem(last=False)
            if window.written >= self._limit:
                window.suppressed += 1
                return False
            window.written += 1
            suppressed, window.suppressed = window.suppressed, 0
        parts = [f"at {where}", why]
        if resource:
            parts.insert(1, f"resource {resource}")
        if suppressed:
            parts.append(f"{suppressed} earlier refusal(s) of this actor not recorded (rate limit)")
        self.record(
            actor, AuditAction.ACCESS_DENIED, justification=justification, detail="; ".join(parts)
        )
        return True


def _with_via(actor: Actor, detail: str | None) -> str | None:
    if actor.via is None:
        return detail
    return f"{detail}; via {actor.via}" if detail else f"via {actor.via}"
