"""A real Mosquitto broker for the telemetry and fleet tests, with TLS and per-device ACLs.

Certificates are made here with ``cryptography``: one CA for the fleet, a server certificate
for 127.0.0.1, and a client certificate per identity, plus a second, unrelated CA whose
certificates the broker must refuse.

Identity scheme: Mosquitto takes the client certificate's common name as the user name
(``use_identity_as_username``). A device's CN is ``<site>/<device>``, so the single ACL pattern
``pattern write edgeid/%u/#`` lets each device write under its own topic and nowhere else
(Mosquitto substitutes ``%u`` into the pattern and refuses user names holding ``+`` or ``#``;
site and device ids are slugs, ``[a-z0-9-]``). The fleet manager and the test observer have
their own CNs with read-only rules; anything not granted is denied.

tests/conftest.py loads this module as a plugin (fixtures ``pki`` and ``broker``); test modules
import ``Broker``, ``Recorder`` and the helpers from it.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from benchmarks.fleet_pki import issue_leaf
from edgeid.runtime.compat import UTC
from edgeid.runtime.config.settings import (
    DeviceSettings,
    Settings,
    TelemetrySettings,
    save_settings,
)

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto")
REPO_ROOT = Path(__file__).resolve().parent.parent
SITE = "lab"
KEEPALIVE_S = 5  # the smallest the settings accept: keeps the keepalive tests short
FLEET_CN = "fleet-manager"
OBSERVER_CN = "observer"
# Generous bound for anything the tests wait on; no test asserts on how long a step took.
WAIT_S = 30.0


def mosquitto_path() -> str:
    """The broker binary; skip when absent, except under CI, where absence fails the run."""
    found = shutil.which("mosquitto") or next(
        (p for p in MOSQUITTO_CANDIDATES if os.access(p, os.X_OK)), None
    )
    if found:
        return found
    message = "mosquitto not found (apt-get install mosquitto); the MQTT tests need a real broker"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- certificates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path


@dataclass
class Authority:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    path: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_authority(folder: Path, name: str) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = folder / f"{name}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Authority(name, key, cert, path)


def issue(authority: Authority, folder: Path, cn: str, *, server: bool = False) -> Identity:
    key, cert = issue_leaf(
        authority.key, authority.cert, cn, server=server, valid=dt.timedelta(days=1)
    )
    stem = cn.replace("/", "_")
    cert_path = folder / f"{authority.name}-{stem}.crt"
    key_path = folder / f"{authority.name}-{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return Identity(cert_path, key_path)


@dataclass
class Pki:
    """The fleet CA with its server, fleet and observer identities, and a foreign CA."""

    folder: Path
    ca: Authority
    foreign: Authority
    server: Identity
    fleet: Identity
    observer: Identity
    _devices: dict[str, Identity] = field(default_factory=dict)

    @classmethod
    def create(cls, folder: Path) -> Pki:
        folder.mkdir(parents=True, exist_ok=True)
        ca = make_authority(folder, "fleet-ca")
        foreign = make_authority(folder, "foreign-ca")
        return cls(
            folder=folder,
            ca=ca,
            foreign=foreign,
            server=issue(ca, folder, "broker", server=True),
            fleet=issue(ca, folder, FLEET_CN),
            observer=issue(ca, folder, OBSERVER_CN),
        )

    def device(self, site: str, device: str) -> Identity:
        """The client certificate of ``<site>/<device>``, issued once by the fleet CA."""
        cn = f"{site}/{device}"
        if cn not in self._devices:
            self._devices[cn] = issue(self.ca, self.folder, cn)
        return self._devices[cn]

    def foreign_device(self, site: str, device: str) -> Identity:
        """A certificate with a device's CN, signed by a CA the broker does not trust."""
        return issue(self.foreign, self.folder, f"{site}/{device}")


# -- the broker ------------------------------------------------------------------------------

ACL = f"""\
# Devices: CN "<site>/<device>" writes under edgeid/<site>/<device>/ only.
pattern write edgeid/%u/#

user {FLEET_CN}
topic read edgeid/#
topic write homeassistant/#

user {OBSERVER_CN}
topic read #
"""


class Broker:
    """Mosquitto on a free loopback port: TLS only, client certificates required."""

    def __init__(self, pki: Pki, folder: Path) -> None:
        self.binary = mosquitto_path()
        self.pki = pki
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "acl").write_text(ACL)
        # "user": started as root, Mosquitto would switch to the "mosquitto" user, which cannot
        # read pytest's private temporary folders; it runs as whoever runs the tests.
        (folder / "mosquitto.conf").write_text(
            f"""\
per_listener_settings false
user {getpass.getuser()}
allow_anonymous false
persistence false
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
acl_file {folder / "acl"}
listener {self.port} 127.0.0.1
cafile {pki.ca.path}
certfile {pki.server.cert}
keyfile {pki.server.key}
require_certificate true
use_identity_as_username true
"""
        )

    @property
    def log(self) -> str:
        path = self.folder / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        assert self.process is None, "broker already running"
        log = (self.folder / "mosquitto.log").open("ab")
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.folder / "mosquitto.conf")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited at start:\n{self.log}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on port {self.port}:\n{self.log}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(pki: Pki, tmp_path: Path) -> Iterator[Broker]:
    running = Broker(pki, tmp_path / "broker")
    running.start()
    try:
        yield running
    finally:
        running.stop()


# -- an MQTT client for the tests ------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool


class Recorder:
    """A client that records every message on its subscriptions; reconnects on its own."""

    def __init__(
        self, broker: Broker, identity: Identity, topics: tuple[str, ...] = ("#",)
    ) -> None:
        self.messages: list[Received] = []
        self._topics = topics
        self._cond = threading.Condition()
        self._subscribed = 0
        self.client = client_for(broker, identity, client_id=f"recorder-{id(self)}")
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1.0)
        self.client.connect_async("127.0.0.1", broker.port, keepalive=10)
        self.client.loop_start()
        self.wait_subscribed(1)

    def _on_connect(self, client: mqtt.Client, *_: object) -> None:
        client.subscribe([(topic, 1) for topic in self._topics])

    def _on_subscribe(self, *_: object) -> None:
        with self._cond:
            self._subscribed += 1
            self._cond.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Received(message.topic, message.payload, bool(message.retain)))
            self._cond.notify_all()

    def wait_subscribed(self, times: int) -> None:
        """Wait until the subscription has been made ``times`` times (once per connection)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._subscribed >= times, WAIT_S):
                raise AssertionError("the recorder could not subscribe to the broker")

    @property
    def subscriptions(self) -> int:
        with self._cond:
            return self._subscribed

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], what: str, timeout: float = WAIT_S
    ) -> list[Received]:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.messages), timeout):
                raise AssertionError(f"timed out waiting for {what}; got {len(self.messages)}")
            return list(self.messages)

    def on(self, topic: str) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def client_for(
    broker: Broker, identity: Identity | None, *, client_id: str, ca: Path | None = None
) -> mqtt.Client:
    """A paho MQTT 5 client with TLS against the broker's CA, with or without a certificate."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    client.tls_set(
        ca_certs=str(ca or broker.pki.ca.path),
        certfile=str(identity.cert) if identity else None,
        keyfile=str(identity.key) if identity else None,
    )
    return client


# -- a device: its settings and `edgeid telemetry run` ----------------------------------------


def device_home(
    folder: Path, pki: Pki, broker: Broker, device: str = "box-1", **telemetry: object
) -> Path:
    identity = pki.device(SITE, device)
    home = folder / device
    values: dict[str, object] = {
        "sink": "mqtt",
        "broker_host": "127.0.0.1",
        "broker_port": broker.port,
        "ca_file": str(pki.ca.path),
        "cert_file": str(identity.cert),
        "key_file": str(identity.key),
        "interval_s": 1.0,
        "keepalive_s": KEEPALIVE_S,
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 1.0,
    } | telemetry
    save_settings(
        home,
        Settings(
            device=DeviceSettings(site=SITE, device_id=device),
            telemetry=TelemetrySettings(**values),  # type: ignore[arg-type]
        ),
    )
    return home


class Agent:
    """`edgeid telemetry run` as a child process."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.log = (home / "agent.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edgeid", "telemetry", "run", "--home", str(home)],
            cwd=REPO_ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=WAIT_S)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()
        self.log.close()

    @property
    def output(self) -> str:
        return (self.home / "agent.log").read_text(errors="replace")
