"""ed25519 signatures over update manifests, and the keys the box trusts.

The vendor keeps the private key; each box trusts the public keys a technician installed in
``<home>/update-keys/*.pem``. A signature is the 64 raw bytes of ed25519 over a domain tag
plus the manifest's bytes, so no other message signed with the same key (a log checkpoint,
another product's manifest) can pass as an update. Every way a signature can fail collapses
into one message: which key, if any, almost matched is nobody's business.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeid.runtime.errors import BadInputError
from edgeid.runtime.storage.durable import make_private_dir, write_file_atomically
from edgeid.updater.errors import BundleRejectedError, UpdateError

SIGNATURE_DOMAIN = b"edgeid-update-manifest-v1\0"
SIGNATURE_BYTES = 64
KEYS_DIR = "update-keys"
KEY_SUFFIX = ".pem"
FINGERPRINT_HEX = 16  # how a key is named in status output and file names


@dataclass(frozen=True)
class TrustedKey:
    name: str  # the file it came from
    key: Ed25519PublicKey

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)


def fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:FINGERPRINT_HEX]


def keys_dir(home: Path) -> Path:
    return home / KEYS_DIR


def sign_manifest(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    return key.sign(SIGNATURE_DOMAIN + manifest_bytes)


def verify_signature(manifest_bytes: bytes, signature: bytes, keys: list[TrustedKey]) -> TrustedKey:
    """The trusted key that signed ``manifest_bytes``; one opaque refusal otherwise."""
    if len(signature) == SIGNATURE_BYTES:
        for trusted in keys:
            try:
                trusted.key.verify(signature, SIGNATURE_DOMAIN + manifest_bytes)
            except InvalidSignature:
                continue
            return trusted
    raise BundleRejectedError(
        "bundle signature does not verify against any trusted update key; "
        "get a bundle signed by the vendor's key"
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise BadInputError(f"signing key {path} not found; give the private key") from None
    except (OSError, ValueError, TypeError) as exc:
        raise BadInputError(
            f"{path} is not an unencrypted PEM private key ({exc}); "
            "create one with edgeid update keygen"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInputError(f"{path} is not an ed25519 key; update bundles are signed with ed25519")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"cannot read public key {path}: {exc.strerror}") from None
    if b"PRIVATE KEY" in data:
        raise BadInputError(
            f"{path} holds a private key; give the public key (.pub) only, "
            "the private key stays with the vendor"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise BadInputError(f"{path} is not a PEM public key; give the .pub file") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BadInputError(f"{path} is not an ed25519 public key")
    return key


def trusted_keys(home: Path) -> list[TrustedKey]:
    """The keys in ``<home>/update-keys``; an unreadable key file is an error, not skipped."""
    folder = keys_dir(home)
    paths = sorted(folder.glob(f"*{KEY_SUFFIX}")) if folder.is_dir() else []
    keys: list[TrustedKey] = []
    for path in paths:
        try:
            keys.append(TrustedKey(path.name, load_public_key(path)))
        except BadInputError as exc:
            raise UpdateError(f"trusted key file is unusable: {exc}") from None
    if not keys:
        raise UpdateError(
            f"no trusted update keys in {folder}; install the vendor's public key with "
            "edgeid update trust KEY.pub"
        )
    return keys


def generate_key(out: Path) -> Path:
    """A new signing key at ``out`` (0600) and its public half beside it; returns the .pub."""
    public_path = out.with_name(out.name + ".pub")
    if out.exists() or public_path.exists():
        raise BadInputError(f"{out} or {public_path} already exists; choose another name")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_file_atomically(out, private_pem, action="writing the signing key")
    write_file_atomically(public_path, public_pem(key), action="writing the public key")
    public_path.chmod(0o644)
    return public_path


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def trust_key(home: Path, public_key_file: Path) -> Path:
    """Install a vendor public key as ``<home>/update-keys/<fingerprint>.pem``."""
    key = load_public_key(public_key_file)
    folder = keys_dir(home)
    make_private_dir(folder)
    target = folder / f"{fingerprint(key)}{KEY_SUFFIX}"
    write_file_atomically(target, public_pem(key), action="installing the update key")
    return target
