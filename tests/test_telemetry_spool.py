"""The on-disk spool, the telemetry counters and the local sink's bounded JSON-lines files."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from edgeid.runtime.errors import DiskFullError
from edgeid.runtime.telemetry.local_log import JsonLinesLog
from edgeid.runtime.telemetry.spool import Spool, TelemetryState


def _payload(seq: int, size: int = 100) -> bytes:
    body = json.dumps({"seq": seq, "pad": "x" * size}).encode()
    return body


def test_messages_survive_a_reopen_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 10_000)
    for seq in (3, 1, 2):
        spool.add(seq, "health" if seq != 2 else "events", _payload(seq))
    again = Spool(tmp_path / "spool", 10_000)
    assert [(e.seq, e.kind) for e in again.entries()] == [
        (1, "health"),
        (2, "events"),
        (3, "health"),
    ]
    assert [json.loads(again.read(e) or b"")["seq"] for e in again.entries()] == [1, 2, 3]
    assert again.size_bytes == sum(len(_payload(s)) for s in (1, 2, 3))


def test_the_cap_drops_the_oldest_and_says_which(tmp_path: Path) -> None:
    one = len(_payload(0))
    spool = Spool(tmp_path / "spool", 3 * one)
    for seq in range(3):
        assert spool.add(seq, "health", _payload(seq)) == []
    dropped = spool.add(3, "health", _payload(3))
    assert [e.seq for e in dropped] == [0]
    assert [e.seq for e in spool.entries()] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == [
        f"{s:016d}-health.json" for s in (1, 2, 3)
    ]
    assert spool.size_bytes <= spool.max_bytes


def test_the_newest_message_is_kept_even_alone_over_the_cap(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 50)
    spool.add(0, "health", _payload(0, 10))
    dropped = spool.add(1, "health", _payload(1, 500))
    assert [e.seq for e in dropped] == [0]
    assert [e.seq for e in spool.entries()] == [1]


def test_a_write_cut_short_is_discarded_and_strangers_are_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    folder.mkdir()
    (folder / f"{7:016d}-health.json.tmp").write_bytes(b'{"seq": 7, "pa')
    (folder / "notes.txt").write_text("not ours")
    spool = Spool(folder, 10_000)
    assert spool.entries() == []
    assert not (folder / f"{7:016d}-health.json.tmp").exists()
    assert (folder / "notes.txt").exists()


def test_remove_and_a_vanished_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path / "spool", 10_000)
    spool.add(0, "health", _payload(0))
    spool.add(1, "events", _payload(1))
    first, second = spool.entries()
    spool.remove(first)
    assert not first.path.exists() and spool.pending == 1
    second.path.unlink()
    assert spool.read(second) is None
    assert spool.pending == 0
    assert "spooled telemetry 1 unreadable" in caplog.text


class _FullDisk:
    def write(self, fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def fsync(self, fd: int) -> None:
        pass


def test_a_full_disk_refuses_the_message_and_changes_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 10_000)
    spool.add(0, "health", _payload(0))
    full = Spool(tmp_path / "spool", 10_000, writer=_FullDisk())
    with pytest.raises(DiskFullError, match="disk full"):
        full.add(1, "health", _payload(1))
    assert [e.seq for e in full.entries()] == [0]
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == [f"{0:016d}-health.json"]


def test_state_counts_survive_a_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = TelemetryState(tmp_path / "state.json")
    assert [state.take_seq(), state.take_seq()] == [0, 1]
    state.add_dropped(3)
    again = TelemetryState(tmp_path / "state.json")
    assert (again.next_seq, again.dropped_total) == (2, 3)
    assert again.take_seq(floor=10) == 10
    (tmp_path / "state.json").write_text("{broken")
    fresh = TelemetryState(tmp_path / "state.json")
    assert (fresh.next_seq, fresh.dropped_total) == (0, 0)
    assert "counters start again" in caplog.text


def test_local_log_rotates_once_past_its_cap(tmp_path: Path) -> None:
    log = JsonLinesLog(tmp_path / "health.jsonl", 1000)
    lines = [_payload(i, 200) for i in range(10)]
    for line in lines:
        log.append(line)
    current = (tmp_path / "health.jsonl").read_bytes().splitlines()
    rotated = (tmp_path / "health.jsonl.1").read_bytes().splitlines()
    assert (tmp_path / "health.jsonl").stat().st_size <= 1000
    assert rotated + current == lines[-(len(rotated) + len(current)) :]
    assert current[-1] == lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["health.jsonl", "health.jsonl.1"]


def test_local_log_write_error_is_one_line(tmp_path: Path) -> None:
    log = JsonLinesLog(tmp_path / "health.jsonl", 1000, writer=_FullDisk())
    with pytest.raises(DiskFullError) as refused:
        log.append(_payload(0))
    assert "\n" not in str(refused.value)
