"""Errors the case domain raises. Messages name cases by number only where the investigator
typed it; they never carry file names, faces or templates."""

from __future__ import annotations

from edgeid.runtime.errors import BadInputError, EdgeidError


class CaseError(EdgeidError):
    """Base of every error raised by ``edgeid.runtime.cases``."""


class CaseNotFoundError(CaseError, BadInputError):
    """No case with that number on this box."""


class CorruptCaseError(CaseError):
    """A case file fails its checksum, structure or authentication."""


class CaseBusyError(CaseError):
    """Another process has the cases open."""


class CaseModelError(CaseError, BadInputError):
    """The case's faces were embedded by another model than this box's."""
