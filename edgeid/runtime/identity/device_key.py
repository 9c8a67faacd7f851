"""The device's ed25519 signing key: ``<home>/identity/device-ed25519.pem`` (PKCS#8, 0600).

It signs the audit log's checkpoints and identifies the box to oversight. ``ensure_device_key``
creates it once and returns the same key ever after, so provisioning can be re-run safely.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeid.runtime.errors import EdgeidError
from edgeid.runtime.storage.durable import make_private_dir, write_file_atomically

IDENTITY_DIR = "identity"
KEY_FILE = "device-ed25519.pem"


class DeviceKeyError(EdgeidError):
    """The device key is missing or unreadable."""


def device_key_path(home: Path) -> Path:
    return home / IDENTITY_DIR / KEY_FILE


def load_device_key(home: Path) -> Ed25519PrivateKey:
    path = device_key_path(home)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise DeviceKeyError(
            f"no device key at {path}; run edgeid provision init (or edgeid init)"
        ) from None
    except (OSError, ValueError) as exc:
        raise DeviceKeyError(f"device key {path} is unreadable ({exc}); restore it") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise DeviceKeyError(f"{path} is not an ed25519 key")
    return key


def ensure_device_key(home: Path) -> Ed25519PrivateKey:
    """The device key, created on first use; an existing key is never replaced."""
    if device_key_path(home).exists():
        return load_device_key(home)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    make_private_dir(home / IDENTITY_DIR)
    write_file_atomically(device_key_path(home), pem, action="writing the device key")
    return key


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def fingerprint(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """sha256 of the raw public key, hex: how people and logs name a device key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()
