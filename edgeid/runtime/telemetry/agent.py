"""The telemetry agent: a health report every ``interval_s``, coarse events, to the chosen sink.

Sinks (``telemetry.sink``): ``local`` appends to ``<home>/telemetry/{health,events}.jsonl``;
``mqtt`` spools each message on disk and publishes it to the fleet broker over TLS (see
``mqtt_link``), removing it once acknowledged; ``off`` reports nothing.

One thread does all the work, so the spool and the MQTT client are never shared; other threads
talk to it only through ``event()`` (a queue) and ``stop()``. Any failure inside a round is
logged and the agent carries on: telemetry must never take the service down.

Use::

    agent = TelemetryAgent(home, load_settings(home), __version__,
                           backend_state=lambda: pipeline.backend_state)
    agent.start()          # publishes "online" and a "started" event
    agent.event("update_applied")
    agent.stop()           # a "stopped" event, then a retained "offline"
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edgeid.runtime.config.settings import Settings
from edgeid.runtime.errors import EdgeidError
from edgeid.runtime.inference.model_home import models_dir
from edgeid.runtime.storage.durable import lock_exclusively, make_private_dir, write_error
from edgeid.runtime.system.metrics import SERVICE_METRICS, BackendState, ServiceMetrics
from edgeid.runtime.telemetry.backoff import Backoff
from edgeid.runtime.telemetry.host import PROC
from edgeid.runtime.telemetry.local_log import JsonLinesLog
from edgeid.runtime.telemetry.mqtt_link import MqttLink, tls_context
from edgeid.runtime.telemetry.report import (
    BackendSource,
    CountSource,
    HealthCollector,
    ModelIdSource,
)
from edgeid.runtime.telemetry.schema import (
    EventKind,
    EventReport,
    MessageKind,
    SpoolState,
    TelemetryPayloadError,
    check_payload,
    coarse,
    encode,
)
from edgeid.runtime.telemetry.sensors import SensorReader
from edgeid.runtime.telemetry.software import model_ids, schema_version
from edgeid.runtime.telemetry.spool import (
    SPOOL_DIR,
    STATE_FILE,
    Spool,
    SpoolEntry,
    TelemetryState,
    telemetry_dir,
)
from edgeid.runtime.telemetry.topics import Topics

logger = logging.getLogger(__name__)

LOCK_FILE = "agent.lock"
# Events and stop requests are noticed within this; it is also the longest network wait.
LOOP_TICK_S = 0.25
# At most this many unacknowledged publishes: a long backlog drains without flooding the broker.
MAX_INFLIGHT = 10
# A graceful stop waits this long for spooled messages to reach the broker before "offline".
FLUSH_ON_STOP_S = 5.0
# `telemetry once` measures CPU use over this window (a report measures since the last one).
PREVIEW_CPU_WINDOW_S = 0.5
# stop() waits this long for the thread: the flush, plus a connect attempt that may be under way.
STOP_JOIN_S = FLUSH_ON_STOP_S + 10.0


class TelemetryAgentBusyError(EdgeidError):
    """Another agent already reports for this state directory."""


class TelemetryAgent:
    """Reports this box's health; see the module docstring. Thread-safe: ``event`` and ``stop``
    may be called from any thread."""

    def __init__(
        self,
        home: Path,
        settings: Settings,
        version: str,
        *,
        backend_state: BackendSource | None = None,
        model_ids: ModelIdSource | None = None,
        enrolled_faces: CountSource | None = None,
        metrics: ServiceMetrics = SERVICE_METRICS,
        sensors: SensorReader | None = None,
        proc: Path | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.home = home
        self.settings = settings.telemetry
        self.topics = Topics.of(settings.device)
        self._version = schema_version(version)
        self._clock = clock
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        # Loaded now so a missing certificate stops the start-up with the key's name.
        self._tls = tls_context(self.settings) if self.settings.sink == "mqtt" else None
        self._collector = HealthCollector(
            home,
            self._version,
            metrics=metrics,
            backend_state=backend_state or metrics_backend(metrics),
            model_ids=model_ids or (lambda: _models_of(home)),
            enrolled_faces=enrolled_faces if self.settings.report_enrolled_counts else None,
            proc=proc or PROC,
            sensors=sensors,
            clock=clock,
            monotonic=monotonic,
        )
        self._events: queue.SimpleQueue[EventKind] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._last_backend: BackendState | None = None
        # Set up by start(), used only on the agent's thread:
        self._state: TelemetryState | None = None
        self._spool: Spool | None = None
        self._logs: dict[MessageKind, JsonLinesLog] = {}
        self._link: MqttLink | None = None
        self._inflight: dict[int, SpoolEntry] = {}

    @property
    def directory(self) -> Path:
        return telemetry_dir(self.home)

    # -- what callers use ----------------------------------------------------------------------

    def preview(self, cpu_window_s: float = PREVIEW_CPU_WINDOW_S) -> tuple[str, bytes]:
        """The topic and exact payload the next health report would have; changes nothing."""
        time.sleep(cpu_window_s)
        state = TelemetryState(self.directory / STATE_FILE)
        spool_dir = self.directory / SPOOL_DIR
        pending = len(list(spool_dir.glob("*.json"))) if spool_dir.is_dir() else 0
        spool = SpoolState(pending=pending, dropped_total=state.dropped_total)
        report = self._collector.collect(state.next_seq, spool, reset_metrics=False)
        return self.topics.of_kind("health"), encode(report)

    def start(self) -> None:
        """Begin reporting; with sink ``off`` this does nothing."""
        if self.settings.sink == "off":
            logger.info("telemetry is off (telemetry.sink = off)")
            return
        if self._thread is not None:
            raise EdgeidError("the telemetry agent is already running")
        try:
            make_private_dir(self.directory)
            self._lock_fd = lock_exclusively(
                self.directory / LOCK_FILE,
                lambda: TelemetryAgentBusyError(
                    f"another telemetry agent reports for {self.directory.parent}; stop it first"
                ),
            )
        except OSError as exc:
            raise write_error("starting telemetry", str(self.directory), exc) from exc
        try:
            self._state = TelemetryState(self.directory / STATE_FILE)
            if self.settings.sink == "mqtt":
                self._open_mqtt()
            else:
                cap = self.settings.local_max_bytes
                self._logs = {
                    kind: JsonLinesLog(self.directory / f"{kind}.jsonl", cap)
                    for kind in ("health", "events")
                }
        except BaseException:
            self._release()
            raise
        self._stop.clear()
        self._events.put(EventKind.STARTED)
        self._thread = threading.Thread(target=self._run, name="edgeid-telemetry", daemon=True)
        self._thread.start()
        logger.info("telemetry agent started (sink %s, %s)", self.settings.sink, self.topics.base)

    def event(self, kind: EventKind | str) -> None:
        """Report a coarse operational event (one of ``EventKind``)."""
        try:
            checked = EventKind(kind)
        except ValueError:
            raise TelemetryPayloadError(
                f"unknown telemetry event; use one of {', '.join(k.value for k in EventKind)}"
            ) from None
        if self.settings.sink != "off":
            self._events.put(checked)

    def stop(self) -> None:
        """Report ``stopped``, deliver what can be delivered, then publish ``offline``."""
        thread = self._thread
        if thread is None:
            return
        self._events.put(EventKind.STOPPED)
        self._stop.set()
        thread.join(STOP_JOIN_S)
        if thread.is_alive():
            logger.warning("the telemetry agent did not stop in time")
        self._thread = None
        self._release()

    # -- the agent's thread ----------------------------------------------------------------------

    def _run(self) -> None:
        next_report = self._monotonic()
        while not self._stop.is_set():
            try:
                self._drain_events()
                now = self._monotonic()
                if now >= next_report:
                    self._report()
                    next_report = max(next_report + self.settings.interval_s, now)
                wait = max(0.0, min(LOOP_TICK_S, next_report - self._monotonic()))
                if not self._network(wait):
                    self._stop.wait(wait)
            except EdgeidError as exc:  # e.g. a full disk: said in one line, tried again
                logger.warning("telemetry round failed (%s); carrying on", exc)
                self._stop.wait(LOOP_TICK_S)
            except Exception:
                logger.exception("telemetry round failed; carrying on")
                self._stop.wait(LOOP_TICK_S)
        try:
            self._drain_events()
            self._flush_and_close()
        except Exception:
            logger.exception("telemetry stop failed")

    def _network(self, wait: float) -> bool:
        if self._link is None:
            return False
        self._pump()
        return self._link.step(wait)

    def _report(self) -> None:
        state = self._require_state()
        pending = self._spool.pending if self._spool else 0
        spool = SpoolState(pending=pending, dropped_total=state.dropped_total)
        report = self._collector.collect(state.take_seq(), spool, reset_metrics=True)
        self._emit("health", report.seq, encode(report))
        self._note_backend(report.inference.backend)

    def _note_backend(self, backend: BackendState | None) -> None:
        previous, self._last_backend = self._last_backend, backend
        if backend == "degraded" and previous != "degraded":
            self._events.put(EventKind.DEGRADED)
        elif previous == "degraded" and backend in ("cpu", "tensorrt"):
            self._events.put(EventKind.RECOVERED)

    def _drain_events(self) -> None:
        state = self._require_state()
        while True:
            try:
                kind = self._events.get_nowait()
            except queue.Empty:
                return
            seq = state.take_seq()
            at = coarse(self._clock())
            event = EventReport(seq=seq, at=at, kind=kind, software=self._version)
            self._emit("events", seq, encode(event))

    def _emit(self, kind: MessageKind, seq: int, payload: bytes) -> None:
        if self._spool is None:
            self._logs[kind].append(payload)
            return
        dropped = self._spool.add(seq, kind, payload)
        if dropped:
            self._require_state().add_dropped(len(dropped))
            for mid in [m for m, e in self._inflight.items() if e in dropped]:
                del self._inflight[mid]

    # -- MQTT ------------------------------------------------------------------------------------

    def _open_mqtt(self) -> None:
        assert self._tls is not None
        self._spool = Spool(self.directory / SPOOL_DIR, self.settings.spool_max_bytes)
        state = self._require_state()
        if self._spool.last_seq is not None and self._spool.last_seq >= state.next_seq:
            state.take_seq(self._spool.last_seq + 1)  # the state file was lost, the spool not
        self._link = MqttLink(
            self.settings,
            self.topics,
            self._tls,
            on_delivered=self._delivered,
            on_lost=self._connection_lost,
            backoff=Backoff(
                self.settings.reconnect_min_s, self.settings.reconnect_max_s, self._rng
            ),
            monotonic=self._monotonic,
        )

    def _pump(self) -> None:
        """Publish spooled messages, oldest first, while the connection has room."""
        link, spool = self._link, self._spool
        if link is None or spool is None or not link.connected:
            return
        busy = {e.seq for e in self._inflight.values()}
        for entry in spool.entries():
            if len(self._inflight) >= MAX_INFLIGHT:
                return
            if entry.seq in busy:
                continue
            payload = spool.read(entry)
            if payload is None:
                continue
            try:
                check_payload(entry.kind, payload)  # the spool is a file: check it again
            except TelemetryPayloadError as exc:
                logger.warning("spooled telemetry %d refused: %s", entry.seq, exc)
                spool.remove(entry)
                self._require_state().add_dropped(1)
                continue
            mid = link.publish(self.topics.of_kind(entry.kind), payload)
            if mid is None:
                return
            self._inflight[mid] = entry

    def _delivered(self, mid: int, accepted: bool) -> None:
        entry = self._inflight.pop(mid, None)
        if entry is not None and accepted and self._spool is not None:
            self._spool.remove(entry)

    def _connection_lost(self) -> None:
        # Message ids are per connection; what was in flight is published again from the spool.
        self._inflight.clear()

    def _flush_and_close(self) -> None:
        link, spool = self._link, self._spool
        if link is None or spool is None:
            return
        deadline = self._monotonic() + FLUSH_ON_STOP_S
        while link.connected and spool.pending and self._monotonic() < deadline:
            self._pump()
            link.step(0.1)
        if spool.pending:
            logger.info("%d telemetry message(s) stay spooled for the next start", spool.pending)
        link.close()

    # -- helpers ---------------------------------------------------------------------------------

    def _require_state(self) -> TelemetryState:
        if self._state is None:
            raise EdgeidError("the telemetry agent is not started")
        return self._state

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def metrics_backend(metrics: ServiceMetrics) -> BackendSource:
    """The backend the service last recorded in ``metrics`` (None before it records one)."""
    return metrics.backend_state


def _models_of(home: Path) -> list[str]:
    return model_ids(models_dir(home))
