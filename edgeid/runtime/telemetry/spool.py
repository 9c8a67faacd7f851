"""Messages waiting for the broker, on disk, so they survive a broker outage and a restart.

Layout under ``<home>/telemetry/``::

    state.json                       {"next_seq": N, "dropped_total": N}
    spool/<seq, 16 digits>-<kind>.json   one message's exact payload bytes

Every message is spooled before it is published and removed once the broker acknowledged it
(PUBACK), so a crash at any point loses nothing that was spooled; a message may be delivered
twice, which the fleet's ``seq`` de-duplication absorbs. The spool keeps at most ``max_bytes``
of payloads: the oldest are dropped first and counted in ``dropped_total``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from edgeid.runtime.errors import StorageWriteError
from edgeid.runtime.storage.durable import (
    FileWriter,
    fsync_directory,
    make_private_dir,
    write_file_atomically,
)
from edgeid.runtime.telemetry.schema import MessageKind

logger = logging.getLogger(__name__)

TELEMETRY_DIR = "telemetry"
SPOOL_DIR = "spool"
STATE_FILE = "state.json"
_ENTRY = re.compile(r"^(\d{16})-(health|events)\.json$")


def telemetry_dir(home: Path) -> Path:
    return home / TELEMETRY_DIR


@dataclass(frozen=True)
class SpoolEntry:
    seq: int
    kind: MessageKind
    path: Path
    size: int


class TelemetryState:
    """The next message number and the count of dropped messages, kept across restarts."""

    def __init__(self, path: Path, *, writer: FileWriter | None = None) -> None:
        self.path = path
        self._writer = writer
        self.next_seq = 0
        self.dropped_total = 0
        try:
            data = json.loads(path.read_text(encoding="ascii"))
            self.next_seq = max(0, int(data["next_seq"]))
            self.dropped_total = max(0, int(data["dropped_total"]))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError):
            # Losing the counters costs continuity of seq, not data: start again and say so.
            logger.warning("telemetry state %s unreadable; counters start again", path)

    def take_seq(self, floor: int = 0) -> int:
        """The next message number (at least ``floor``), persisted before it is used."""
        seq = max(self.next_seq, floor)
        self.next_seq = seq + 1
        self.save()
        return seq

    def add_dropped(self, count: int) -> None:
        if count:
            self.dropped_total += count
            self.save()

    def save(self) -> None:
        data = {"next_seq": self.next_seq, "dropped_total": self.dropped_total}
        write_file_atomically(
            self.path,
            json.dumps(data).encode("ascii"),
            writer=self._writer,
            action="saving the telemetry state",
        )


class Spool:
    """Outgoing messages, oldest first, at most ``max_bytes`` of payload in all.

    Used by one thread (the agent's); the newest message is always kept, even alone over the
    cap, so a report is never refused for its own size.
    """

    def __init__(
        self, directory: Path, max_bytes: int, *, writer: FileWriter | None = None
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._writer = writer
        make_private_dir(directory)
        self._entries: list[SpoolEntry] = []
        self._size = 0
        for path in sorted(directory.iterdir()):
            match = _ENTRY.match(path.name)
            if match is None:
                if path.name.endswith(".tmp"):  # a write cut short by a crash: never counted
                    path.unlink(missing_ok=True)
                continue
            kind: MessageKind = "health" if match.group(2) == "health" else "events"
            entry = SpoolEntry(int(match.group(1)), kind, path, path.stat().st_size)
            self._entries.append(entry)
            self._size += entry.size
        self._entries.sort(key=lambda e: e.seq)

    @property
    def pending(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def last_seq(self) -> int | None:
        return self._entries[-1].seq if self._entries else None

    def entries(self) -> list[SpoolEntry]:
        return list(self._entries)

    def add(self, seq: int, kind: MessageKind, payload: bytes) -> list[SpoolEntry]:
        """Spool one message durably; returns the old messages the cap pushed out."""
        path = self.directory / f"{seq:016d}-{kind}.json"
        write_file_atomically(path, payload, writer=self._writer, action="spooling telemetry")
        self._entries.append(SpoolEntry(seq, kind, path, len(payload)))
        self._size += len(payload)
        dropped: list[SpoolEntry] = []
        while self._size > self.max_bytes and len(self._entries) > 1:
            dropped.append(self._entries[0])
            self._delete(self._entries[0])
        if dropped:
            fsync_directory(self.directory)
            logger.warning("telemetry spool full: dropped the %d oldest message(s)", len(dropped))
        return dropped

    def read(self, entry: SpoolEntry) -> bytes | None:
        """The payload, or None (and the entry forgotten) when its file is gone."""
        try:
            return entry.path.read_bytes()
        except OSError as exc:
            logger.warning("spooled telemetry %d unreadable (%s); skipped", entry.seq, exc.strerror)
            self._delete(entry)
            return None

    def remove(self, entry: SpoolEntry) -> None:
        """The broker has it: forget the message."""
        if entry in self._entries:
            self._delete(entry)

    def _delete(self, entry: SpoolEntry) -> None:
        self._entries.remove(entry)
        self._size -= entry.size
        try:
            entry.path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageWriteError(
                f"removing spooled telemetry failed under {self.directory}: {exc.strerror}"
            ) from exc
