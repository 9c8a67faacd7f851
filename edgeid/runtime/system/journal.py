"""Logging to journald with structured fields.

Each record becomes one journal entry with ``MESSAGE``, ``PRIORITY`` (syslog level),
``SYSLOG_IDENTIFIER``, ``LOGGER``, ``THREAD_NAME``, ``CODE_FILE``/``CODE_LINE``/``CODE_FUNC``,
``EXCEPTION_INFO`` for tracebacks, and any upper-case ``extra=`` key as a field of its own::

    logger.warning("engine rebuilt", extra={"EDGEID_MODEL": "dlib_resnet_v1"})
    # journalctl -u edgeid EDGEID_MODEL=dlib_resnet_v1

Transport, in order: systemd-python's ``systemd.journal.send`` when installed; else journald's
native protocol on ``/run/systemd/journal/socket`` (a datagram of fields; a sealed memfd for
entries too large for one datagram, as sd_journal_sendv does); else stderr with a plain format.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import re
import socket
import struct
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
JOURNAL_STREAM_ENV = "JOURNAL_STREAM"  # set by systemd when stdout/stderr go to the journal
DEFAULT_IDENTIFIER = "edgeid"
STDERR_FORMAT = "%(levelname)s %(name)s: %(message)s"
# journald's rule for field names: upper-case letters, digits and "_", not starting with "_"
# (those are trusted fields journald adds itself) or a digit, at most 64 characters.
_FIELD_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6}
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def _systemd_journal() -> ModuleType | None:
    try:
        from systemd import journal
    except ImportError:
        return None
    module: ModuleType = journal
    return module


def syslog_priority(levelno: int) -> int:
    """Python level to syslog priority; levels between the named ones round down in severity."""
    for level, priority in sorted(_PRIORITY.items(), reverse=True):
        if levelno >= level:
            return priority
    return 7  # debug


def record_fields(record: logging.LogRecord, message: str, identifier: str) -> dict[str, str]:
    """The journal fields for one record."""
    fields = {
        "MESSAGE": message,
        "PRIORITY": str(syslog_priority(record.levelno)),
        "SYSLOG_IDENTIFIER": identifier,
        "LOGGER": record.name,
        "THREAD_NAME": record.threadName or "",
        "CODE_FILE": record.pathname,
        "CODE_LINE": str(record.lineno),
        "CODE_FUNC": record.funcName,
    }
    if record.exc_info and record.exc_info[0] is not None:
        fields["EXCEPTION_INFO"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
    for key, value in record.__dict__.items():
        if _FIELD_NAME.match(key) and key not in fields:
            fields[key] = str(value)
    return fields


def encode_native(fields: Mapping[str, str]) -> bytes:
    """journald's native datagram: ``KEY=value\\n``, or for a value with a newline
    ``KEY\\n`` + its length as little-endian 64-bit + value + ``\\n``."""
    out = bytearray()
    for key, text in fields.items():
        value = text.encode("utf-8", "replace")
        if b"\n" in value:
            out += key.encode() + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"
        else:
            out += key.encode() + b"=" + value + b"\n"
    return bytes(out)


def decode_native(data: bytes) -> dict[str, str]:
    """The inverse of ``encode_native`` (what journald does with a datagram; used by tests)."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            pos = end + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
            value = data[end + 9 : end + 9 + size]
            pos = end + 9 + size + 1
        fields[key.decode()] = value.decode("utf-8")
    return fields


class JournalHandler(logging.Handler):
    """Writes records to journald as structured entries.

    ``socket_path`` selects the native protocol on that socket (tests bind their own); left
    at None, systemd-python is used when installed, else the system's journal socket.
    """

    def __init__(
        self,
        identifier: str = DEFAULT_IDENTIFIER,
        *,
        socket_path: Path | None = None,
        level: int = logging.NOTSET,
    ) -> None:
        super().__init__(level)
        self.identifier = identifier
        self.socket_path = socket_path or JOURNAL_SOCKET
        self._systemd = _systemd_journal() if socket_path is None else None
        self._sock: socket.socket | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = record_fields(record, record.getMessage(), self.identifier)
            if self._systemd is not None:
                message = fields.pop("MESSAGE")
                self._systemd.send(message, **fields)
            else:
                self._send_native(encode_native(fields))
        except Exception:
            self.handleError(record)

    def _send_native(self, datagram: bytes) -> None:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.sendto(datagram, str(self.socket_path))
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(datagram)

    def _send_memfd(self, datagram: bytes) -> None:
        """A too-large entry goes as a sealed memfd passed over the socket (journald accepts
        sealed memfds and reads the entry from them)."""
        assert self._sock is not None
        fd = os.memfd_create("edgeid-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(datagram)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            self._sock.sendmsg([], rights, 0, str(self.socket_path))
        finally:
            os.close(fd)

    def close(self) -> None:
        self.acquire()
        try:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        finally:
            self.release()
        super().close()


def journal_available(socket_path: Path = JOURNAL_SOCKET) -> bool:
    return _systemd_journal() is not None or socket_path.is_socket()


def stderr_is_journal(env: Mapping[str, str] | None = None) -> bool:
    """True when systemd connected our stderr to the journal (JOURNAL_STREAM is its
    ``device:inode``), i.e. we run as a service and plain stderr lines would lose their fields."""
    value = (os.environ if env is None else env).get(JOURNAL_STREAM_ENV, "")
    device, _, inode = value.partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


def log_handler(
    identifier: str = DEFAULT_IDENTIFIER,
    *,
    socket_path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> logging.Handler:
    """The handler for this process: journald under systemd, else stderr in a plain format."""
    path = socket_path or JOURNAL_SOCKET
    if stderr_is_journal(env) and (socket_path is not None or journal_available(path)):
        return JournalHandler(identifier, socket_path=socket_path)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(STDERR_FORMAT))
    return handler


def configure_logging(level: int = logging.INFO, identifier: str = DEFAULT_IDENTIFIER) -> str:
    """Route the root logger through ``log_handler``; returns "journal" or "stderr"."""
    handler = log_handler(identifier)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return "journal" if isinstance(handler, JournalHandler) else "stderr"
