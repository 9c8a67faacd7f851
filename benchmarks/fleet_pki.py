"""A throwaway fleet PKI for ``fleet_bench``: one CA, the broker's server certificate, the
fleet manager's client certificate, and one client certificate per virtual box (CN
``<site>/<device>``, as ``edgeid provision`` requests them), all ECDSA P-256.

Cached in a folder: a second run with the same or fewer devices issues nothing; a CA close to
expiry starts the folder afresh. Each box's key and certificate share one PEM file, which is
what ``ssl.SSLContext.load_cert_chain`` reads fastest.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgeid.runtime.compat import UTC

CA_NAME = "edgeid-bench-ca"
FLEET_CN = "fleet-manager"
VALID_DAYS = 7
RENEW_BEFORE = dt.timedelta(days=1)


@dataclass(frozen=True)
class BenchPki:
    folder: Path
    ca_cert: Path
    server_pem: Path  # key + certificate for 127.0.0.1
    fleet_cert: Path
    fleet_key: Path

    def device_pem(self, site: str, device: str) -> Path:
        return self.folder / "devices" / f"{site}_{device}.pem"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o600)
    tmp.replace(path)


def issue_leaf(
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer_cert: x509.Certificate,
    cn: str,
    *,
    server: bool = False,
    valid: dt.timedelta = dt.timedelta(days=VALID_DAYS),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new P-256 key and its certificate for ``cn``, signed by the issuer: for 127.0.0.1
    and localhost with ``server``, else a client certificate (as the broker tests use too)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + valid)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.OID_CLIENT_AUTH]), critical=False
        )
    return key, builder.sign(issuer_key, hashes.SHA256())


class _Issuer:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert

    def issue(self, cn: str, *, server: bool = False) -> tuple[bytes, bytes]:
        """(key PEM, certificate PEM) for ``cn``."""
        key, cert = issue_leaf(self.key, self.cert, cn, server=server)
        return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def _new_ca(folder: Path) -> _Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(CA_NAME))
        .issuer_name(_name(CA_NAME))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS + 1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(folder / "ca.key", _key_pem(key))
    _write(folder / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    issuer = _Issuer(key, cert)
    server_key, server_cert = issuer.issue("broker", server=True)
    _write(folder / "server.pem", server_key + server_cert)
    fleet_key, fleet_cert = issuer.issue(FLEET_CN)
    _write(folder / "fleet.key", fleet_key)
    _write(folder / "fleet.crt", fleet_cert)
    return issuer


def _load_ca(folder: Path) -> _Issuer | None:
    try:
        cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    except (OSError, ValueError):
        return None
    expires = cert.not_valid_after_utc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or expires - dt.datetime.now(UTC) < (
        RENEW_BEFORE
    ):
        return None
    if not all((folder / name).is_file() for name in ("server.pem", "fleet.crt", "fleet.key")):
        return None
    return _Issuer(key, cert)


def bench_pki(folder: Path, devices: list[tuple[str, str]]) -> BenchPki:
    """The PKI in ``folder`` with a certificate for every (site, device); issues what is missing."""
    folder.mkdir(parents=True, exist_ok=True)
    issuer = _load_ca(folder)
    if issuer is None:
        shutil.rmtree(folder / "devices", ignore_errors=True)
        issuer = _new_ca(folder)
    pki = BenchPki(
        folder=folder,
        ca_cert=folder / "ca.crt",
        server_pem=folder / "server.pem",
        fleet_cert=folder / "fleet.crt",
        fleet_key=folder / "fleet.key",
    )
    (folder / "devices").mkdir(exist_ok=True)
    for site, device in devices:
        path = pki.device_pem(site, device)
        if not path.is_file():
            key, cert = issuer.issue(f"{site}/{device}")
            _write(path, key + cert)
    return pki
