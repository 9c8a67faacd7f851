"""The ``local`` sink: each message appended as one JSON line to a bounded file.

``<home>/telemetry/health.jsonl`` and ``events.jsonl`` hold the exact payloads the MQTT sink
would publish. Past ``max_bytes`` a file is renamed to ``<name>.1`` (replacing the previous
one) and started afresh, so the two never hold more than twice the cap between them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from edgeid.runtime.storage.durable import (
    FileWriter,
    OsFileWriter,
    fsync_directory,
    write_all,
    write_error,
)

logger = logging.getLogger(__name__)

ROTATED_SUFFIX = ".1"


class JsonLinesLog:
    def __init__(self, path: Path, max_bytes: int, *, writer: FileWriter | None = None) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._writer = writer or OsFileWriter()

    @property
    def rotated_path(self) -> Path:
        return self.path.with_name(self.path.name + ROTATED_SUFFIX)

    def append(self, payload: bytes) -> None:
        line = payload + b"\n"
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        try:
            if size and size + len(line) > self.max_bytes:
                os.replace(self.path, self.rotated_path)
                fsync_directory(self.path.parent)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                write_all(self._writer, fd, line)
                self._writer.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise write_error("writing telemetry", str(self.path.parent), exc) from exc
