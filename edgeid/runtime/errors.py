"""The error hierarchy every edgeid domain raises from.

The CLI maps ``BadInputError`` to exit code 2 and any other ``EdgeidError`` to exit code 1;
each message is one line that names the problem and, where there is one, the fix.
"""

from __future__ import annotations


class EdgeidError(Exception):
    """Base of every error edgeid raises on purpose."""


class BadInputError(EdgeidError):
    """The caller gave us something we refuse: a missing, corrupt or hostile input."""


class ModelError(EdgeidError):
    """A model is missing, fails its checksum, or cannot be loaded."""


class ModelIntegrityError(ModelError):
    """A model file's bytes do not match the sha256 recorded in its manifest."""


class OverloadedError(EdgeidError):
    """The service cannot take this request now (queue full, shutting down); retry shortly."""


class StorageWriteError(EdgeidError):
    """A write was not made durable; nothing was acknowledged and the store is as before."""


class DiskFullError(StorageWriteError):
    """The disk is full (ENOSPC); the write was rolled back."""


class AccessDeniedError(EdgeidError):
    """The caller's role, token scope or gallery list does not allow this (HTTP 403).

    ``recorded`` is True once an ``access_denied`` audit record was written (or deliberately
    suppressed by the rate limit), so a front end does not record the same refusal twice.
    """

    def __init__(self, message: str, *, recorded: bool = False) -> None:
        super().__init__(message)
        self.recorded = recorded


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message for a one-line error: its first line (at most ``limit``
    characters), or its type's name when it has none."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]
