"""`edgeid init`: the lab shortcut to ``edgeid provision init``.

The same steps (``edgeid.provisioning.initialise.run_init``) with a lab's defaults: the
identity already in ``edgeid.toml`` (else ``dev-box`` at site ``lab``), self-signed web and
MQTT certificates, a key-file keyring unless one exists, the models verified where they are
(never converted here), no self-test. Re-running it keeps what exists. A real box runs
``edgeid provision init`` with its own identity, its site CA's certificates and a TPM.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from edgeid.cli import EXIT_FAILED, EXIT_OK, emit
from edgeid.cli.options import Subparsers
from edgeid.provisioning.first_admin import DEFAULT_ADMIN
from edgeid.provisioning.initialise import InitRequest, InitResult, default_web_names, run_init
from edgeid.provisioning.kek import keyring_info
from edgeid.provisioning.report import StepStatus
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.identity.device_key import device_key_path, fingerprint, load_device_key
from edgeid.runtime.web.server import web_url
from edgeid.runtime.web.tls import certificate_sha256


def lab_request(home: Path, args: argparse.Namespace) -> InitRequest:
    current = load_settings(home)
    return InitRequest(
        device_id=current.device.device_id,
        site=current.device.site,
        key_provider="auto" if keyring_info(home) else "keyfile",
        self_signed=True,
        web_names=(*default_web_names(), *args.address) if args.address else (),
        selftest=False,
        admin=args.admin,
        web_host=args.host,
        web_port=args.port,
        renew_web_cert=args.renew_cert,
        convert_models=False,
    )


def run(args: argparse.Namespace) -> int:
    home = args.home_dir
    # The last part only: its parent must exist (checked by the CLI), so a mistyped path
    # is refused instead of growing a tree somewhere unexpected.
    os.makedirs(home, mode=0o700, exist_ok=True)
    result = run_init(home, lab_request(home, args))
    report = _report(home, result)
    emit(args, report, _text(home, result, report))
    return EXIT_OK if result.ok else EXIT_FAILED


def _step(result: InitResult, name: str) -> StepStatus | None:
    return next((s.status for s in result.steps if s.name == name), None)


def _report(home: Path, result: InitResult) -> dict[str, object]:
    settings = load_settings(home)
    cert = Path(settings.web.tls_cert) if settings.web.tls_cert else None
    admin = result.first_admin
    password = admin.one_time_password if admin else None
    return {
        "home": str(home),
        "url": web_url(settings),
        "tls_cert": str(cert) if cert else None,
        "tls_cert_sha256": certificate_sha256(cert) if cert and cert.is_file() else None,
        "tls_cert_created": _step(result, "web certificate") is StepStatus.DONE,
        # Read, never made here: the device step made it, or failed and the report says so.
        "device_key_fingerprint": (
            fingerprint(load_device_key(home)) if device_key_path(home).exists() else None
        ),
        "admin": admin.username if admin and password else None,
        "one_time_password": password,
        "steps": [step.to_json() for step in result.steps],
    }


def _text(home: Path, result: InitResult, report: dict[str, object]) -> str:
    lines = [f"{s.name}: {s.status.value} ({s.detail})" for s in result.steps]
    if not result.ok:
        return "\n".join([*lines, f"edgeid init stopped in {home}: see the failed step above"])
    lines += [
        f"edgeid initialised in {home} (lab defaults; a real box runs edgeid provision init)",
        f"web UI: {report['url']} (certificate SHA-256 {report['tls_cert_sha256']})",
    ]
    if report["one_time_password"]:
        lines.append(
            f"first admin: {report['admin']}, one-time password (shown once, must be changed "
            f"at first sign-in): {report['one_time_password']}"
        )
    else:
        lines.append("users exist already: no admin created (edgeid users reset-password NAME)")
    return "\n".join(lines)


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    init = sub.add_parser(
        "init",
        parents=[common],
        help="lab shortcut to provision init: self-signed certificates, key file, first admin",
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
