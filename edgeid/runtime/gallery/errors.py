"""Errors the gallery domain raises: storage, keys and encryption.

Every failure to decrypt or authenticate collapses into one ``DecryptionError`` whose message
says nothing about why (wrong key, altered bytes, a record moved elsewhere), so that no error
message or log line becomes an oracle.
"""

from __future__ import annotations

from edgeid.runtime.errors import BadInputError, DiskFullError, EdgeidError, StorageWriteError
from edgeid.runtime.vault.errors import (
    CorruptDataError,
    DecryptionError,
    KeyProviderError,
    KeyProviderUnavailableError,
)

# The sealing kernel's errors, re-exported: galleries raise them as they are.
__all__ = [
    "BackupError",
    "CorruptGalleryError",
    "DecryptionError",
    "GalleryBusyError",
    "GalleryError",
    "GalleryExistsError",
    "GalleryNotFoundError",
    "GalleryWriteError",
    "InvalidRecordError",
    "KeyProviderError",
    "KeyProviderUnavailableError",
    "StorageFullError",
]


class GalleryError(EdgeidError):
    """Base of every error raised by ``edgeid.runtime.gallery``."""


class CorruptGalleryError(GalleryError, CorruptDataError):
    """A gallery file fails its checksum or structure checks (a bit flip, a replayed record)."""


# Writes fail the same way in every store on the box (edgeid/runtime/storage/durable.py).
GalleryWriteError = StorageWriteError
StorageFullError = DiskFullError


class GalleryBusyError(GalleryError):
    """Another process has the gallery open for writing."""


class GalleryNotFoundError(GalleryError, BadInputError):
    """No gallery, subject or face with that name or id."""


class GalleryExistsError(GalleryError, BadInputError):
    """A gallery with that name already exists."""


class InvalidRecordError(GalleryError, BadInputError):
    """A subject or face given for enrolment is malformed (empty name, bad embedding, not JPEG)."""


class BackupError(GalleryError):
    """An export file is malformed, truncated or of an unknown format."""
