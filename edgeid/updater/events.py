"""Update outcomes as telemetry events, delivered at least once.

The install usually runs in a technician's ``edgeid update`` process and recovery in the
unit's ExecStartPre, neither of which holds the service's telemetry connection. So each
outcome is appended to ``<home>/updates/events.jsonl`` (and handed to an in-process sink when
one is given); the service forwards what it has not forwarded yet with ``deliver_events``,
keeping its own cursor. Fields are versions, slots and reasons only: health data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeid.runtime.storage.durable import write_file_atomically
from edgeid.updater.jsonlog import JsonLog

logger = logging.getLogger(__name__)

UPDATE_APPLIED = "update_applied"
UPDATE_ROLLED_BACK = "update_rolled_back"
EVENTS_FILE = "events.jsonl"
COMPACT_AFTER_EVENTS = 1000
KEEP_EVENTS = 500

# (event name, fields): what TelemetryAgent.event() is connected to.
EventSink = Callable[[str, dict[str, str]], None]


@dataclass(frozen=True)
class UpdateEvent:
    seq: int
    name: str
    fields: dict[str, str]


class EventOutbox:
    def __init__(self, updates_dir: Path) -> None:
        self._log = JsonLog(updates_dir / EVENTS_FILE)

    def events(self) -> list[UpdateEvent]:
        return [
            UpdateEvent(int(r["seq"]), str(r["name"]), {k: str(v) for k, v in r["fields"].items()})
            for r in self._log.records()
        ]

    def record(self, name: str, fields: dict[str, str]) -> UpdateEvent:
        """Append the event, unless this update already recorded it (a resumed step runs
        twice when killed between recording and moving on)."""
        events = self.events()
        for event in events:
            if event.name == name and event.fields.get("update_id") == fields.get("update_id"):
                return event
        event = UpdateEvent((events[-1].seq if events else 0) + 1, name, fields)
        self._log.append({"seq": event.seq, "name": name, "fields": fields})
        if len(events) + 1 > COMPACT_AFTER_EVENTS:
            self._log.compact(KEEP_EVENTS)
        return event

    def since(self, seq: int) -> list[UpdateEvent]:
        return [event for event in self.events() if event.seq > seq]


def deliver_events(updates_dir: Path, sink: EventSink, cursor_path: Path) -> int:
    """Hand ``sink`` every event after the one ``cursor_path`` records; returns how many.

    The cursor advances after each delivery, so a crash re-delivers at most one event. A sink
    that raises stops this round (logged); the event is offered again next time.
    """
    try:
        cursor = int(cursor_path.read_text(encoding="ascii").strip() or 0)
    except FileNotFoundError:
        cursor = 0
    except (OSError, ValueError) as exc:
        logger.warning("update event cursor %s unreadable (%s); starting over", cursor_path, exc)
        cursor = 0
    delivered = 0
    for event in EventOutbox(updates_dir).since(cursor):
        try:
            sink(event.name, dict(event.fields))
        except Exception:
            logger.exception("update event %s could not be delivered; will retry", event.name)
            break
        write_file_atomically(cursor_path, f"{event.seq}\n".encode(), action="saving the cursor")
        delivered += 1
    return delivered
