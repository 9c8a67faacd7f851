"""An append-only log of JSON records, one per line, each with its own checksum.

Every append is written with one ``write`` call and fsynced before it counts. A crash or power
loss can leave at most a torn last line; it fails its checksum, is ignored on reading and cut
off before the next append, so the log always reads as a prefix of what was written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from edgeid.runtime.storage.durable import (
    OsFileWriter,
    fsync_directory,
    write_all,
    write_error,
    write_file_atomically,
)

logger = logging.getLogger(__name__)

CHECKSUM_KEY = "sha256"
CHECKSUM_HEX = 16  # 64 bits: catches torn or damaged lines; not a defence against an attacker


def _checksum(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:CHECKSUM_HEX]


def encode_line(record: dict[str, Any]) -> bytes:
    body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return b'{"%s":"%s","record":%s}\n' % (CHECKSUM_KEY.encode(), _checksum(body).encode(), body)


def decode_line(line: bytes) -> dict[str, Any] | None:
    """The record on ``line``, or None when the line is torn or damaged."""
    try:
        outer = json.loads(line)
        record = outer["record"]
        body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(record, dict) or outer.get(CHECKSUM_KEY) != _checksum(body):
        return None
    return record


class JsonLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def _scan(self) -> tuple[list[dict[str, Any]], int]:
        """Valid records, and the byte length of the intact prefix (where a torn tail starts)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return [], 0
        records: list[dict[str, Any]] = []
        intact = 0
        pos = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:
                break  # no newline: the last append was cut short
            record = decode_line(data[pos:end])
            if record is None:
                logger.warning("%s: skipping a damaged line at byte %d", self.path, pos)
            else:
                records.append(record)
            pos = end + 1
            intact = pos
        return records, intact

    def records(self) -> list[dict[str, Any]]:
        return self._scan()[0]

    def last(self) -> dict[str, Any] | None:
        records = self.records()
        return records[-1] if records else None

    def append(self, record: dict[str, Any]) -> None:
        """Add ``record`` durably; a torn tail left by a crash is cut off first."""
        line = encode_line(record)
        _, intact = self._scan()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            try:
                if os.fstat(fd).st_size != intact:
                    os.ftruncate(fd, intact)
                write_all(OsFileWriter(), fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            if intact == 0:
                fsync_directory(self.path.parent)  # a new file: make its name durable too
        except OSError as exc:
            raise write_error(f"appending to {self.path.name}", str(self.path.parent), exc) from exc

    def compact(self, keep_last: int) -> None:
        """Rewrite the log atomically with only its last ``keep_last`` records."""
        records = self.records()[-keep_last:]
        data = b"".join(encode_line(record) for record in records)
        write_file_atomically(self.path, data, action=f"compacting {self.path.name}")
        os.chmod(self.path, 0o644)
