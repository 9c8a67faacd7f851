"""`edgeid audit verify|export` as real subprocesses on real audit logs.

Every kind of tampering the issue names (an edited byte, a deleted record, an inserted copy,
two records swapped, the tail cut off, an old head file put back) and a few subtler ones
(checksums and the whole chain rebuilt) must give a non-zero exit naming the first bad
record; a torn tail from a kill -9 must be reported as such, not as tampering.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeid.cli import main
from edgeid.runtime.audit import (
    AuditAction,
    AuditEvent,
    AuditLog,
    Candidate,
    VerifyReport,
    VerifyStatus,
    audit_dir,
    verify_chain,
)
from edgeid.runtime.audit.frames import (
    HEADER_BYTES,
    Checkpoint,
    Frame,
    FrameKind,
    ScanState,
    decode_checkpoint,
    encode_checkpoint,
    encode_frame,
    parse_header,
    scan_frames,
)
from edgeid.runtime.audit.layout import HEAD_FILE, LOG_FILE
from edgeid.runtime.audit.signing import sign_checkpoint, sign_head, write_head
from edgeid.runtime.compat import UTC
from edgeid.runtime.gallery.store import GalleryStore
from edgeid.runtime.identity.device_key import (
    ensure_device_key,
    fingerprint,
    load_device_key,
    public_key_pem,
)
from edgeid.runtime.vault.key_choice import keys_dir
from edgeid.runtime.vault.keys import KeyFileProvider

REPO_ROOT = Path(__file__).resolve().parent.parent
EDGEID = str(Path(sys.executable).parent / "edgeid")
T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
STEP = timedelta(hours=6)  # records 1..10 from May 1 09:00 to May 3 15:00
RECORDS = 10
CHECKPOINT_EVERY = 4  # frames: e1 e2 e3 e4 C4 e5 e6 e7 e8 C8 e9 e10 C10 (the close)
STALE_HEAD_AT = 6


def event(i: int) -> AuditEvent:
    if i == 3:
        return AuditEvent("officer-0", "investigator", AuditAction.LOGIN, detail="from 10.0.0.5")
    return AuditEvent(
        user=f"officer-{i % 3}",
        role="investigator",
        action=AuditAction.SEARCH,
        case=f"2024/{100 + i % 2}",
        reason=f"identify the victim in seized image {i}",
        gallery="missing-persons",
        probe_sha256=f"{i:064x}",
        candidates=[Candidate(f"{i:032x}", f"{i + 1:032x}", 0.5 + i / 100, "moderate", 1)],
    )


class Clock:
    def __init__(self) -> None:
        self.now = T0 - STEP

    def __call__(self) -> datetime:
        self.now += STEP
        return self.now


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with ten records, three checkpoints, and a copy of the head after record 6."""
    home = tmp_path_factory.mktemp("pristine")
    ensure_device_key(home)
    with GalleryStore(home, KeyFileProvider(keys_dir(home))) as store:
        AuditLog.open(home, store.keyring).close()  # created before the clock is read
        log = AuditLog.open(home, store.keyring, clock=Clock(), checkpoint_every=CHECKPOINT_EVERY)
        with log:
            for i in range(1, RECORDS + 1):
                log.append(event(i))
                if i == STALE_HEAD_AT:
                    shutil.copy(audit_dir(home) / HEAD_FILE, home / "old-head.json")
    return home


@pytest.fixture
def home(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "home"
    shutil.copytree(pristine, copy)
    return copy


def edgeid(*args: str | Path) -> tuple[int, dict[str, object], str]:
    done = subprocess.run(
        [EDGEID, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    try:
        payload = json.loads(done.stdout) if "--json" in args else {}
    except ValueError:
        payload = {}
    return done.returncode, payload, done.stderr


def verify(home: Path, *extra: str | Path) -> tuple[int, dict[str, object], str]:
    return edgeid("audit", "verify", "--home", home, "--json", *extra)


# -- editing the log's frames, as an attacker would ------------------------------------------


def log_path(home: Path) -> Path:
    return audit_dir(home) / LOG_FILE


def frames(home: Path) -> list[Frame]:
    with open(log_path(home), "rb") as stream:
        return list(scan_frames(stream, ScanState()))


def frame_bytes(home: Path) -> tuple[bytes, list[bytes]]:
    data = log_path(home).read_bytes()
    return data[:HEADER_BYTES], [data[f.offset : f.end] for f in frames(home)]


def write_frames(home: Path, header: bytes, parts: list[bytes], tail: bytes = b"") -> None:
    log_path(home).write_bytes(header + b"".join(parts) + tail)


def rebuild_chain(
    home: Path, index: int, payload: Callable[[bytes], bytes], signer: Ed25519PrivateKey | None
) -> None:
    """Change frame ``index``'s payload, then recompute every checksum and chain hash after it;
    with ``signer`` also re-sign the checkpoints and the head (an attacker holding the key)."""
    header_raw = log_path(home).read_bytes()[:HEADER_BYTES]
    header = parse_header(header_raw)
    old = frames(home)
    prev = old[index - 1].chain_hash if index else header.genesis_hash
    parts = [log_path(home).read_bytes()[f.offset : f.end] for f in old[:index]]
    seq = 0
    for i, frame in enumerate(old):
        if i < index:
            seq = frame.seq
            continue
        body = payload(frame.payload) if i == index else frame.payload
        if frame.kind == FrameKind.CHECKPOINT and signer is not None:
            cp = decode_checkpoint(frame)
            signed_at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=cp.signed_at_us)
            new_cp: Checkpoint = sign_checkpoint(signer, header.log_id, frame.seq, prev, signed_at)
            body = encode_checkpoint(new_cp)
        raw, prev = encode_frame(frame.kind, frame.seq, prev, body)
        parts.append(raw)
        seq = frame.seq
    write_frames(home, header_raw, parts)
    if signer is not None:
        head = sign_head(signer, header.log_id, len(parts), seq, prev, T0)
        write_head(audit_dir(home) / HEAD_FILE, head, None)


def flip_last_byte(payload: bytes) -> bytes:
    return payload[:-1] + bytes([payload[-1] ^ 0x01])


def edit_byte(home: Path) -> None:  # a byte of record 6's ciphertext
    header, parts = frame_bytes(home)
    part = bytearray(parts[6])
    part[-3] ^= 0x20
    parts[6] = bytes(part)
    write_frames(home, header, parts)


def delete_record(home: Path) -> None:  # record 6
    header, parts = frame_bytes(home)
    del parts[6]
    write_frames(home, header, parts)


def insert_copy(home: Path) -> None:  # record 2 again, after record 6
    header, parts = frame_bytes(home)
    parts.insert(7, parts[1])
    write_frames(home, header, parts)


def swap_records(home: Path) -> None:  # records 6 and 7
    header, parts = frame_bytes(home)
    parts[6], parts[7] = parts[7], parts[6]
    write_frames(home, header, parts)


def truncate_tail(home: Path) -> None:  # cut the checkpoint after 8, records 9, 10 and C10
    header, parts = frame_bytes(home)
    write_frames(home, header, parts[:9])


def truncate_mid_record(home: Path) -> None:  # the file ends inside record 10
    header, parts = frame_bytes(home)
    write_frames(home, header, parts[:11], tail=parts[11][:20])


def old_head_back(home: Path) -> None:
    shutil.copy(home / "old-head.json", audit_dir(home) / HEAD_FILE)


def rebuilt_chain_record_6(home: Path) -> None:
    rebuild_chain(home, 6, flip_last_byte, signer=None)


def rebuilt_chain_record_10(home: Path) -> None:
    rebuild_chain(home, 11, flip_last_byte, signer=None)


def forged_checkpoint_signature(home: Path) -> None:  # the checkpoint after record 8
    rebuild_chain(home, 9, flip_last_byte, signer=None)


def header_edited(home: Path) -> None:
    data = bytearray(log_path(home).read_bytes())
    data[12] ^= 0x01  # inside the log id
    log_path(home).write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("tamper", "reason", "first_bad"),
    [
        (edit_byte, "checksum", 6),
        (delete_record, "missing_record", 6),
        (insert_copy, "out_of_order", 7),
        (swap_records, "missing_record", 6),
        (truncate_tail, "truncated", 9),
        (old_head_back, "stale_head", STALE_HEAD_AT + 1),
        (rebuilt_chain_record_6, "bad_checkpoint", 5),
    ],
)
def test_edgeid_audit_verify_catches_tampering_and_names_the_first_bad_record(
    home: Path, tamper: Callable[[Path], None], reason: str, first_bad: int
) -> None:
    tamper(home)
    code, report, stderr = verify(home)
    assert code == 1, stderr
    assert report["status"] == "tampered" and report["ok"] is False
    assert (report["reason"], report["first_bad_seq"]) == (reason, first_bad), report["problem"]
    assert f"at record {first_bad}" in stderr and stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("tamper", "reason", "first_bad"),
    [
        (truncate_mid_record, "truncated", 10),
        (rebuilt_chain_record_10, "bad_checkpoint", 9),
        (forged_checkpoint_signature, "bad_checkpoint", 5),
        (header_edited, "header", 1),
        (lambda home: (audit_dir(home) / HEAD_FILE).unlink(), "head_missing", None),
        (lambda home: (audit_dir(home) / HEAD_FILE).write_text("{}"), "head_malformed", None),
    ],
    ids=["mid-record", "chain-after-last-checkpoint", "checkpoint-signature", "header",
         "head-deleted", "head-malformed"],
)  # fmt: skip
def test_subtler_tampering_is_caught_too(
    home: Path, tamper: Callable[[Path], None], reason: str, first_bad: int | None
) -> None:
    """The same checks by the library; the command's wiring is proven above."""
    tamper(home)
    report = verified_here(home)
    assert report.status is VerifyStatus.TAMPERED
    assert (report.reason, report.first_bad_seq) == (reason, first_bad), report.problem


def in_process(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """The same CLI code without a process start, where the process boundary is not the
    point of the test (the CLI imports every command group: about a second per start)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_text_names_the_first_bad_record(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    delete_record(home)
    code, out, err = in_process(capsys, "audit", "verify", "--home", home)
    assert code == 1
    assert "TAMPERED: first bad record 6: record 6 is missing" in out
    assert err.startswith("edgeid: error: the audit log fails verification at record 6")


def test_a_deleted_log_is_reported_missing(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(audit_dir(home))  # the keyring still holds its key
    code, out, err = in_process(capsys, "audit", "verify", "--home", home, "--json")
    assert code == 1 and json.loads(out)["status"] == "missing", err


def test_no_log_yet_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ensure_device_key(tmp_path)
    code, _, err = in_process(capsys, "audit", "verify", "--home", tmp_path)
    assert code == 2 and "no audit log under" in err


def test_another_devices_key_does_not_verify(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.pem"
    other.write_text(public_key_pem(Ed25519PrivateKey.generate()))
    code, out, _ = in_process(
        capsys, "audit", "verify", "--home", home, "--public-key", other, "--json"
    )
    report = json.loads(out)
    assert code == 1 and (report["reason"], report["first_bad_seq"]) == ("bad_checkpoint", 1)


def test_an_intact_log_verifies(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, stderr = in_process(capsys, "audit", "verify", "--home", home, "--json")
    assert code == 0, stderr
    report = json.loads(out)
    assert report["status"] == "ok" and report["records"] == RECORDS
    assert report["checkpoints"] == 3 and report["head_seq"] == RECORDS
    assert report["first_bad_seq"] is None and report["torn_tail_bytes"] == 0


def test_a_torn_tail_is_reported_as_such_not_as_tampering(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header, parts = frame_bytes(home)
    write_frames(home, header, parts, tail=parts[5][:37])  # half a record after the last one
    code, out, stderr = in_process(capsys, "audit", "verify", "--home", home, "--json")
    report = json.loads(out)
    assert code == 0, stderr
    assert report["status"] == "torn_tail" and report["torn_tail_bytes"] == 37
    assert report["records"] == RECORDS
    code, out, _ = in_process(capsys, "audit", "verify", "--home", home)
    assert code == 0 and "a torn tail of 37 bytes after record 10" in out


# -- kill -9 during appends ----------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from edgeid.runtime.audit import AuditAction, AuditEvent, AuditLog
    from edgeid.runtime.vault.key_choice import keys_dir
    from edgeid.runtime.vault.keys import KeyFileProvider
    from edgeid.runtime.gallery.store import GalleryStore
    from edgeid.runtime.storage.durable import OsFileWriter

    home, mode, stop_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    count = {"frame": 0, "head": 0}

    class StallingWriter(OsFileWriter):
        '''Stops, never to return, inside the stop_at-th frame or head write.'''

        def write(self, fd, data):
            kind = "frame" if data[:4] == b"EAFR" else "head"
            count[kind] += 1
            if kind == mode and count[kind] == stop_at:
                if kind == "frame":
                    os.write(fd, data[: len(data) // 2])
                print("stuck", flush=True)
                sys.stdin.read()
            return os.write(fd, data)

    with GalleryStore(home, KeyFileProvider(keys_dir(home))) as store:
        log = AuditLog.open(home, store.keyring, writer=StallingWriter(), checkpoint_every=7)
        while True:
            record = log.append(AuditEvent("officer-7", "investigator", AuditAction.SEARCH,
                case="2024/117", reason="a kill -9 test", probe_sha256="ab" * 32))
            print(f"ack {record.seq}", flush=True)
    """
)


def run_until_killed(home: Path, mode: str, stop_at: int, acks_wanted: int) -> int:
    """Append in a child until it stalls (or has ``acks_wanted`` acks), kill -9 it, and
    return the last acknowledged record number."""
    script = home / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen(
        [sys.executable, str(script), str(home), mode, str(stop_at)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    acked = 0
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith("ack "):
                acked = int(line.split()[1])
                if acks_wanted and acked >= acks_wanted:
                    break
            elif line.startswith("stuck"):
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    return acked


def fresh_home(tmp_path: Path) -> Path:
    home = tmp_path / "box"
    ensure_device_key(home)
    with GalleryStore(home, KeyFileProvider(keys_dir(home))) as store:
        AuditLog.open(home, store.keyring).close()
    return home


def reopened_records(home: Path) -> list[AuditEvent]:
    with (
        GalleryStore(home, KeyFileProvider(keys_dir(home))) as store,
        AuditLog.open(home, store.keyring) as log,
    ):
        return [r.event for r in log.query(limit=1000)]


def verified_here(home: Path) -> VerifyReport:
    return verify_chain(audit_dir(home), load_device_key(home).public_key())


def test_kill_9_mid_append_leaves_a_torn_tail_reported_as_such(tmp_path: Path) -> None:
    home = fresh_home(tmp_path)
    acked = run_until_killed(home, "frame", stop_at=6, acks_wanted=0)
    assert acked == 5
    code, report, stderr = verify(home)
    assert code == 0, stderr
    assert report["status"] == "torn_tail" and report["records"] == 5
    assert int(report["torn_tail_bytes"]) > 0  # type: ignore[call-overload]
    events = reopened_records(home)  # the writer cuts the torn tail and says so
    assert events[0].action is AuditAction.LOG_RECOVERED and "torn tail" in str(events[0].detail)
    assert len(events) == 6
    after = verified_here(home)
    assert after.status is VerifyStatus.OK and after.torn_tail_bytes == 0


def test_kill_9_between_the_frame_and_its_signed_head(tmp_path: Path) -> None:
    home = fresh_home(tmp_path)
    acked = run_until_killed(home, "head", stop_at=6, acks_wanted=0)
    assert acked == 5
    code, report, stderr = verify(home)
    assert code == 0, stderr
    assert report["status"] == "ok" and report["unsigned_records"] == 1
    assert report["records"] == 6 and report["head_seq"] == 5
    events = reopened_records(home)
    assert events[0].action is AuditAction.LOG_RECOVERED and "signed the last frame" in str(
        events[0].detail
    )
    after = verified_here(home)
    assert after.status is VerifyStatus.OK and after.unsigned_records == 0


def test_kill_9_at_an_arbitrary_moment_keeps_every_acknowledged_record(tmp_path: Path) -> None:
    home = fresh_home(tmp_path)
    acked = run_until_killed(home, "none", stop_at=0, acks_wanted=25)
    code, report, stderr = verify(home)
    assert code == 0, stderr
    assert int(report["records"]) >= acked  # type: ignore[call-overload]
    assert int(report["unsigned_records"]) <= 1  # type: ignore[call-overload]
    assert len(reopened_records(home)) >= acked
    assert verified_here(home).status is VerifyStatus.OK


# -- export -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_export(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export of the whole log, by the real command, on a copy of the pristine home (an
    export is recorded: the copy's log gains the export's own record, the eleventh)."""
    folder = tmp_path_factory.mktemp("export")
    copy = folder / "home"
    shutil.copytree(pristine, copy)
    out = folder / "all.jsonl"
    code, _, stderr = export(copy, out)
    assert code == 0, stderr
    return out


@pytest.fixture
def exported(full_export: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "all.jsonl"
    shutil.copy(full_export, copy)
    return copy


def export(home: Path, out: Path, *extra: str) -> tuple[int, dict[str, object], str]:
    return edgeid("audit", "export", "--home", home, "--output", out, "--json", *extra)


def lines_of(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_export_filters_by_date_and_carries_chain_hashes(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "may2.jsonl"
    code, summary, stderr = export(home, out, "--since", "2024-05-02", "--until", "2024-05-02")
    assert code == 0, stderr
    lines = lines_of(out)
    assert [line["type"] for line in lines] == ["header"] + ["record"] * 4 + [
        "trailer",
        "signature",
    ]
    records = lines[1:-2]
    assert [r["seq"] for r in records] == [4, 5, 6, 7]  # 03:00, 09:00, 15:00, 21:00 on May 2
    assert all(str(r["time"]).startswith("2024-05-02") for r in records)
    assert records[1]["case"] == "2024/101" and records[1]["user"] == "officer-2"
    assert records[1]["reason"] == "identify the victim in seized image 5"
    assert records[1]["candidates"] == [
        {"subject_id": f"{5:032x}", "face_id": f"{6:032x}", "score": 0.55, "band": "moderate",
         "rank": 1}
    ]  # fmt: skip
    assert all(len(str(r["chain_hash"])) == 64 for r in records)
    # The log holds the export's own record too, written before the export is made.
    assert lines[-2]["records"] == 4 and lines[-2]["log_records"] == RECORDS + 1
    assert summary["records"] == 4 and summary["log_records"] == RECORDS + 1
    assert lines[-1]["key_fingerprint"] == fingerprint(load_device_key(home))
    assert (out.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize(
    ("args", "seqs"),
    [
        (["--user", "officer-1"], [1, 4, 7, 10]),
        (["--case", "2024/100"], [2, 4, 6, 8, 10]),
        (["--action", "login"], [3]),
        (["--since", "2024-05-03T03:00Z"], [8, 9, 10, 11]),  # 11: this export's own record
        (["--since", "2024-05-01T12:00+02:00", "--until", "2024-05-01T21:00"], [2]),
    ],
)
def test_export_filters(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], seqs: list[int]
) -> None:
    out = tmp_path / "out.jsonl"
    code, _, stderr = in_process(capsys, "audit", "export", "--home", home, "--output", out, *args)
    assert code == 0, stderr
    assert [line["seq"] for line in lines_of(out)[1:-2]] == seqs


def test_export_signature_verifies_by_device_key_public_key_or_fingerprint(
    pristine: Path, exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = exported
    code, check, stderr = edgeid(
        "audit", "export", "--home", pristine, "--verify-file", out, "--json"
    )
    assert code == 0, stderr
    assert check["signature"] == "valid" and check["records"] == RECORDS + 1  # and the export
    elsewhere = tmp_path / "oversight"  # off the box: no device key, no keyring
    fp = fingerprint(load_device_key(pristine))
    code, _, stderr = edgeid(
        "audit", "export", "--home", elsewhere, "--verify-file", out, "--fingerprint", fp
    )
    assert code == 0, stderr
    pem = tmp_path / "device.pem"
    pem.write_text(public_key_pem(load_device_key(pristine)))
    verify_file = ("audit", "export", "--home", elsewhere, "--verify-file", out)
    assert in_process(capsys, *verify_file, "--public-key", pem)[0] == 0
    code, _, stderr = in_process(capsys, *verify_file, "--fingerprint", "0" * 64)
    assert code == 1 and "not the expected device" in stderr
    other = tmp_path / "other.pem"
    other.write_text(public_key_pem(Ed25519PrivateKey.generate()))
    code, _, stderr = in_process(capsys, *verify_file, "--public-key", other)
    assert code == 1 and "not the given key" in stderr


@pytest.mark.parametrize(
    "change",
    [
        lambda text: text.replace('"case":"2024/101"', '"case":"2024/102"', 1),
        lambda text: "\n".join(line for i, line in enumerate(text.split("\n")) if i != 3),
    ],
    ids=["case", "line-removed"],
)
def test_a_changed_export_line_fails_verification(
    pristine: Path, exported: Path, change: Callable[[str], str]
) -> None:
    out = exported
    text = out.read_text()
    changed = change(text)
    assert changed != text
    out.write_text(changed)
    code, _, stderr = edgeid("audit", "export", "--home", pristine, "--verify-file", out)
    assert code == 1 and "does not verify: the file was changed after export" in stderr


def test_openssl_verifies_an_export_off_the_box(exported: Path, tmp_path: Path) -> None:
    """The documented way to check an export with nothing but OpenSSL 3."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    out = exported
    lines = out.read_bytes().splitlines(keepends=True)
    (tmp_path / "signed.bin").write_bytes(b"".join(lines[:-1]))
    last = json.loads(lines[-1])
    (tmp_path / "sig.bin").write_bytes(base64.b64decode(last["signature"]))
    (tmp_path / "device.pem").write_text(last["public_key_pem"])
    command = [
        "openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "device.pem", "-rawin",
        "-in", "signed.bin", "-sigfile", "sig.bin",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and "Signature Verified Successfully" in done.stdout
    (tmp_path / "signed.bin").write_bytes(b"".join(lines[:-1]).replace(b"2024/101", b"2024/109"))
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode != 0


def test_export_refuses_a_tampered_log_and_an_existing_file(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "existing.jsonl"
    existing.write_text("keep me\n")
    code, _, stderr = in_process(capsys, "audit", "export", "--home", home, "--output", existing)
    assert code == 2 and "already exists" in stderr
    assert existing.read_text() == "keep me\n"
    delete_record(home)
    out = tmp_path / "out.jsonl"
    code, _, stderr = export(home, out)
    assert code == 1 and "fails verification at record 6" in stderr
    assert not out.exists()


def test_export_bad_dates_are_bad_usage(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, stderr = export(home, tmp_path / "x.jsonl", "--since", "last tuesday")
    assert code == 2 and "ISO date" in stderr
    backwards = ("--since", "2024-05-03", "--until", "2024-05-01")
    argv = ("audit", "export", "--home", home, "--output", tmp_path / "x.jsonl", *backwards)
    code, _, stderr = in_process(capsys, *argv)
    assert code == 2 and "--since must come before --until" in stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_verify_runs_beside_the_service_and_export_asks_to_stop_it(
    home: Path, tmp_path: Path
) -> None:
    """verify takes no lock; export is recorded, so it needs the writer lock the service
    holds: one line saying what to do, exit 1, nothing written."""
    with (
        GalleryStore(home, KeyFileProvider(keys_dir(home))) as store,
        AuditLog.open(home, store.keyring) as log,
    ):
        log.append(event(11))
        code, report, stderr = verify(home)
        assert code == 0 and report["records"] == RECORDS + 1, stderr
        code, _, stderr = export(home, tmp_path / "live.jsonl")
        assert code == 1 and stderr.count("\n") == 1, stderr
        assert "edgeid serve" in stderr and "web UI's audit page" in stderr
        assert not (tmp_path / "live.jsonl").exists()
    assert verify(home)[1]["records"] == RECORDS + 1  # the refused export wrote no record


def test_an_anchor_export_catches_history_rewritten_with_the_device_key(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Someone with root and the device key can re-sign a rewritten chain, and verify alone
    then passes; an export oversight kept from before still tells."""
    anchor = tmp_path / "anchor.jsonl"
    code, _, stderr = in_process(capsys, "audit", "export", "--home", home, "--output", anchor)
    assert code == 0, stderr
    assert in_process(capsys, "audit", "verify", "--home", home, "--anchor", anchor)[0] == 0
    rebuild_chain(home, 6, flip_last_byte, signer=load_device_key(home))
    assert verified_here(home).status is VerifyStatus.OK  # the signatures are all good again
    code, report, stderr = verify(home, "--anchor", anchor)
    assert code == 1, stderr
    assert (report["reason"], report["first_bad_seq"]) == ("anchor_mismatch", 6)
