"""`edgeid init`: make a box ready for its first sign-in.

Creates what is missing and keeps what exists, so it can be re-run: the device key, the
HTTPS certificate (written into edgeid.toml's web section), the galleries' keyring and the
audit log, and, when the box has no user yet, the first admin with a one-time password that
must be changed at first sign-in.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from edgeid.cli import EXIT_OK, emit
from edgeid.cli.options import Subparsers
from edgeid.provisioning.first_admin import DEFAULT_ADMIN, ensure_first_admin
from edgeid.runtime.accounts.users import check_username
from edgeid.runtime.audit.layout import LOG_FILE, audit_dir
from edgeid.runtime.config.settings import load_settings, save_settings
from edgeid.runtime.errors import EdgeidError
from edgeid.runtime.identity.device_key import device_key_path, ensure_device_key, fingerprint
from edgeid.runtime.web.server import web_url
from edgeid.runtime.web.tls import certificate_sha256, make_certificate


def run(args: argparse.Namespace) -> int:
    home = args.home_dir
    check_username(args.admin)
    _refuse_lost_device_key(home)
    # The last part only: its parent must exist (checked by the CLI), so a mistyped path
    # is refused instead of growing a tree somewhere unexpected.
    os.makedirs(home, mode=0o700, exist_ok=True)
    settings = load_settings(home)
    key = ensure_device_key(home)

    web = settings.web
    changes: dict[str, object] = {}
    if args.host is not None:
        changes["host"] = args.host
    if args.port is not None:
        changes["port"] = args.port
    made_cert = False
    if args.renew_cert or not (web.tls_cert and web.tls_key):
        files = make_certificate(
            home, device_id=settings.device.device_id, addresses=[*args.address, args.host or ""]
        )
        changes |= {"tls_cert": str(files.cert), "tls_key": str(files.key)}
        made_cert = True
    if changes:
        settings = settings.model_copy(update={"web": web.model_copy(update=changes)})
        save_settings(home, settings)
    cert = Path(settings.web.tls_cert) if settings.web.tls_cert else None

    # The same step as provision init's: creates the keyring, audit log and accounts key on
    # first use, and the first admin when the box has no user.
    password = ensure_first_admin(home, args.admin).one_time_password
    result = {
        "home": str(home),
        "url": web_url(settings),
        "tls_cert": str(cert) if cert else None,
        "tls_cert_sha256": certificate_sha256(cert) if cert else None,
        "tls_cert_created": made_cert,
        "device_key_fingerprint": fingerprint(key),
        "admin": args.admin if password else None,
        "one_time_password": password,
    }
    lines = [
        f"edgeid initialised in {home}",
        f"web UI: {result['url']} (certificate SHA-256 {result['tls_cert_sha256']})",
    ]
    if password:
        lines.append(
            f"first admin: {args.admin}, one-time password (shown once, must be changed at "
            f"first sign-in): {password}"
        )
    else:
        lines.append("users exist already: no admin created (edgeid users reset-password NAME)")
    emit(args, result, "\n".join(lines))
    return EXIT_OK


def _refuse_lost_device_key(home: Path) -> None:
    """An audit log whose signing key is gone: a new key would sign on from there and every
    later ``audit verify`` would report the log TAMPERED. Refused before anything is written."""
    key = device_key_path(home)
    if (audit_dir(home) / LOG_FILE).exists() and not key.exists():
        raise EdgeidError(
            f"the audit log exists but its signing key {key} is gone; restore that file from "
            "the box's backup and run edgeid init again (nothing was changed)"
        )


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    init = sub.add_parser(
        "init", parents=[common], help="first admin, HTTPS certificate, keys and audit log"
    )
    init.add_argument("--admin", default=DEFAULT_ADMIN, help="the first admin's user name")
    init.add_argument("--host", help="address the web UI listens on (saved in edgeid.toml)")
    init.add_argument("--port", type=int, help="its port (saved in edgeid.toml)")
    init.add_argument(
        "--address",
        action="append",
        default=[],
        help="a name or IP the office reaches the box by, for the certificate (repeat)",
    )
    init.add_argument("--renew-cert", action="store_true", help="make a new HTTPS certificate")
    init.set_defaults(handler=run)
