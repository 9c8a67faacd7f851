"""Errors the audit domain raises. Messages name records by sequence number and byte offset,
never by what they hold (case numbers, reasons and user names exist only as ciphertext)."""

from __future__ import annotations

from edgeid.runtime.errors import BadInputError, EdgeidError


class AuditError(EdgeidError):
    """Base of every error raised by ``edgeid.runtime.audit``."""


class AuditInputError(AuditError, BadInputError):
    """An event refused before anything was written (a search without a case number, ...)."""


class AuditNotFoundError(AuditError, BadInputError):
    """There is no audit log (or no export file) where one was asked for."""


class AuditBusyError(AuditError):
    """Another process has the audit log open for writing."""


class AuditTamperedError(AuditError):
    """The log fails verification; nothing is appended to it or exported from it."""


class ExportSignatureError(AuditError):
    """An export file's signature does not verify, or it was signed by another key."""
