"""Errors the gallery domain raises: storage, keys and encryption.

Every failure to decrypt or authenticate collapses into one ``DecryptionError`` whose message
says nothing about why (wrong key, altered bytes, a record moved elsewhere), so that no error
message or log line becomes an oracle.
"""

from __future__ import annotations

from runtime.errors import BadInputError, DiskFullError, EdgeidError, StorageWriteError


class GalleryError(EdgeidError):
    """Base of every error raised by ``runtime.gallery``."""


class DecryptionError(GalleryError):
    """Ciphertext could not be opened: wrong key or passphrase, or altered or moved data."""

    MESSAGE = (
        "decryption failed: wrong key or passphrase, or the data was altered or moved; "
        "check the key provider, or restore the gallery from a backup"
    )

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)


class CorruptGalleryError(GalleryError):
    """A gallery file fails its checksum or structure checks (a bit flip, a replayed record)."""


# Writes fail the same way in every store on the box (runtime/storage/durable.py).
GalleryWriteError = StorageWriteError
StorageFullError = DiskFullError


class GalleryBusyError(GalleryError):
    """Another process has the gallery open for writing."""


class KeyProviderError(GalleryError):
    """A key provider failed: unreadable key file, bad permissions, tool failure."""


class KeyProviderUnavailableError(KeyProviderError):
    """The key provider cannot work on this machine (no TPM, no systemd-creds)."""


class GalleryNotFoundError(GalleryError, BadInputError):
    """No gallery, subject or face with that name or id."""


class GalleryExistsError(GalleryError, BadInputError):
    """A gallery with that name already exists."""


class InvalidRecordError(GalleryError, BadInputError):
    """A subject or face given for enrolment is malformed (empty name, bad embedding, not JPEG)."""


class BackupError(GalleryError):
    """An export file is malformed, truncated or of an unknown format."""
