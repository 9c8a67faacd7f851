"""The box's own HTTPS certificate, made by ``edgeid init``: self-signed, ECDSA P-256.

Browsers in the office are told to trust it once (its SHA-256 fingerprint is printed at
init, for the person who checks it); without a certificate the service refuses to listen on
anything but loopback.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeid.runtime.compat import UTC
from edgeid.runtime.errors import BadInputError
from edgeid.runtime.storage.durable import make_private_dir, write_file_atomically

TLS_DIR = "tls"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
# Long enough that a box in a field office does not go dark on an expiry; `edgeid init
# --renew-cert` makes a new one.
VALIDITY_DAYS = 3 * 365


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    sha256: str  # of the DER certificate, as browsers show it


def tls_paths(home: Path) -> tuple[Path, Path]:
    return home / TLS_DIR / CERT_FILE, home / TLS_DIR / KEY_FILE


def _san(names: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in names:
        name = name.strip()
        if not name or name in seen or name in ("0.0.0.0", "::"):
            continue
        seen.add(name)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not all(part.isalnum() or "-" in part for part in name.split(".")):
                raise BadInputError(f"{name!r} is neither an IP address nor a host name") from None
            out.append(x509.DNSName(name))
    return out


def make_certificate(
    home: Path, *, device_id: str, addresses: Iterable[str] = (), now: dt.datetime | None = None
) -> TlsFiles:
    """A new key and certificate under ``<home>/tls`` (key 0600), for loopback, this host's
    name and ``addresses`` (the names and IPs the office uses to reach the box)."""
    now = now or dt.datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edgeid {device_id}")])
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(_san(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tls_paths(home)
    make_private_dir(cert_path.parent)
    write_file_atomically(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        action="writing the TLS key",
    )
    write_file_atomically(
        cert_path, cert.public_bytes(serialization.Encoding.PEM), action="writing the certificate"
    )
    return TlsFiles(cert_path, key_path, cert.fingerprint(hashes.SHA256()).hex())


def certificate_sha256(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex()
