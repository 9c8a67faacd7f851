"""`edgeid audit verify|export`: check the tamper-evident audit log, export it for oversight.

``verify`` needs no key and no lock (it runs beside ``edgeid serve``) and reveals nothing but
counts, so it is not recorded. ``export`` reveals the records: it is recorded
(``audit_exported``, as ``os:<login>``, naming its filters) before the file is written, so it
holds the audit log's writer lock and needs the service stopped (or the web UI's audit page,
which records the same). It opens the keyring read-only and signs with the device key.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from datetime import date, datetime, time, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeid.cli import EXIT_FAILED, EXIT_OK, emit, path_arg
from edgeid.cli.options import Subparsers
from edgeid.runtime.audit import (
    AUDIT_KEY_SCOPE,
    AuditAction,
    RecordFilter,
    VerifyReport,
    VerifyStatus,
    audit_dir,
    export_log,
    verify_chain,
    verify_export,
)
from edgeid.runtime.audit.errors import AuditNotFoundError
from edgeid.runtime.audit.export import anchor_problem
from edgeid.runtime.audit.layout import CREATING_MARKER, LOG_FILE
from edgeid.runtime.compat import UTC, parse_iso_datetime
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.gallery.errors import GalleryError
from edgeid.runtime.identity.device_key import DeviceKeyError, fingerprint, load_device_key
from edgeid.runtime.storage.safe_read import MAX_TEXT_BYTES, check_output_path, read_user_file


def _moment(value: str, *, end_of_day: bool) -> datetime:
    """An ISO date or date-time; naive means UTC. A bare date as --until means its whole day."""
    try:
        day = date.fromisoformat(value)
    except ValueError:
        pass
    else:
        start = datetime.combine(day, time(0), tzinfo=UTC)
        return start + timedelta(days=1) if end_of_day else start
    try:
        moment = parse_iso_datetime(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO date or time such as 2024-05-01 or 2024-05-01T14:30Z, got {value!r}"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _since(value: str) -> datetime:
    return _moment(value, end_of_day=False)


def _until(value: str) -> datetime:
    return _moment(value, end_of_day=True)


def _public_key(args: argparse.Namespace) -> Ed25519PublicKey:
    """--public-key FILE (PEM), else the device key of --home."""
    if args.public_key is not None:
        try:
            pem = read_user_file(args.public_key, max_bytes=MAX_TEXT_BYTES, what="PEM key file")
            key = serialization.load_pem_public_key(pem)
        except ValueError as exc:
            raise BadInputError(
                f"cannot read a PEM public key from {args.public_key} ({exc}); give the "
                "device's public key file"
            ) from None
        if not isinstance(key, Ed25519PublicKey):
            raise BadInputError(f"{args.public_key} is not an ed25519 public key")
        return key
    try:
        return load_device_key(args.home_dir).public_key()
    except DeviceKeyError as exc:
        raise BadInputError(f"{exc}; or give --public-key FILE") from None


def _keyring_holds_audit_key(home: Path) -> bool:
    """Structural read of the keyring (no KEK needed): did this box ever have an audit log?"""
    from edgeid.runtime.vault.key_choice import keyring_path
    from edgeid.runtime.vault.keys import read_keyring

    path = keyring_path(home)
    if not path.exists() or (audit_dir(home) / CREATING_MARKER).exists():
        return False  # no keyring, or a crash while the first log was being made
    try:
        return bool(read_keyring(path)[1].get(AUDIT_KEY_SCOPE))
    except GalleryError:
        return False


def _where_bad(report: VerifyReport, first: str = "first bad ") -> str:
    # No bad record when only the signed head file is gone or bad: say that, not "record None".
    if report.first_bad_seq is None:
        return "the signed head (head.json)"
    return f"{first}record {report.first_bad_seq}"


def _verify_text(report: VerifyReport) -> str:
    if not report.ok:
        return f"audit log {report.status.upper()}: {_where_bad(report)}: " + (report.problem or "")
    text = (
        f"audit log OK: {report.records} records, {report.checkpoints} signed checkpoint(s), "
        f"head signed through record {report.head_seq} (key {report.key_fingerprint[:16]})"
    )
    if report.torn_tail_bytes:
        text += (
            f"; a torn tail of {report.torn_tail_bytes} bytes after record {report.records} "
            "(an append cut short by a crash, never acknowledged; dropped at the next start)"
        )
    if report.unsigned_records:
        text += (
            "; the last frame was written just before a crash and is not yet signed (signed "
            "at the next start)"
        )
    return text


def verify(args: argparse.Namespace) -> int:
    public_key = _public_key(args)
    directory = audit_dir(args.home_dir)
    report = verify_chain(directory, public_key, expect_log=_keyring_holds_audit_key(args.home_dir))
    if report.ok and args.anchor is not None:
        check = verify_export(args.anchor, public_key=public_key)
        problem = anchor_problem(directory, check)
        if problem is not None:
            report = replace(
                report, status=VerifyStatus.TAMPERED, first_bad_seq=problem[0],
                reason="anchor_mismatch", problem=problem[1],
            )  # fmt: skip
    emit(args, report.to_json(), _verify_text(report))
    if report.ok:
        return EXIT_OK
    print(
        f"edgeid: error: the audit log fails verification at {_where_bad(report, '')} "
        f"({report.reason}); keep {directory} unchanged as evidence",
        file=sys.stderr,
    )
    return EXIT_FAILED


def _check_file(args: argparse.Namespace) -> int:
    if args.fingerprint is not None:
        check = verify_export(args.verify_file, expected_fingerprint=args.fingerprint)
    else:
        check = verify_export(args.verify_file, public_key=_public_key(args))
    emit(
        args,
        check.to_json(),
        f"{check.path}: signature valid, {check.records} records, signed by device key "
        f"{check.key_fingerprint} ({check.device_id}, exported {check.exported_at})",
    )
    return EXIT_OK


def export(args: argparse.Namespace) -> int:
    if args.verify_file is not None:
        if args.output is not None or any(
            getattr(args, name) is not None for name in ("since", "until", "user", "case", "action")
        ):
            raise BadInputError("--verify-file takes no --output or filters; give one or the other")
        return _check_file(args)
    if args.output is None:
        raise BadInputError(
            "give --output FILE for the export (or --verify-file FILE to check one)"
        )
    if args.fingerprint is not None or args.public_key is not None:
        raise BadInputError("--fingerprint and --public-key go with --verify-file")
    if args.since and args.until and args.since >= args.until:
        raise BadInputError("--since must come before --until")
    from edgeid.cli.commands.accountable import open_audit_log
    from edgeid.runtime.audit.actor import os_actor
    from edgeid.runtime.audit.recorder import Recorder
    from edgeid.runtime.config.settings import load_settings
    from edgeid.runtime.vault.key_choice import keyring_path, provider_for
    from edgeid.runtime.vault.keys import Keyring

    home = args.home_dir
    directory = audit_dir(home)
    if not (directory / LOG_FILE).exists():  # never create a log only to export it
        raise AuditNotFoundError(f"no audit log under {directory}; check --home")
    if args.output.exists():  # refused before anything is recorded
        raise BadInputError(f"{args.output} already exists; choose another name or move it away")
    check_output_path(args.output, force=False)  # a dangling symlink is not written through
    settings = load_settings(home)
    # The keyring read-only (no galleries' lock); the audit log's writer lock for the record.
    keyring = Keyring.open(keyring_path(home), provider_for(home, settings.keys))
    signer = load_device_key(home)
    wanted = RecordFilter(args.user, args.case, args.action, args.since, args.until)
    hint = "stop it first, or export from the web UI's audit page"
    with open_audit_log(home, keyring, busy_hint=hint) as log:
        Recorder(log).record(
            os_actor(),
            AuditAction.AUDIT_EXPORTED,
            detail=f"{wanted.describe()}; to {args.output.name}",
        )
        summary = export_log(
            directory, keyring, signer, args.output, wanted=wanted,
            device_id=settings.device.device_id,
        )  # fmt: skip
    emit(
        args,
        summary.to_json(),
        f"exported {summary.records} of {summary.log_records} audit records to {summary.path}, "
        f"signed by device key {fingerprint(signer)}",
    )
    return EXIT_OK


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    audit = sub.add_parser("audit", help="verify and export the tamper-evident audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    key_help = "the device's ed25519 public key (PEM); default: the device key of --home"

    check = audit_sub.add_parser(
        "verify", parents=[common], help="check the hash chain and its signatures (no key needed)"
    )
    check.add_argument("--public-key", type=path_arg, metavar="FILE", help=key_help)
    check.add_argument(
        "--anchor",
        type=path_arg,
        metavar="EXPORT",
        help="also prove the log still extends what this earlier signed export saw",
    )
    check.set_defaults(handler=verify)

    out = audit_sub.add_parser(
        "export", parents=[common], help="write signed JSON lines for oversight, or check a file"
    )
    out.add_argument("--output", type=path_arg, metavar="FILE", help="the export to write")
    out.add_argument("--since", type=_since, help="from this ISO date/time (UTC if no zone)")
    out.add_argument("--until", type=_until, help="before this time; a bare date includes its day")
    out.add_argument("--user", help="only this user's records")
    out.add_argument("--case", help="only this case number's records")
    out.add_argument("--action", choices=[a.value for a in AuditAction], help="only this action")
    out.add_argument(
        "--verify-file", type=path_arg, metavar="FILE", help="check an export's signature instead"
    )
    out.add_argument("--public-key", type=path_arg, metavar="FILE", help=key_help)
    out.add_argument(
        "--fingerprint",
        metavar="HEX",
        help="trust the key embedded in the file only if its sha256 fingerprint is this",
    )
    out.set_defaults(handler=export)
