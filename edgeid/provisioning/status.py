"""`edgeid provision status`: what is provisioned on this box and what is missing, read-only.

Nothing here opens a key or loads a model: it reads files and says what it finds, with the
command that fixes each missing piece.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from edgeid.models.selftest_image import load_reference
from edgeid.provisioning.certificates import describe_cert, inspect, service_paths
from edgeid.provisioning.kek import keyring_info
from edgeid.provisioning.report import first_clause
from edgeid.runtime.compat import UTC, StrEnum
from edgeid.runtime.config.settings import Settings, config_path, load_settings
from edgeid.runtime.errors import EdgeidError
from edgeid.runtime.identity.device_key import device_key_path, fingerprint, load_device_key
from edgeid.runtime.inference.backends import tensorrt_backend
from edgeid.runtime.inference.backends.engine_cache import EngineCache
from edgeid.runtime.inference.manifest import list_manifests, read_verified_model
from edgeid.runtime.inference.model_home import models_dir
from edgeid.runtime.inference.pipeline import ENGINES_DIR

INIT = "edgeid provision init"


class State(StrEnum):
    OK = "ok"
    PENDING = "pending"  # started; waiting for someone (a CA to sign, a broker to configure)
    MISSING = "missing"
    PROBLEM = "problem"  # present but unusable
    NOT_APPLICABLE = "n/a"


@dataclass(frozen=True)
class Item:
    name: str
    state: State
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"item": self.name, "state": self.state.value, "detail": self.detail}


def _config(home: Path) -> tuple[Item, Settings]:
    path = config_path(home)
    try:
        settings = load_settings(home)
    except EdgeidError as exc:
        return Item("configuration", State.PROBLEM, str(exc)), Settings()
    if not path.exists():
        return Item("configuration", State.MISSING, f"no {path}; run {INIT}"), settings
    device = settings.device
    if "device_id" not in device.model_fields_set:
        return Item("configuration", State.MISSING, f"no device id in {path}; run {INIT}"), settings
    return Item("configuration", State.OK, f"{device.site}/{device.device_id} in {path}"), settings


def _device_key(home: Path) -> Item:
    if not device_key_path(home).exists():
        return Item("device key", State.MISSING, f"no {device_key_path(home)}; run {INIT}")
    try:
        key = load_device_key(home)
    except EdgeidError as exc:
        return Item("device key", State.PROBLEM, str(exc))
    return Item("device key", State.OK, f"ed25519, fingerprint {fingerprint(key)[:16]}")


def _certificate(
    home: Path, service: str, key: str | None, cert: str | None, now: dt.datetime
) -> Item:
    name = f"{service} certificate"
    paths = service_paths(home, service, key, cert)
    state = inspect(paths, now)
    if state.problem is not None:
        return Item(name, State.PROBLEM, state.problem)
    if state.cert is not None:
        if not (key and cert):
            return Item(
                name, State.PENDING, f"{paths.cert} present but not in edgeid.toml; run {INIT}"
            )
        return Item(name, State.OK, f"{paths.cert}, {describe_cert(state.cert)}")
    if state.csr_present:
        flag = "--web-cert" if service == "web" else "--mqtt-cert"
        return Item(
            name,
            State.PENDING,
            f"CSR {paths.csr} awaits the site CA; install the result with {INIT} {flag} FILE",
        )
    return Item(name, State.MISSING, f"no key or CSR; run {INIT}")


def _telemetry(settings: Settings) -> Item:
    tel = settings.telemetry
    if tel.sink == "mqtt":
        return Item("telemetry", State.OK, f"MQTT to {tel.broker_host}:{tel.broker_port} over TLS")
    if "broker_host" in tel.model_fields_set:
        missing = [k for k in ("ca_file", "cert_file", "key_file") if not getattr(tel, k)]
        return Item(
            "telemetry",
            State.PENDING,
            f"broker {tel.broker_host}:{tel.broker_port} set; missing {', '.join(missing)} "
            f"({INIT} --mqtt-cert FILE --mqtt-ca FILE)",
        )
    return Item("telemetry", State.NOT_APPLICABLE, f"sink {tel.sink!r} (no broker configured)")


def _keys(home: Path) -> Item:
    try:
        info = keyring_info(home)
    except EdgeidError as exc:
        return Item("gallery keys", State.PROBLEM, str(exc))
    if info is None:
        return Item("gallery keys", State.MISSING, f"no keyring; run {INIT}")
    others = f", other scopes: {', '.join(info.other_scopes)}" if info.other_scopes else ""
    return Item(
        "gallery keys",
        State.OK,
        f"{info.provider} key-encryption key {info.kek_id[:8]} (made {info.created_at[:10]}), "
        f"{info.galleries} gallery data key scope(s){others}",
    )


def _models(home: Path) -> list[Item]:
    folder = models_dir(home)
    try:
        manifests = list_manifests(folder)
        for manifest in manifests:
            read_verified_model(folder, manifest.name)
    except EdgeidError as exc:
        return [Item("models", State.PROBLEM, str(exc))]
    if not manifests:
        return [
            Item("models", State.MISSING, f"none in {folder}; run {INIT} (or edgeid models build)")
        ]
    items = [Item("models", State.OK, f"{len(manifests)} verified in {folder}")]
    try:
        reference = load_reference(folder)
        faces = sum(len(f) for f in reference.detectors.values())
        items.append(
            Item(
                "self-test reference", State.OK, f"{reference.image_file}, {faces} expected face(s)"
            )
        )
    except EdgeidError as exc:
        items.append(Item("self-test reference", State.MISSING, str(exc)))
    return items


def _engines(home: Path) -> Item:
    try:
        platform = tensorrt_backend.probe()
    except tensorrt_backend.TensorRTUnavailableError as exc:
        return Item(
            "TensorRT engines", State.NOT_APPLICABLE, f"no GPU answers ({first_clause(exc)})"
        )
    cache = EngineCache(home / ENGINES_DIR)
    try:
        onnx = [m for m in list_manifests(models_dir(home)) if m.format == "onnx"]
    except EdgeidError as exc:
        return Item("TensorRT engines", State.PROBLEM, str(exc))
    missing = [
        m.name
        for m in onnx
        if not cache.engine_path(platform.engine_key(m.sha256, m.name)).is_file()
    ]
    where = f"{platform.gpu_name}, TensorRT {platform.trt_version}"
    if missing or not onnx:
        return Item(
            "TensorRT engines",
            State.MISSING,
            f"{len(missing)} of {len(onnx)} not built for {where}; run {INIT}",
        )
    return Item("TensorRT engines", State.OK, f"{len(onnx)} cached for {where}")


def box_status(home: Path, now: dt.datetime | None = None) -> list[Item]:
    when = now or dt.datetime.now(UTC)
    config, settings = _config(home)
    web, tel = settings.web, settings.telemetry
    return [
        config,
        _device_key(home),
        _certificate(home, "web", web.tls_key, web.tls_cert, when),
        _certificate(home, "mqtt", tel.key_file, tel.cert_file, when),
        _telemetry(settings),
        _keys(home),
        *_models(home),
        _engines(home),
    ]


def complete(items: list[Item]) -> bool:
    return all(i.state in (State.OK, State.NOT_APPLICABLE) for i in items)
