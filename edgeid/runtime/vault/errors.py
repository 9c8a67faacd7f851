"""Errors the sealing kernel raises: encryption, keys and the framed log format.

Every failure to decrypt or authenticate collapses into one ``DecryptionError`` whose message
says nothing about why (wrong key, altered bytes, a record moved elsewhere), so that no error
message or log line becomes an oracle.
"""

from __future__ import annotations

from edgeid.runtime.errors import BadInputError, EdgeidError


class VaultError(EdgeidError):
    """Base of every error raised by ``edgeid.runtime.vault``."""


class DecryptionError(VaultError):
    """Ciphertext could not be opened: wrong key or passphrase, or altered or moved data."""

    MESSAGE = (
        "decryption failed: wrong key or passphrase, or the data was altered or moved; "
        "check the key provider, or restore from a backup"
    )

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)


class CorruptDataError(VaultError):
    """A sealed file fails its checksum or structure checks (a bit flip, a replayed record)."""


class KeyProviderError(VaultError):
    """A key provider failed: unreadable key file, bad permissions, tool failure."""


class KeyProviderUnavailableError(KeyProviderError):
    """The key provider cannot work on this machine (no TPM, no systemd-creds)."""


class KeyringError(VaultError):
    """The keyring file is missing, malformed or does not match the key provider."""


class UnknownKeyError(KeyringError, BadInputError):
    """The keyring holds no data key for that scope (erased, or never created)."""
