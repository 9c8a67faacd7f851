"""`edgeid update ...`: signed A/B updates.

Vendor side: ``keygen``, ``build``, ``sign``, ``verify --key``. On the box (as root, the
technician): ``trust``, ``verify``, ``install``, ``status``, ``commit``, ``rollback``, and
``resume``, which the unit runs at every start to finish an interrupted update.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from edgeid.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, emit, path_arg
from edgeid.cli.options import Subparsers
from edgeid.runtime.errors import EdgeidError
from edgeid.runtime.storage.safe_read import check_output_path
from edgeid.updater.bundle import build_bundle, sign_bundle
from edgeid.updater.manager import Result, UpdateManager
from edgeid.updater.signing import (
    TrustedKey,
    fingerprint,
    generate_key,
    load_private_key,
    load_public_key,
    trust_key,
)
from edgeid.updater.state import Kind, Outcome


def _manager(args: argparse.Namespace) -> UpdateManager:
    return UpdateManager.for_home(args.home_dir)


def keygen(args: argparse.Namespace) -> int:
    check_output_path(args.out)  # never a device, FIFO or symlink
    public = generate_key(args.out)
    key = load_public_key(public)
    payload = {"private_key": str(args.out), "public_key": str(public), "key": fingerprint(key)}
    emit(args, payload, f"signing key {args.out} (keep it secret), public key {public}")
    return EXIT_OK


def build(args: argparse.Namespace) -> int:
    check_output_path(args.out)
    manifest = build_bundle(args.payload, args.version, args.hardware, args.out)
    payload = {
        "bundle": str(args.out),
        "version": manifest.version,
        "hardware": manifest.hardware,
        "files": len(manifest.files),
        "bytes": manifest.total_bytes,
        "signed": False,
    }
    text = (
        f"built {args.out}: version {manifest.version} for {', '.join(manifest.hardware)}, "
        f"{len(manifest.files)} files, {manifest.total_bytes} bytes (unsigned; run edgeid "
        "update sign)"
    )
    emit(args, payload, text)
    return EXIT_OK


def sign(args: argparse.Namespace) -> int:
    key = load_private_key(args.key)
    out = args.out or args.bundle
    check_output_path(out)
    manifest = sign_bundle(args.bundle, key, out)
    payload = {"bundle": str(out), "version": manifest.version, "key": fingerprint(key)}
    emit(args, payload, f"signed {out} (version {manifest.version}) with key {fingerprint(key)}")
    return EXIT_OK


def verify(args: argparse.Namespace) -> int:
    manager = _manager(args)
    keys = [TrustedKey(args.key.name, load_public_key(args.key))] if args.key else None
    bundle = manager.verify(args.bundle, keys)
    manifest = bundle.manifest
    payload: dict[str, Any] = {
        "bundle": str(args.bundle),
        "valid": True,
        "version": manifest.version,
        "hardware": manifest.hardware,
        "created": manifest.created,
        "files": len(manifest.files),
        "bytes": manifest.total_bytes,
        "signer": bundle.signer.fingerprint,
    }
    text = (
        f"{args.bundle}: valid, version {manifest.version} for {', '.join(manifest.hardware)}, "
        f"{len(manifest.files)} files, signed by {bundle.signer.fingerprint}"
    )
    if not args.key:  # checked against this box's keys: also say whether it would install
        try:
            manager.check_installable(manifest)
            payload["installable"], payload["reason"] = True, None
        except EdgeidError as exc:
            payload["installable"], payload["reason"] = False, str(exc)
        text += "; installable here" if payload["installable"] else f"; {payload['reason']}"
    emit(args, payload, text)
    if payload.get("installable") is False:
        # Valid, but not for this box (other hardware, or not newer): a bundle install would
        # refuse is not a pass.
        print(f"edgeid: error: {args.bundle}: not installable here: {payload['reason']}",
              file=sys.stderr)  # fmt: skip
        return EXIT_BAD_INPUT
    return EXIT_OK


def _report(args: argparse.Namespace, result: Result | None, nothing: str) -> int:
    if result is None:
        emit(args, {"outcome": None}, nothing)
        return EXIT_OK
    state = result.state
    if result.outcome is Outcome.COMMITTED:
        back = "back on " if state.kind is Kind.ROLLBACK else ""
        text = f"{back}{state.to_version} committed on slot {state.to_slot} ({state.reason})"
    elif result.outcome is Outcome.ROLLED_BACK:
        where = f"{state.from_version} on slot {state.from_slot}" if state.from_slot else "none"
        text = f"rolled back to {where}: {state.reason}"
    else:
        text = (
            f"abandoned {state.to_version} ({state.reason}); slot {state.from_slot} "
            f"({state.from_version}) still runs"
        )
    emit(args, result.to_dict(), text)
    if result.ok:
        return EXIT_OK
    print(f"edgeid: error: update not applied: {text}", file=sys.stderr)
    return EXIT_FAILED


def install(args: argparse.Namespace) -> int:
    result = _manager(args).install(args.bundle, allow_downgrade=args.allow_downgrade)
    return _report(args, result, "")


def resume(args: argparse.Namespace) -> int:
    result = _manager(args).resume(at_start=args.at_start)
    if result is not None and result.outcome is Outcome.ABORTED:
        emit(args, result.to_dict(), f"interrupted update abandoned: {result.state.reason}")
        return EXIT_OK  # recovery succeeded: the box runs the version it ran before
    return _report(args, result, "nothing to resume")


def commit(args: argparse.Namespace) -> int:
    return _report(args, _manager(args).commit(), "nothing to commit: no update is on trial")


def rollback(args: argparse.Namespace) -> int:
    return _report(args, _manager(args).rollback(), "")


def status(args: argparse.Namespace) -> int:
    report = _manager(args).status()
    emit(args, report, _status_text(report))
    return EXIT_OK


def _status_text(report: dict[str, Any]) -> str:
    def slot(info: dict[str, Any] | None) -> str:
        if info is None:
            return "none"
        return f"{info['slot']} ({info['version'] or 'empty'})"

    lines = [
        f"active:   {slot(report['active'])}",
        f"inactive: {slot(report['inactive'])}",
        f"good:     {report['good'] or 'none'}",
        f"phase:    {report['phase']}",
        f"hardware: {report['hardware_id']}",
    ]
    last = report["last"]
    if last and last.get("outcome"):
        lines.append(f"last:     {last.get('to_version')} {last['outcome']} ({last.get('reason')})")
    if report.get("hint"):
        lines.append(report["hint"])
    return "\n".join(lines)


def trust(args: argparse.Namespace) -> int:
    target = trust_key(args.home_dir, args.public_key)
    key = load_public_key(target)
    emit(args, {"key": fingerprint(key), "path": str(target)}, f"trusting update key {target}")
    return EXIT_OK


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    update = sub.add_parser("update", help="signed A/B updates")
    actions = update.add_subparsers(dest="update_command", required=True, metavar="ACTION")

    def action(name: str, help_text: str, handler: Any) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, parents=[common], help=help_text)
        parser.set_defaults(handler=handler)
        return parser

    p = action("keygen", "create a vendor signing key (and KEY.pub)", keygen)
    p.add_argument("out", type=path_arg, metavar="KEY")
    p = action("build", "pack a payload folder into an unsigned bundle", build)
    p.add_argument("payload", type=path_arg, metavar="PAYLOAD_DIR")
    p.add_argument("--version", required=True, help="version of the payload, e.g. 1.4.0")
    p.add_argument(
        "--hardware", action="append", required=True, help="compatible hardware id (repeatable)"
    )
    p.add_argument("--out", type=path_arg, required=True, metavar="BUNDLE")
    p = action("sign", "sign a bundle with the vendor key", sign)
    p.add_argument("bundle", type=path_arg, metavar="BUNDLE")
    p.add_argument("--key", type=path_arg, required=True, help="PEM ed25519 private key")
    p.add_argument("--out", type=path_arg, default=None, help="default: sign in place")
    p = action("verify", "check a bundle's signature and payload hashes", verify)
    p.add_argument("bundle", type=path_arg, metavar="BUNDLE")
    p.add_argument(
        "--key", type=path_arg, default=None, help="public key to check against (default: "
        "the box's trusted keys in <home>/update-keys)"
    )  # fmt: skip
    p = action("install", "verify, write the inactive slot, switch, check, commit", install)
    p.add_argument("bundle", type=path_arg, metavar="BUNDLE")
    p.add_argument("--allow-downgrade", action="store_true", help="accept an older version")
    action("commit", "commit the slot on trial now", commit)
    action("rollback", "go back to the previous slot", rollback)
    action("status", "slots, versions and the update state", status)
    p = action("resume", "finish an interrupted update (run by the unit at start)", resume)
    p.add_argument("--at-start", action="store_true", help="called as the service starts")
    p = action("trust", "install a vendor public key on this box", trust)
    p.add_argument("public_key", type=path_arg, metavar="KEY.pub")
