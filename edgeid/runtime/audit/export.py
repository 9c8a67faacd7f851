"""Signed exports for oversight, and checking them anywhere.

An export is JSON lines::

    {"type": "header", "format": "edgeid-audit-export", "version": 1, "log_id", "device_id",
     "exported_at", "filters": {...}}
    {"type": "record", "seq", "time", "user", "role", "action", "case", "reason", "gallery",
     "probe_sha256", "candidates", "decision", "subject_id", "detail", "chain_hash"}   (each)
    {"type": "trailer", "records", "log_records", "log_frames", "log_chain_hash"}
    {"type": "signature", "algorithm": "ed25519", "key_fingerprint", "public_key_pem",
     "signature"}

The signature (base64) is ed25519 by the device key over the exact bytes of every line before
the signature line, so any tool that verifies ed25519 checks it (``openssl pkeyutl -verify
-rawin``). The embedded public key is a convenience: trust comes from comparing its
fingerprint (sha256 of the raw key) with the one registered for the box. The trailer's
``log_chain_hash`` anchors the whole log as it stood: ``edgeid audit verify --anchor`` later
proves the box's log still extends it.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeid.runtime.audit.errors import (
    AuditError,
    AuditInputError,
    AuditNotFoundError,
    AuditTamperedError,
    ExportSignatureError,
)
from edgeid.runtime.audit.frames import (
    HEADER_BYTES,
    BadFrameError,
    FrameKind,
    ScanState,
    parse_header,
    scan_frames,
)
from edgeid.runtime.audit.layout import AUDIT_KEY_SCOPE, LOG_FILE
from edgeid.runtime.audit.log import RecordFilter
from edgeid.runtime.audit.sealing import open_event
from edgeid.runtime.audit.signing import verifies
from edgeid.runtime.audit.verify import inspect_chain
from edgeid.runtime.identity.device_key import fingerprint, public_key_pem
from edgeid.runtime.storage.durable import write_file_atomically
from edgeid.runtime.vault.crypto import Clock, utc_now
from edgeid.runtime.vault.errors import VaultError
from edgeid.runtime.vault.keys import Keyring

EXPORT_FORMAT = "edgeid-audit-export"
EXPORT_VERSION = 1
MAX_EXPORT_BYTES = 2 << 30  # the signature covers the file as one message, held in memory


def _line(document: dict[str, object]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("ascii") + b"\n"


@dataclass(frozen=True)
class ExportSummary:
    path: Path
    records: int
    log_records: int
    key_fingerprint: str

    def to_json(self) -> dict[str, object]:
        return {
            "output": str(self.path),
            "records": self.records,
            "log_records": self.log_records,
            "key_fingerprint": self.key_fingerprint,
        }


def export_log(
    directory: Path,
    keyring: Keyring,
    signer: Ed25519PrivateKey,
    output: Path,
    *,
    wanted: RecordFilter,
    device_id: str,
    clock: Clock = utc_now,
) -> ExportSummary:
    """Verify the chain, decrypt the records ``wanted`` selects, and write a signed export.

    A log that fails verification is not exported (``AuditTamperedError``); an existing
    ``output`` is never overwritten.
    """
    if output.exists():
        raise AuditInputError(f"{output} already exists; choose another name or move it away")
    if not (directory / LOG_FILE).exists():
        raise AuditNotFoundError(f"no audit log under {directory}; check --home")
    wanted = wanted.normalised()
    report, state = inspect_chain(directory, signer.public_key())
    if not report.ok or state is None:
        raise AuditTamperedError(
            f"the audit log fails verification at record {report.first_bad_seq}: "
            f"{report.problem}; nothing was exported; run edgeid audit verify"
        )
    try:
        key = keyring.data_key(AUDIT_KEY_SCOPE, state.header.key_id.hex())
    except VaultError:
        raise AuditError(
            "the keyring holds no key for this audit log; restore the keyring from a backup"
        ) from None
    filters = {
        "since": wanted.since.isoformat() if wanted.since else None,
        "until": wanted.until.isoformat() if wanted.until else None,
        "user": wanted.user,
        "case": wanted.case,
        "action": str(wanted.action) if wanted.action else None,
    }
    if wanted.case_prefix:
        filters["case_prefix"] = wanted.case_prefix
    lines = [
        _line(
            {
                "type": "header",
                "format": EXPORT_FORMAT,
                "version": EXPORT_VERSION,
                "log_id": state.header.log_id.hex(),
                "device_id": device_id,
                "exported_at": clock().isoformat(),
                "filters": filters,
            }
        )
    ]
    last_hash = state.header.genesis_hash
    with open(directory / LOG_FILE, "rb") as stream:
        for frame in scan_frames(stream, ScanState(), end=state.valid_end):
            last_hash = frame.chain_hash
            if frame.kind != FrameKind.EVENT:
                continue
            record = open_event(key, state.header, frame)
            if wanted.matches(record):
                lines.append(
                    _line({"type": "record", **record.to_json(), "chain_hash": record.chain_hash})
                )
    if last_hash != state.chain_hash:
        raise AuditTamperedError("the audit log changed while it was exported; export again")
    lines.append(
        _line(
            {
                "type": "trailer",
                "records": len(lines) - 1,
                "log_records": state.seq,
                "log_frames": state.frames,
                "log_chain_hash": state.chain_hash.hex(),
            }
        )
    )
    signed = b"".join(lines)
    signature = _line(
        {
            "type": "signature",
            "algorithm": "ed25519",
            "key_fingerprint": fingerprint(signer),
            "public_key_pem": public_key_pem(signer),
            "signature": base64.b64encode(signer.sign(signed)).decode("ascii"),
        }
    )
    write_file_atomically(output, signed + signature, action="writing the audit export")
    return ExportSummary(output, len(lines) - 2, state.seq, fingerprint(signer))


# -- checking an export ----------------------------------------------------------------------


@dataclass(frozen=True)
class ExportCheck:
    """A verified export: who signed it and what it anchors."""

    path: Path
    records: int
    log_id: str
    device_id: str
    exported_at: str
    key_fingerprint: str
    log_frames: int
    log_chain_hash: str
    anchors: tuple[tuple[int, str], ...] = ()  # (seq, chain hash) of every exported record

    def to_json(self) -> dict[str, object]:
        return {
            "file": str(self.path),
            "signature": "valid",
            "records": self.records,
            "log_id": self.log_id,
            "device_id": self.device_id,
            "exported_at": self.exported_at,
            "key_fingerprint": self.key_fingerprint,
            "log_frames": self.log_frames,
            "log_chain_hash": self.log_chain_hash,
        }


def _not_export(path: Path, why: str) -> AuditInputError:
    return AuditInputError(f"{path} is not an edgeid audit export ({why}); check the file name")


def _json_line(path: Path, raw: bytes, number: int) -> dict[str, object]:
    try:
        document = json.loads(raw)
    except ValueError:
        raise _not_export(path, f"line {number} is not JSON") from None
    if not isinstance(document, dict):
        raise _not_export(path, f"line {number} is not a JSON object")
    return document


def verify_export(
    path: Path,
    *,
    public_key: Ed25519PublicKey | None = None,
    expected_fingerprint: str | None = None,
) -> ExportCheck:
    """Check an export's signature against ``public_key``, or against the key embedded in the
    file once its fingerprint equals ``expected_fingerprint``. ``ExportSignatureError`` when
    any byte before the signature line changed, or another key signed it."""
    if (public_key is None) == (expected_fingerprint is None):
        raise AuditInputError("give either the device's public key or its fingerprint")
    try:
        if path.stat().st_size > MAX_EXPORT_BYTES:
            raise _not_export(path, "larger than any export")
        data = path.read_bytes()
    except FileNotFoundError:
        raise AuditNotFoundError(f"no export file at {path}; check the path") from None
    if not data.endswith(b"\n") or data.count(b"\n") < 3:
        raise _not_export(path, "it needs a header, a trailer and a signature line")
    signed, _, sig_raw = data[:-1].rpartition(b"\n")
    signed += b"\n"
    sig_line = _json_line(path, sig_raw, data.count(b"\n"))
    if sig_line.get("type") != "signature" or sig_line.get("algorithm") != "ed25519":
        raise _not_export(path, "its last line is not an ed25519 signature")
    try:
        signature = base64.b64decode(str(sig_line.get("signature")), validate=True)
    except (binascii.Error, ValueError):
        raise _not_export(path, "the signature is not base64") from None
    claimed = str(sig_line.get("key_fingerprint"))
    if public_key is None:
        try:
            embedded = serialization.load_pem_public_key(str(sig_line["public_key_pem"]).encode())
        except (KeyError, ValueError):
            raise _not_export(path, "the embedded public key is unreadable") from None
        if not isinstance(embedded, Ed25519PublicKey) or fingerprint(embedded) != (
            (expected_fingerprint or "").lower()
        ):
            raise ExportSignatureError(
                f"{path} was signed by key {claimed[:16]}..., not the expected device "
                f"{(expected_fingerprint or '')[:16]}...; it did not come from that box"
            )
        public_key = embedded
    if fingerprint(public_key) != claimed:
        raise ExportSignatureError(
            f"{path} was signed by key {claimed[:16]}..., not the given key "
            f"{fingerprint(public_key)[:16]}...; check which box it came from"
        )
    if not verifies(public_key, signature, signed):
        raise ExportSignatureError(
            f"the signature of {path} does not verify: the file was changed after export"
        )
    return _read_signed(path, signed, claimed)


def _read_signed(path: Path, signed: bytes, key_fingerprint: str) -> ExportCheck:
    """The structure of a file whose signature verified (a mismatch here is our own bug)."""
    raw_lines = signed.splitlines()
    header = _json_line(path, raw_lines[0], 1)
    trailer = _json_line(path, raw_lines[-1], len(raw_lines))
    if (header.get("type"), header.get("format"), header.get("version")) != (
        "header", EXPORT_FORMAT, EXPORT_VERSION,
    ) or trailer.get("type") != "trailer":  # fmt: skip
        raise _not_export(path, f"not a {EXPORT_FORMAT} v{EXPORT_VERSION}")
    records = len(raw_lines) - 2
    if trailer.get("records") != records:
        raise _not_export(path, "its trailer counts another number of records")
    anchors = []
    for number, raw in enumerate(raw_lines[1:-1], 2):
        line = _json_line(path, raw, number)
        seq, chain_hash = line.get("seq"), line.get("chain_hash")
        if line.get("type") != "record" or not isinstance(seq, int):
            raise _not_export(path, f"line {number} is not a record")
        anchors.append((seq, str(chain_hash)))
    frames = trailer.get("log_frames")
    return ExportCheck(
        path=path,
        records=records,
        log_id=str(header.get("log_id")),
        device_id=str(header.get("device_id")),
        exported_at=str(header.get("exported_at")),
        key_fingerprint=key_fingerprint,
        log_frames=frames if isinstance(frames, int) else -1,
        log_chain_hash=str(trailer.get("log_chain_hash")),
        anchors=tuple(anchors),
    )


def anchor_problem(directory: Path, check: ExportCheck) -> tuple[int | None, str] | None:
    """Whether the log still extends what a verified export saw: every exported record's
    chain hash, and the whole chain as it stood then. ``(first bad seq, problem)`` or None.

    This catches a history rewritten even by someone holding the device key, as far back as
    the oldest export oversight kept.
    """
    wanted = dict(check.anchors)
    last_good = 0
    frames = 0
    with open(directory / LOG_FILE, "rb") as stream:
        try:
            header = parse_header(stream.read(HEADER_BYTES))
        except BadFrameError as exc:
            return 1, f"the audit log's {exc.reason}"
        if header.log_id.hex() != check.log_id:
            return None, f"the export is of another audit log ({check.log_id[:16]}...)"
        if check.log_frames <= 0:
            return None  # exported from an empty log: every log with its id extends it
        try:
            for frame in scan_frames(stream, ScanState()):
                frames += 1
                if frame.kind == FrameKind.EVENT and frame.seq in wanted:
                    if frame.chain_hash.hex() != wanted[frame.seq]:
                        return frame.seq, (
                            f"record {frame.seq} is not the record exported on "
                            f"{check.exported_at}: rewritten since"
                        )
                    last_good = frame.seq
                if frames == check.log_frames:
                    if frame.chain_hash.hex() != check.log_chain_hash:
                        return last_good + 1, (
                            f"the log no longer extends the chain exported on {check.exported_at}"
                            f": records after {last_good} were rewritten since"
                        )
                    return None
        except BadFrameError as exc:
            return last_good + 1, f"the {exc}"
    return last_good + 1, (
        f"the log holds fewer frames ({frames}) than when exported on {check.exported_at} "
        f"({check.log_frames}): records were cut off"
    )
