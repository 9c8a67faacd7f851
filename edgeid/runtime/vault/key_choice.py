"""Which key-encryption-key provider protects this box's keyring.

Once a keyring exists, it names its provider and that one is used. Before that, the
configured one is chosen; ``auto`` takes the strongest present: a TPM2, then systemd-creds,
then a key file. A passphrase comes from ``$EDGEID_GALLERY_PASSPHRASE`` or the caller.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgeid.runtime.config.settings import KeySettings
from edgeid.runtime.vault.errors import KeyProviderError
from edgeid.runtime.vault.keys import (
    KekProvider,
    KeyFileProvider,
    PassphraseProvider,
    SystemdCredsProvider,
    Tpm2Provider,
    read_keyring,
)

PASSPHRASE_ENV = "EDGEID_GALLERY_PASSPHRASE"
KEYS_DIR = "keys"


# The keyring lives beside the galleries for historical reasons: moving it would strand the
# keyrings of boxes already in the field.
GALLERIES_DIR = "galleries"
KEYRING_FILE = "keyring.json"


def keys_dir(home: Path) -> Path:
    return home / KEYS_DIR


def keyring_path(home: Path) -> Path:
    return home / GALLERIES_DIR / KEYRING_FILE


def make_provider(
    kind: str, home: Path, settings: KeySettings, *, passphrase: str | None = None
) -> KekProvider:
    """A provider of ``kind`` whose stored material lives under ``<home>/keys``."""
    if kind == "keyfile":
        return KeyFileProvider(keys_dir(home))
    if kind == "tpm2":
        return Tpm2Provider(keys_dir(home), tcti=settings.tpm_tcti)
    if kind == "systemd-creds":
        return SystemdCredsProvider(keys_dir(home))
    if kind == "passphrase":
        secret = passphrase if passphrase is not None else os.environ.get(PASSPHRASE_ENV)
        if not secret:
            raise KeyProviderError(
                f"the galleries are protected by a passphrase; set {PASSPHRASE_ENV}"
            )
        return PassphraseProvider(secret)
    raise KeyProviderError(f"unknown key provider {kind!r}")


def best_available(home: Path, settings: KeySettings) -> str:
    """The strongest provider that works on this machine now."""
    if Tpm2Provider(keys_dir(home), tcti=settings.tpm_tcti).available():
        return "tpm2"
    if SystemdCredsProvider(keys_dir(home)).available():
        return "systemd-creds"
    return "keyfile"


def provider_for(
    home: Path, settings: KeySettings, *, passphrase: str | None = None
) -> KekProvider:
    """The provider that opens this box's keyring (or will create it)."""
    path = keyring_path(home)
    if path.exists():
        kind = str(read_keyring(path)[0].get("provider"))
    elif settings.provider == "auto":
        kind = best_available(home, settings)
    else:
        kind = settings.provider
    return make_provider(kind, home, settings, passphrase=passphrase)
