"""What the web layer refuses, each mapped to one HTTP status (see ``app.py``)."""

from __future__ import annotations

from edgeid.runtime.errors import AccessDeniedError, BadInputError, EdgeidError


class LoginRequiredError(EdgeidError):
    """No valid session or token (401; pages redirect to the login form)."""


class PasswordChangeRequiredError(EdgeidError):
    """The user still holds a one-time password (pages redirect to the change form)."""


class ForbiddenError(AccessDeniedError):
    """Signed in, but this role, token scope or gallery list does not allow it (403)."""


class CsrfError(EdgeidError):
    """A state change without this session's CSRF token, or from another site (403)."""


class NotFoundError(BadInputError):
    """No such search, face, subject or token among the caller's (404)."""


class ThrottledError(EdgeidError):
    """Too many failed logins for this account or address (429)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
