"""A key pair per service (HTTPS, MQTT), with a certificate signing request for the site CA or,
for a lab, a self-signed certificate; and installing the certificate the CA signed.

Keys are ECDSA P-256 (every TLS stack and Mosquitto take it), PKCS#8 PEM, mode 0600, under
``<home>/tls/`` unless ``edgeid.toml`` already names other files. Nothing is rewritten when it
is already right: an existing key is kept, a CSR or certificate that already names the same key
and the same names is kept, so re-running provisioning leaves the files byte-for-byte alone.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeid.runtime.errors import BadInputError, EdgeidError
from edgeid.runtime.storage.durable import (
    PRIVATE_FILE_MODE,
    make_private_dir,
    write_file_atomically,
)
from edgeid.runtime.web.tls import TLS_DIR, tls_paths

Usage = Literal["server", "client"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The longest validity browsers accept for a server certificate; a lab box re-runs init.
SELF_SIGNED_DAYS = 397
# init renews a self-signed certificate this close to its expiry (a CA's is the CA's business).
RENEW_WITHIN = dt.timedelta(days=30)
# Start validity a little in the past: a client whose clock runs ahead still accepts it.
BACKDATE = dt.timedelta(minutes=5)
_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}$){_DNS_LABEL}(?:\.{_DNS_LABEL})*$")


class CertificateError(BadInputError):
    """A certificate, request or key file given to provisioning is unusable."""


@dataclass(frozen=True)
class ServicePaths:
    key: Path
    csr: Path
    cert: Path


@dataclass(frozen=True)
class CertRequest:
    """Who the certificate names: a common name and, for a server, its DNS names and IPs."""

    common_name: str
    usage: Usage
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[IPAddress, ...] = ()

    def names(self) -> tuple[str, frozenset[str]]:
        """What two requests must share to be the same: CN and the set of alternative names."""
        alt = {f"DNS:{n}" for n in self.dns_names} | {f"IP:{a}" for a in self.ip_addresses}
        return self.common_name, frozenset(alt)

    def describe(self) -> str:
        alt = sorted(self.names()[1])
        return f"CN={self.common_name}" + (f" ({', '.join(alt)})" if alt else "")


@dataclass(frozen=True)
class ServiceState:
    """What is on disk for one service, for status, selftest and init."""

    key_present: bool
    csr_present: bool
    cert: x509.Certificate | None
    problem: str | None  # why the files cannot be used as they are

    @property
    def installed(self) -> bool:
        return self.cert is not None and self.problem is None


def default_paths(home: Path, service: str) -> ServicePaths:
    """``edgeid init``'s files for the web (edgeid/runtime/web/tls.py), ``<home>/tls/mqtt.*`` for
    MQTT."""
    if service == "web":
        cert, key = tls_paths(home)
        return ServicePaths(key, cert.with_name("web.csr"), cert)
    folder = home / TLS_DIR
    return ServicePaths(
        folder / f"{service}.key", folder / f"{service}.csr", folder / f"{service}.crt"
    )


def service_paths(home: Path, service: str, key: str | None, cert: str | None) -> ServicePaths:
    """The files edgeid.toml names when it names both, else the default ones."""
    if key and cert:
        return ServicePaths(Path(key), Path(cert).with_name(f"{service}.csr"), Path(cert))
    return default_paths(home, service)


def parse_names(values: Sequence[str]) -> tuple[tuple[str, ...], tuple[IPAddress, ...]]:
    """``--web-name`` values: IP addresses, or DNS names (lower-case letters, digits, hyphens)."""
    dns: list[str] = []
    ips: list[IPAddress] = []
    for value in values:
        try:
            ips.append(ipaddress.ip_address(value))
            continue
        except ValueError:
            pass
        name = value.strip().lower().rstrip(".")
        if not _DNS_NAME.fullmatch(name):
            raise CertificateError(
                f"--web-name {value!r} is neither an IP address nor a DNS name; use e.g. "
                "edgeid-7.office.example or 10.0.0.7"
            )
        dns.append(name)
    return tuple(dict.fromkeys(dns)), tuple(dict.fromkeys(ips))


# -- reading -----------------------------------------------------------------------------------


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise EdgeidError(f"cannot read key {path} ({exc.strerror}); restore it") from exc
    except (ValueError, TypeError) as exc:
        raise EdgeidError(
            f"{path} is not an unencrypted PEM private key; remove it to make a new one"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise EdgeidError(f"{path} is not an ECDSA key; remove it to make a new one")
    return key


def read_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate of a PEM file (a leaf first, then its chain), at least one."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read {path} ({exc.strerror})") from exc
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise CertificateError(f"{path} holds no PEM certificate; give the PEM file the CA sent")
    return certs


def _spki(
    key: ec.EllipticCurvePublicKey | x509.Certificate | x509.CertificateSigningRequest,
) -> bytes:
    public = key if isinstance(key, ec.EllipticCurvePublicKey) else key.public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def belongs_to(
    cert: x509.Certificate | x509.CertificateSigningRequest, key: ec.EllipticCurvePrivateKey
) -> bool:
    return _spki(cert) == _spki(key.public_key())


def request_of(
    item: x509.Certificate | x509.CertificateSigningRequest, usage: Usage
) -> CertRequest:
    cns = item.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(cns[0].value) if cns else ""
    try:
        san = item.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return CertRequest(common_name, usage)
    ips = tuple(
        a
        for a in san.get_values_for_type(x509.IPAddress)
        if isinstance(a, ipaddress.IPv4Address | ipaddress.IPv6Address)
    )
    return CertRequest(common_name, usage, tuple(san.get_values_for_type(x509.DNSName)), ips)


def is_self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


def describe_cert(cert: x509.Certificate) -> str:
    issuer = "self-signed" if is_self_signed(cert) else f"issued by {cert.issuer.rfc4514_string()}"
    return f"{issuer}, valid until {cert.not_valid_after_utc:%Y-%m-%d}"


def inspect(paths: ServicePaths, now: dt.datetime) -> ServiceState:
    """What is on disk for a service, and why it cannot be used if it cannot."""
    key_present, csr_present = paths.key.is_file(), paths.csr.is_file()
    if not paths.cert.is_file():
        return ServiceState(key_present, csr_present, None, None)
    try:
        cert = read_certificates(paths.cert)[0]
    except CertificateError as exc:
        return ServiceState(key_present, csr_present, None, str(exc))
    problem = None
    if not key_present:
        problem = f"certificate {paths.cert} has no key at {paths.key}"
    else:
        try:
            key = load_key(paths.key)
        except EdgeidError as exc:
            return ServiceState(key_present, csr_present, cert, str(exc))
        if not belongs_to(cert, key):
            problem = f"certificate {paths.cert} does not belong to key {paths.key}"
        elif stat.S_IMODE(paths.key.stat().st_mode) & 0o077:
            problem = f"key {paths.key} is readable by other users; run chmod 600 {paths.key}"
        elif cert.not_valid_after_utc <= now:
            problem = f"certificate {paths.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}"
        elif cert.not_valid_before_utc > now:
            problem = (
                f"certificate {paths.cert} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
            )
    return ServiceState(key_present, csr_present, cert, problem)


# -- making ------------------------------------------------------------------------------------


def ensure_key(path: Path) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    """The service key, made once; an existing key is kept (its mode tightened to 0600)."""
    if path.exists():
        key = load_key(path)
        if stat.S_IMODE(path.stat().st_mode) != PRIVATE_FILE_MODE:
            os.chmod(path, PRIVATE_FILE_MODE)
            return key, True
        return key, False
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    make_private_dir(path.parent)
    write_file_atomically(path, pem, action=f"writing the key {path.name}")
    return key, True


def _extensions(
    builder: x509.CertificateBuilder | x509.CertificateSigningRequestBuilder, request: CertRequest
) -> x509.CertificateBuilder | x509.CertificateSigningRequestBuilder:
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in request.dns_names]
    alt += [x509.IPAddress(a) for a in request.ip_addresses]
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH
        if request.usage == "server"
        else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False).add_extension(
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=True,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )


def _subject(request: CertRequest) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, request.common_name)])


def make_csr(key: ec.EllipticCurvePrivateKey, request: CertRequest) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(_subject(request))
    built = _extensions(builder, request)
    assert isinstance(built, x509.CertificateSigningRequestBuilder)
    return built.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def make_self_signed(
    key: ec.EllipticCurvePrivateKey, request: CertRequest, now: dt.datetime
) -> bytes:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(request))
        .issuer_name(_subject(request))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    built = _extensions(builder, request)
    assert isinstance(built, x509.CertificateBuilder)
    return built.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def existing_request(paths: ServicePaths, usage: Usage) -> CertRequest | None:
    """The names of the certificate (or else the CSR) already on disk, if any."""
    try:
        if paths.cert.is_file():
            return request_of(read_certificates(paths.cert)[0], usage)
        if paths.csr.is_file():
            return request_of(x509.load_pem_x509_csr(paths.csr.read_bytes()), usage)
    except (CertificateError, ValueError, OSError):
        return None
    return None


def check_installable(
    source: Path, paths: ServicePaths, now: dt.datetime
) -> list[x509.Certificate]:
    """A certificate the CA signed, checked against this box's key before anything is written."""
    certs = read_certificates(source)
    if not paths.key.is_file():
        raise CertificateError(
            f"there is no key at {paths.key} yet; run edgeid provision init first, have the CSR "
            "it writes signed, then install the certificate"
        )
    if not belongs_to(certs[0], load_key(paths.key)):
        raise CertificateError(
            f"{source} was not issued for this box's key {paths.key} (its public key differs); "
            f"have {paths.csr} signed"
        )
    if certs[0].not_valid_after_utc <= now:
        raise CertificateError(f"{source} expired on {certs[0].not_valid_after_utc:%Y-%m-%d}")
    return certs


def _write_if_changed(path: Path, data: bytes, action: str) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    make_private_dir(path.parent)
    write_file_atomically(path, data, action=action)
    return True


def _csr_is_current(
    paths: ServicePaths, key: ec.EllipticCurvePrivateKey, request: CertRequest
) -> bool:
    try:
        csr = x509.load_pem_x509_csr(paths.csr.read_bytes())
    except (OSError, ValueError):
        return False
    return belongs_to(csr, key) and request_of(csr, request.usage).names() == request.names()


@dataclass(frozen=True)
class Provisioned:
    changed: bool
    ready: bool  # a usable certificate is installed
    detail: str
    failed: bool = False  # the files need the technician (an expired CA certificate, say)


def provision_service(
    paths: ServicePaths,
    request: CertRequest,
    *,
    self_signed: bool,
    install_from: Path | None,
    now: dt.datetime,
    renew: bool = False,
) -> Provisioned:
    """Key, then the certificate: install the CA's, keep a good one, self-sign, or write a CSR.
    ``renew`` replaces a good self-signed certificate too (a lab's ``edgeid init --renew-cert``)."""
    key, changed = ensure_key(paths.key)
    if install_from is not None:
        certs = check_installable(install_from, paths, now)
        data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
        changed |= _write_if_changed(paths.cert, data, f"installing {paths.cert.name}")
        return Provisioned(changed, True, f"{request.describe()}, {describe_cert(certs[0])}")
    state = inspect(paths, now)
    cert = state.cert
    if cert is None and state.problem is not None:
        return Provisioned(changed, False, f"{state.problem}; remove it or install one", True)
    covers = cert is not None and request_of(cert, request.usage).names() == request.names()
    if cert is not None and is_self_signed(cert) and belongs_to(cert, key):
        # A lab certificate: kept while it is good and names the right names, else renewed.
        fresh = cert.not_valid_after_utc - now >= RENEW_WITHIN
        if state.problem is None and covers and fresh and not renew:
            return Provisioned(changed, True, f"{request.describe()}, {describe_cert(cert)}")
        _write_if_changed(paths.cert, make_self_signed(key, request, now), "renewing the cert")
        return Provisioned(True, True, f"{request.describe()}, renewed self-signed certificate")
    if cert is not None and state.problem is None and covers:
        return Provisioned(changed, True, f"{request.describe()}, {describe_cert(cert)}")
    if cert is None and self_signed:
        _write_if_changed(paths.cert, make_self_signed(key, request, now), "writing the cert")
        return Provisioned(True, True, f"{request.describe()}, self-signed (lab)")
    if not _csr_is_current(paths, key, request):
        _write_if_changed(paths.csr, make_csr(key, request), f"writing {paths.csr.name}")
        changed = True
    ask = f"CSR {request.describe()} at {paths.csr}: have the site CA sign it"
    if cert is None:
        return Provisioned(changed, False, ask)
    if state.problem is not None:
        return Provisioned(changed, False, f"{state.problem}; {ask}", True)
    return Provisioned(changed, True, f"the installed certificate names other names; {ask}")
