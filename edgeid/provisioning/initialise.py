"""`edgeid provision init`: everything a box needs, in order, then a self-test.

1. device identity: the device id and site, and the ed25519 device key;
2. web certificate and 3. MQTT certificate: an ECDSA P-256 key each, with a CSR for the site CA,
   a self-signed certificate (``--self-signed``, a lab), or the CA's certificate installed;
4. gallery keys: the keyring's key-encryption key sealed by the best provider present;
5. configuration: ``edgeid.toml`` written with every path above, validated, read back;
6. first admin: when the box has no user, with a one-time password (the audit log and the
   accounts files are made here too);
7. models: those installed with the code (the package's or an update slot's), verified; else
   converted into the state directory (``edgeid models build``, the ``[models]`` extra);
8. TensorRT engines, where a GPU answers;
then ``selftest``.

Every input is checked before anything is written (``plan_init``), so bad input changes
nothing. Every step first looks at what is there and writes only what is missing or wrong, so
re-running init on a provisioned box writes no file and reports each step "already done".
"""

from __future__ import annotations

import datetime as dt
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from edgeid.models.build import build_models
from edgeid.provisioning.certificates import (
    CertRequest,
    ServicePaths,
    check_installable,
    existing_request,
    parse_names,
    provision_service,
    read_certificates,
    service_paths,
)
from edgeid.provisioning.config import updated, write_settings
from edgeid.provisioning.first_admin import DEFAULT_ADMIN, FirstAdmin, ensure_first_admin
from edgeid.provisioning.kek import best_sealer, choose_provider, ensure_keyring, keyring_info
from edgeid.provisioning.report import CheckResult, StepResult, StepStatus, first_clause, passed
from edgeid.provisioning.selftest import run_selftest
from edgeid.runtime.accounts.users import check_username
from edgeid.runtime.audit.layout import LOG_FILE, audit_dir
from edgeid.runtime.compat import UTC
from edgeid.runtime.config.settings import DeviceSettings, Settings, load_settings
from edgeid.runtime.errors import BadInputError, EdgeidError
from edgeid.runtime.identity.device_key import device_key_path, ensure_device_key, fingerprint
from edgeid.runtime.inference.backends import tensorrt_backend
from edgeid.runtime.inference.manifest import list_manifests, read_verified_model
from edgeid.runtime.inference.model_home import MODELS_DIR, models_dir
from edgeid.runtime.inference.pipeline import DETECTOR_NAMES, ENGINES_DIR, FacePipeline
from edgeid.runtime.storage.durable import make_private_dir, write_file_atomically
from edgeid.runtime.web.tls import TLS_DIR

MQTT_CA_FILE = "mqtt-ca.crt"
# The names edgeid init's certificate carries too (edgeid/runtime/web/tls.py), plus --web-name.
DEFAULT_WEB_NAMES = ("localhost", "127.0.0.1", "::1")
DEFAULT_BROKER_PORT = 8883  # MQTT over TLS
_HOSTNAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_BROKER = re.compile(
    r"^(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+))(?::(?P<port>\d+))?$"
)

Progress = Callable[[str], None]
Action = Callable[[], tuple[StepStatus, str]]


@dataclass(frozen=True)
class InitRequest:
    """What the technician asked for; None and empty mean "keep what is there"."""

    device_id: str | None = None
    site: str | None = None
    key_provider: str = "auto"
    tpm_tcti: str | None = None
    passphrase: str | None = None
    self_signed: bool = False
    web_names: tuple[str, ...] = ()
    web_cert: Path | None = None
    mqtt_cert: Path | None = None
    mqtt_ca: Path | None = None
    broker: str | None = None
    wheelhouse: Path | None = None
    selftest: bool = True
    admin: str = DEFAULT_ADMIN  # the first admin's name, used only while the box has no user
    web_host: str | None = None  # where the web UI listens (edgeid.toml's web section)
    web_port: int | None = None
    renew_web_cert: bool = False  # a new self-signed web certificate even if the old is good
    # False (edgeid init, the lab shortcut): models found are verified, none found is a skipped
    # step naming the command, never a conversion that needs the [models] extra.
    convert_models: bool = True


@dataclass(frozen=True)
class Plan:
    settings: Settings  # as they will be written
    identity_changed: bool
    web: ServicePaths
    web_request: CertRequest
    mqtt: ServicePaths
    mqtt_request: CertRequest
    mqtt_ca: Path  # where the broker's CA certificate is kept
    key_kind: str


@dataclass(frozen=True)
class InitResult:
    steps: list[StepResult]
    checks: list[CheckResult]  # the self-test; empty when it did not run
    first_admin: FirstAdmin | None = None  # its one-time password, shown once

    @property
    def ok(self) -> bool:
        return all(s.status is not StepStatus.FAILED for s in self.steps) and passed(self.checks)


# -- checking the request (nothing is written) ---------------------------------------------


def parse_broker(value: str) -> tuple[str, int]:
    match = _BROKER.fullmatch(value.strip())
    if not match:
        raise BadInputError(f"--broker {value!r} is not HOST or HOST:PORT; e.g. mqtt.site:8883")
    host = match["ip6"] or match["host"]
    return host, int(match["port"]) if match["port"] else DEFAULT_BROKER_PORT


def _has_identity(home: Path, current: Settings) -> bool:
    """A box with a device key has an identity: the one in edgeid.toml, or the defaults (a
    lab's, which edgeid.toml leaves unwritten)."""
    return "device_id" in current.device.model_fields_set or device_key_path(home).exists()


def _identity(current: Settings, req: InitRequest, configured: bool) -> tuple[str, str, bool]:
    device_id = req.device_id or (current.device.device_id if configured else None)
    site = req.site or (current.device.site if configured else None)
    if not device_id or not site:
        raise BadInputError("this box has no identity yet; give --device-id ID and --site SITE")
    try:
        DeviceSettings(device_id=device_id, site=site)
    except ValidationError as exc:
        field = str(exc.errors()[0]["loc"][0]).replace("_", "-")
        bad = device_id if field == "device-id" else site
        raise BadInputError(
            f"--{field} must be a lower-case slug (a-z, 0-9, '-', up to 63 characters), "
            f"e.g. box-07; got {bad!r}"
        ) from None
    # The defaults (dev-box at lab, a lab's) are not written to edgeid.toml, so compare values.
    changed = (device_id, site) != (current.device.device_id, current.device.site)
    return device_id, site, changed


def web_common_name(device_id: str) -> str:
    return f"edgeid {device_id}"  # as edgeid init names its certificate


def default_web_names() -> tuple[str, ...]:
    host = socket.gethostname().lower()
    return (*DEFAULT_WEB_NAMES, host) if _HOSTNAME.fullmatch(host) else DEFAULT_WEB_NAMES


def _tls_files(paths: ServicePaths) -> list[Path]:
    return [p for p in (paths.key, paths.csr, paths.cert) if p.exists()]


def refuse_lost_device_key(home: Path) -> None:
    """An audit log whose signing key is gone: a new key would sign on from there and every
    later ``audit verify`` would report the log TAMPERED. Refused before anything is written."""
    key = device_key_path(home)
    if (audit_dir(home) / LOG_FILE).exists() and not key.exists():
        raise EdgeidError(
            f"the audit log exists but its signing key {key} is gone; restore that file from "
            "the box's backup and run init again (nothing was changed)"
        )


def plan_init(home: Path, req: InitRequest, now: dt.datetime) -> Plan:
    """The settings to write and the files to make, after checking every input."""
    refuse_lost_device_key(home)
    current = load_settings(home)
    configured = _has_identity(home, current)
    device_id, site, identity_changed = _identity(current, req, configured)
    web = service_paths(home, "web", current.web.tls_key, current.web.tls_cert)
    mqtt = service_paths(home, "mqtt", current.telemetry.key_file, current.telemetry.cert_file)
    if configured and identity_changed and (_tls_files(web) or _tls_files(mqtt)):
        raise BadInputError(
            f"this box is provisioned as {current.device.site}/{current.device.device_id} and its "
            "certificates name it; run edgeid provision factory-reset --yes before changing it"
        )

    if req.web_names:
        dns, ips = parse_names(req.web_names)
        web_request = CertRequest(web_common_name(device_id), "server", dns, ips)
    else:
        web_request = existing_request(web, "server") or CertRequest(
            web_common_name(device_id), "server", *parse_names(default_web_names())
        )
    mqtt_request = CertRequest(f"{site}/{device_id}", "client")
    for source, paths in ((req.web_cert, web), (req.mqtt_cert, mqtt)):
        if source is not None:
            check_installable(source, paths, now)
    mqtt_ca = home / TLS_DIR / MQTT_CA_FILE
    if req.mqtt_ca is not None:
        read_certificates(req.mqtt_ca)

    keys = updated(current, {"keys": {"tpm_tcti": req.tpm_tcti}} if req.tpm_tcti else {}).keys
    existing = keyring_info(home)
    if existing is None:
        key_kind = choose_provider(keys, req.key_provider, req.passphrase)
    elif req.key_provider not in ("auto", existing.provider):
        raise BadInputError(
            f"the keyring is protected by a {existing.provider} key; to move it to "
            f"{req.key_provider} run edgeid provision rotate-keys --key-provider {req.key_provider}"
        )
    else:
        key_kind = existing.provider

    changes: dict[str, dict[str, object]] = {
        "device": {"device_id": device_id, "site": site},
        "keys": {"provider": key_kind, "tpm_tcti": keys.tpm_tcti},
    }
    web_changes: dict[str, object] = {}
    if req.web_cert or req.self_signed or web.cert.is_file():
        web_changes |= {"tls_key": str(web.key), "tls_cert": str(web.cert)}
    if req.web_host is not None:
        web_changes["host"] = req.web_host
    if req.web_port is not None:
        web_changes["port"] = req.web_port
    if web_changes:
        changes["web"] = web_changes
    telemetry: dict[str, object] = {}
    if req.mqtt_cert or req.self_signed or mqtt.cert.is_file():
        telemetry |= {"key_file": str(mqtt.key), "cert_file": str(mqtt.cert)}
    if req.mqtt_ca is not None or mqtt_ca.is_file():
        telemetry["ca_file"] = str(mqtt_ca)
    if req.broker is not None:
        telemetry["broker_host"], telemetry["broker_port"] = parse_broker(req.broker)
    broker_set = req.broker is not None or "broker_host" in current.telemetry.model_fields_set
    files = {
        k: telemetry.get(k) or getattr(current.telemetry, k)
        for k in ("ca_file", "cert_file", "key_file")
    }
    if broker_set and all(files.values()):
        telemetry["sink"] = "mqtt"  # every piece is there: report to the fleet broker
    changes["telemetry"] = telemetry
    return Plan(
        settings=updated(current, changes),
        identity_changed=identity_changed,
        web=web,
        web_request=web_request,
        mqtt=mqtt,
        mqtt_request=mqtt_request,
        mqtt_ca=mqtt_ca,
        key_kind=key_kind,
    )


# -- the steps ---------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file below ``folder``: did a step write anything there?"""
    if not folder.is_dir():
        return {}
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def _status(changed: bool) -> StepStatus:
    return StepStatus.DONE if changed else StepStatus.ALREADY


def _device(home: Path, plan: Plan) -> tuple[StepStatus, str]:
    created = not device_key_path(home).exists()
    key = ensure_device_key(home)
    device = plan.settings.device
    detail = f"{device.site}/{device.device_id}, ed25519 key {fingerprint(key)[:16]}"
    return _status(created or plan.identity_changed), detail


def _certificate(
    paths: ServicePaths,
    request: CertRequest,
    req: InitRequest,
    source: Path | None,
    now: dt.datetime,
    *,
    renew: bool = False,
) -> tuple[StepStatus, str]:
    done = provision_service(
        paths,
        request,
        self_signed=req.self_signed,
        install_from=source,
        now=now,
        renew=renew,
    )
    return (StepStatus.FAILED if done.failed else _status(done.changed)), done.detail


def _mqtt(plan: Plan, req: InitRequest, now: dt.datetime) -> tuple[StepStatus, str]:
    status, detail = _certificate(plan.mqtt, plan.mqtt_request, req, req.mqtt_cert, now)
    if status is StepStatus.FAILED:
        return status, detail
    if req.mqtt_ca is not None:
        data = req.mqtt_ca.read_bytes()
        if not (plan.mqtt_ca.is_file() and plan.mqtt_ca.read_bytes() == data):
            make_private_dir(plan.mqtt_ca.parent)
            write_file_atomically(plan.mqtt_ca, data, action="installing the broker's CA")
            status = StepStatus.DONE
        detail += "; broker CA installed"
    tel = plan.settings.telemetry
    if tel.sink == "mqtt":
        detail += f"; reports to {tel.broker_host}:{tel.broker_port}"
    return status, detail


def _keys(home: Path, plan: Plan, req: InitRequest) -> tuple[StepStatus, str]:
    keys = plan.settings.keys
    changed, detail = ensure_keyring(home, keys, plan.key_kind, req.passphrase)
    if plan.key_kind == "keyfile" and req.key_provider == "auto":
        sealer = best_sealer(keys)  # e.g. edgeid init made a key-file keyring before
        if sealer is not None:
            detail += (
                f"; seal it by {sealer} with: edgeid provision rotate-keys --key-provider {sealer}"
            )
    return _status(changed), detail


def _config(home: Path, plan: Plan) -> tuple[StepStatus, str]:
    changed = write_settings(home, plan.settings)
    return _status(changed), f"{home / 'edgeid.toml'} valid"


def _admin(home: Path, req: InitRequest, made: list[FirstAdmin]) -> tuple[StepStatus, str]:
    admin = ensure_first_admin(home, req.admin, passphrase=req.passphrase)
    made.append(admin)
    if admin.username is None:
        return StepStatus.ALREADY, "users exist already (edgeid users reset-password NAME)"
    return StepStatus.DONE, f"{admin.username}, one-time password below (change at first sign-in)"


def _models(home: Path, req: InitRequest, progress: Progress | None) -> tuple[StepStatus, str]:
    installed = models_dir(home)
    # The package's (or the update slot's) converted models, or the lab's own: verified only.
    if installed != home / MODELS_DIR or not req.convert_models:
        manifests = list_manifests(installed)
        if not manifests:
            return StepStatus.SKIPPED, (
                f"no models in {installed}; convert them with: edgeid models build --home {home}"
            )
        for manifest in manifests:
            read_verified_model(installed, manifest.name)
        return StepStatus.ALREADY, f"{len(manifests)} models installed in {installed}, verified"
    folder = home / MODELS_DIR
    before = _snapshot(folder)
    manifests = build_models(folder, req.wheelhouse or home / "wheelhouse", progress=progress)
    detail = f"{len(manifests)} models and the self-test reference in {folder}"
    return _status(_snapshot(folder) != before), detail


def _engines(home: Path) -> tuple[StepStatus, str]:
    try:
        platform = tensorrt_backend.probe()
    except tensorrt_backend.TensorRTUnavailableError as exc:
        return (
            StepStatus.SKIPPED,
            f"no GPU answers ({first_clause(exc)}); the models run on the CPU",
        )
    folder = home / ENGINES_DIR
    before = _snapshot(folder)
    for detector in DETECTOR_NAMES:
        pipeline = FacePipeline.load(models_dir(home), detector, backend="tensorrt")
        pipeline.close()  # only the cached engines were wanted; free them now
        if pipeline.backend_state != "tensorrt":
            return StepStatus.FAILED, f"{detector}: TensorRT fell back to the CPU; see the log"
    where = f"{platform.gpu_name}, TensorRT {platform.trt_version}, {platform.precision}"
    return _status(_snapshot(folder) != before), f"every model's engine cached for {where}"


def run_init(
    home: Path,
    req: InitRequest,
    *,
    now: dt.datetime | None = None,
    progress: Progress | None = None,
) -> InitResult:
    when = now or dt.datetime.now(UTC)
    check_username(req.admin)
    plan = plan_init(home, req, when)
    make_private_dir(home)
    admins: list[FirstAdmin] = []
    actions: list[tuple[str, Action]] = [
        ("device identity", lambda: _device(home, plan)),
        (
            "web certificate",
            lambda: _certificate(
                plan.web, plan.web_request, req, req.web_cert, when, renew=req.renew_web_cert
            ),
        ),
        ("mqtt certificate", lambda: _mqtt(plan, req, when)),
        ("gallery keys", lambda: _keys(home, plan, req)),
        ("configuration", lambda: _config(home, plan)),
        ("first admin", lambda: _admin(home, req, admins)),
        ("models", lambda: _models(home, req, progress)),
        ("TensorRT engines", lambda: _engines(home)),
    ]
    steps: list[StepResult] = []
    for name, action in actions:
        if steps and steps[-1].status in (StepStatus.FAILED, StepStatus.NOT_RUN):
            steps.append(StepResult(name, StepStatus.NOT_RUN, "an earlier step failed"))
            continue
        try:
            status, detail = action()
        except EdgeidError as exc:
            status, detail = StepStatus.FAILED, str(exc)
        steps.append(StepResult(name, status, detail))
    failed = any(s.status is StepStatus.FAILED for s in steps)
    checks = (
        []
        if failed or not req.selftest
        else run_selftest(home, passphrase=req.passphrase, now=when)
    )
    return InitResult(steps, checks, admins[0] if admins else None)
