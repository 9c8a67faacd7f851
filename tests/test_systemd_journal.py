"""Structured logging to journald over its native protocol, on a real bound socket."""

from __future__ import annotations

import array
import fcntl
import logging
import os
import socket
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeid.runtime.system.journal import (
    JournalHandler,
    configure_logging,
    decode_native,
    encode_native,
    log_handler,
    syslog_priority,
)

RECV_TIMEOUT_S = 30.0  # safety net against a hang, not a timing assertion
MAX_DATAGRAM = 1 << 20


class FakeJournald:
    """A bound datagram socket reading entries as journald does, memfds included."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(RECV_TIMEOUT_S)

    def entry(self) -> tuple[dict[str, str], bool]:
        """The next entry, and whether it came in a passed file descriptor."""
        data, ancillary, _, _ = self.sock.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(4))
        if not ancillary:
            return decode_native(data), False
        level, kind, raw = ancillary[0]
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS) and data == b""
        fd = array.array("i", raw[:4])[0]
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)  # journald maps only sealed memfds
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK
        try:
            with os.fdopen(fd, "rb", closefd=False) as handle:
                handle.seek(0)
                return decode_native(handle.read()), True
        finally:
            os.close(fd)


@pytest.fixture
def journald(tmp_path: Path) -> Iterator[FakeJournald]:
    fake = FakeJournald(tmp_path / "journal.sock")
    yield fake
    fake.sock.close()


@pytest.fixture
def logger(journald: FakeJournald) -> Iterator[logging.Logger]:
    log = logging.getLogger("edgeid.test.journal")
    handler = JournalHandler("edgeid", socket_path=journald.path)
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log
    log.removeHandler(handler)
    handler.close()


def test_entry_carries_structured_fields(journald: FakeJournald, logger: logging.Logger) -> None:
    logger.warning("engine for %s rebuilt", "dlib_resnet_v1", extra={"EDGEID_MODEL": "resnet"})
    fields, via_fd = journald.entry()
    assert not via_fd
    assert fields["MESSAGE"] == "engine for dlib_resnet_v1 rebuilt"
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "edgeid"
    assert fields["LOGGER"] == "edgeid.test.journal"
    assert fields["EDGEID_MODEL"] == "resnet"
    assert fields["CODE_FUNC"] == "test_entry_carries_structured_fields"
    assert fields["CODE_FILE"].endswith("test_systemd_journal.py")
    assert fields["THREAD_NAME"] == "MainThread"


def test_multi_line_values_and_tracebacks(journald: FakeJournald, logger: logging.Logger) -> None:
    try:
        raise ValueError("bad\nconfig")
    except ValueError:
        logger.exception("start-up failed:\nsee below")
    fields, _ = journald.entry()
    assert fields["MESSAGE"] == "start-up failed:\nsee below"
    assert fields["PRIORITY"] == "3"
    assert fields["EXCEPTION_INFO"].startswith("Traceback (most recent call last):")
    assert fields["EXCEPTION_INFO"].endswith("ValueError: bad\nconfig")


def test_oversized_entry_goes_through_a_sealed_memfd(
    journald: FakeJournald, logger: logging.Logger
) -> None:
    """An entry larger than a datagram may be (net.core.wmem_default) is passed as an fd."""
    big = "x" * (4 << 20)
    logger.info(big)
    fields, via_fd = journald.entry()
    assert via_fd and fields["MESSAGE"] == big and fields["PRIORITY"] == "6"


def test_native_encoding_round_trip() -> None:
    fields = {"MESSAGE": "two\nlines", "A_B": "=", "EMPTY": "", "UTF": "é"}
    assert decode_native(encode_native(fields)) == fields
    assert encode_native({"K": "v"}) == b"K=v\n"


def test_priorities() -> None:
    assert [syslog_priority(level) for level in (50, 40, 30, 20, 10, 5, 45)] == [
        2,
        3,
        4,
        6,
        7,
        7,
        3,
    ]


def test_systemd_python_is_preferred_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the `systemd` extra, systemd.journal.send carries the fields (stand-in module:
    systemd-python is not installed here)."""
    sent: list[tuple[str, dict[str, str]]] = []
    journal = types.ModuleType("systemd.journal")
    journal.send = lambda message, **fields: sent.append((message, fields))  # type: ignore[attr-defined]
    package = types.ModuleType("systemd")
    package.journal = journal  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "systemd", package)
    monkeypatch.setitem(sys.modules, "systemd.journal", journal)
    handler = JournalHandler("edgeid")
    handler.handle(logging.makeLogRecord({"msg": "hi", "levelno": 20, "name": "x", "K_ID": 7}))
    assert sent == [("hi", sent[0][1])]
    assert sent[0][1]["PRIORITY"] == "6" and sent[0][1]["K_ID"] == "7"


def test_plain_stderr_outside_systemd(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    handler = log_handler()
    assert not isinstance(handler, JournalHandler)
    record = {"msg": "up", "levelno": 30, "levelname": "WARNING", "name": "edgeid.serve"}
    handler.handle(logging.makeLogRecord(record))
    assert capsys.readouterr().err == "WARNING edgeid.serve: up\n"


def test_journal_when_stderr_is_the_journal_stream(journald: FakeJournald) -> None:
    """systemd sets JOURNAL_STREAM to stderr's device:inode when it feeds the journal."""
    info = os.fstat(sys.stderr.fileno())
    env = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
    handler = log_handler(socket_path=journald.path, env=env)
    assert isinstance(handler, JournalHandler)
    handler.close()
    assert not isinstance(log_handler(env={"JOURNAL_STREAM": "1:2"}), JournalHandler)


def test_configure_logging_replaces_root_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert configure_logging(logging.INFO) == "stderr"
        assert len(root.handlers) == 1 and root.level == logging.INFO
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
