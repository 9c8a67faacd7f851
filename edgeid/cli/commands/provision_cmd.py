"""`edgeid provision init|selftest|status|factory-reset|rotate-keys`: the technician's tools.

Stop `edgeid serve` before `init` creates the keyring, before `rotate-keys` and before
`factory-reset`: each takes the galleries' writer lock. `selftest` and `status` may run beside
the service.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeid.cli import EXIT_FAILED, EXIT_OK, emit, path_arg
from edgeid.cli.options import Subparsers
from edgeid.provisioning.config import updated, write_settings
from edgeid.provisioning.first_admin import DEFAULT_ADMIN
from edgeid.provisioning.kek import (
    NEW_PASSPHRASE_ENV,
    PASSPHRASE_ENV,
    PROVIDER_CHOICES,
    check_new_passphrase,
    keyring_info,
    read_passphrase,
    rotate,
)
from edgeid.provisioning.report import checks_table, passed, steps_table
from edgeid.runtime.config.settings import load_settings
from edgeid.runtime.errors import BadInputError


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def init(args: argparse.Namespace) -> int:
    from edgeid.provisioning.initialise import InitRequest, run_init

    request = InitRequest(
        device_id=args.device_id,
        site=args.site,
        key_provider=args.key_provider,
        tpm_tcti=args.tpm_tcti,
        passphrase=read_passphrase(args.passphrase_file, PASSPHRASE_ENV),
        self_signed=args.self_signed,
        web_names=tuple(args.web_name or ()),
        web_cert=args.web_cert,
        mqtt_cert=args.mqtt_cert,
        mqtt_ca=args.mqtt_ca,
        broker=args.broker,
        wheelhouse=args.wheelhouse,
        selftest=not args.no_selftest,
        admin=args.admin,
    )
    result = run_init(args.home_dir, request, progress=None if args.json else _progress)
    text = steps_table(result.steps)
    if result.checks:
        text += "\n\nself-test\n" + checks_table(result.checks)
    admin = result.first_admin
    if admin is not None and admin.username is not None:
        text += (
            f"\n\nfirst admin: {admin.username}, one-time password (shown once, must be "
            f"changed at first sign-in): {admin.one_time_password}"
        )
    text += "\n\n" + ("provisioned" if result.ok else "NOT provisioned: see the failed lines")
    payload = {
        "ok": result.ok,
        "steps": [s.to_json() for s in result.steps],
        "selftest": [c.to_json() for c in result.checks],
        "admin": admin.username if admin else None,
        "one_time_password": admin.one_time_password if admin else None,
    }
    emit(args, payload, text)
    return EXIT_OK if result.ok else EXIT_FAILED


def selftest(args: argparse.Namespace) -> int:
    from edgeid.provisioning.selftest import run_selftest

    passphrase = read_passphrase(args.passphrase_file, PASSPHRASE_ENV)
    checks = run_selftest(args.home_dir, passphrase=passphrase)
    ok = passed(checks)
    text = checks_table(checks) + "\n\n" + ("self-test passed" if ok else "self-test FAILED")
    emit(args, {"ok": ok, "checks": [c.to_json() for c in checks]}, text)
    return EXIT_OK if ok else EXIT_FAILED


def status(args: argparse.Namespace) -> int:
    from edgeid.provisioning.report import table
    from edgeid.provisioning.status import box_status, complete

    items = box_status(args.home_dir)
    done = complete(items)
    text = table([(i.name, i.state.value, i.detail) for i in items], ("item", "state", "detail"))
    text += "\n\n" + ("fully provisioned" if done else "not fully provisioned")
    emit(args, {"complete": done, "items": [i.to_json() for i in items]}, text)
    return EXIT_OK


def factory_reset(args: argparse.Namespace) -> int:
    from edgeid.provisioning.reset import factory_reset as reset

    if not args.yes:
        raise BadInputError(
            f"factory-reset erases every gallery, key and certificate under {args.home_dir} for "
            "good; add --yes"
        )
    report = reset(args.home_dir, everything=args.all)
    kept = f"; kept {', '.join(report.kept)}" if report.kept else ""
    text = (
        f"{report.kek}; {report.files_erased} file(s) ({report.bytes_erased} bytes) zero-filled "
        f"and removed{kept}"
    )
    emit(args, report.to_json(), text)
    return EXIT_OK


def rotate_keys(args: argparse.Namespace) -> int:
    settings = load_settings(args.home_dir)
    current = keyring_info(args.home_dir)
    if current is None:
        raise BadInputError(f"no keyring under {args.home_dir}; run edgeid provision init first")
    kind = args.key_provider or current.provider
    passphrase = read_passphrase(args.passphrase_file, PASSPHRASE_ENV)
    new_passphrase = None
    if kind == "passphrase":
        new_passphrase = check_new_passphrase(
            read_passphrase(args.new_passphrase_file, NEW_PASSPHRASE_ENV),
            f"--new-passphrase-file or ${NEW_PASSPHRASE_ENV}",
        )
    tcti = {"tpm_tcti": args.tpm_tcti} if args.tpm_tcti else {}
    wanted = updated(settings, {"keys": {"provider": kind, **tcti}})
    done = rotate(
        args.home_dir,
        settings.keys,
        kind,
        passphrase=passphrase,
        new_passphrase=new_passphrase,
        new_keys=wanted.keys,
    )
    if wanted.keys != settings.keys:
        write_settings(args.home_dir, wanted)
    payload = {
        "old_provider": done.old_provider,
        "old_kek_id": done.old_kek_id,
        "provider": done.new_provider,
        "kek_id": done.new_kek_id,
        "data_keys_rewrapped": done.data_keys,
    }
    text = (
        f"{done.data_keys} data key(s) re-wrapped under a new {done.new_provider} key "
        f"{done.new_kek_id[:8]}; the old {done.old_provider} key {done.old_kek_id[:8]} is "
        "destroyed and opens nothing"
    )
    emit(args, payload, text)
    return EXIT_OK


def _passphrase_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--passphrase-file",
        type=path_arg,
        help=f"file whose first line is the gallery passphrase (or ${PASSPHRASE_ENV})",
    )


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    provision = sub.add_parser("provision", help="set up, check, rotate or reset this box")
    actions = provision.add_subparsers(dest="provision_command", required=True, metavar="ACTION")

    p = actions.add_parser(
        "init",
        parents=[common],
        help="identity, certificates, keys, config, models, engines, then a self-test",
    )
    p.add_argument("--device-id", help="this box's id, a slug (required the first time)")
    p.add_argument("--site", help="the site's id, a slug (required the first time)")
    p.add_argument(
        "--key-provider",
        choices=PROVIDER_CHOICES,
        default="auto",
        help="sealer of the gallery key-encryption key (auto: TPM2, then systemd-creds, then "
        "a passphrase; keyfile for a lab box)",
    )
    p.add_argument("--tpm-tcti", help="TPM to use, e.g. device:/dev/tpmrm0")
    _passphrase_file(p)
    p.add_argument(
        "--self-signed", action="store_true", help="lab: self-signed certificates, not CSRs"
    )
    p.add_argument(
        "--web-name",
        action="append",
        metavar="NAME",
        help="DNS name or IP the web UI is reached by (repeatable; default: localhost, "
        "127.0.0.1, ::1 and this host's name, or the names of the certificate already there)",
    )
    p.add_argument("--web-cert", type=path_arg, help="install the site CA's web certificate")
    p.add_argument("--mqtt-cert", type=path_arg, help="install the site CA's MQTT certificate")
    p.add_argument("--mqtt-ca", type=path_arg, help="CA certificate of the fleet broker")
    p.add_argument("--broker", metavar="HOST[:PORT]", help="fleet MQTT broker (port 8883)")
    p.add_argument("--wheelhouse", type=Path, help="folder with the pinned wheels (models)")
    p.add_argument(
        "--admin",
        default=DEFAULT_ADMIN,
        help="the first admin's user name (made only while the box has no user)",
    )
    p.add_argument(
        "--no-selftest", action="store_true", help="skip the closing self-test (run it later)"
    )
    p.set_defaults(handler=init)

    p = actions.add_parser(
        "selftest", parents=[common], help="known image through the pipeline; keys, storage, broker"
    )
    _passphrase_file(p)
    p.set_defaults(handler=selftest)

    p = actions.add_parser("status", parents=[common], help="what is provisioned, what is missing")
    p.set_defaults(handler=status)

    p = actions.add_parser(
        "factory-reset", parents=[common], help="crypto-erase the keys, then remove all state"
    )
    p.add_argument("--yes", action="store_true", help="confirm: nothing can be recovered after")
    p.add_argument("--all", action="store_true", help="also remove models, engines, wheelhouse")
    p.set_defaults(handler=factory_reset)

    p = actions.add_parser(
        "rotate-keys", parents=[common], help="new key-encryption key; data keys re-wrapped"
    )
    p.add_argument(
        "--key-provider",
        choices=PROVIDER_CHOICES[1:],
        help="provider of the new key (default: the keyring's present provider)",
    )
    p.add_argument("--tpm-tcti", help="TPM for a new tpm2 key, e.g. device:/dev/tpmrm0")
    _passphrase_file(p)
    p.add_argument(
        "--new-passphrase-file",
        type=path_arg,
        help=f"file whose first line is the new passphrase (or ${NEW_PASSPHRASE_ENV})",
    )
    p.set_defaults(handler=rotate_keys)
