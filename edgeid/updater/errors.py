"""What the update domain raises. Both are edgeid errors with one-line messages."""

from __future__ import annotations

from edgeid.runtime.errors import BadInputError, EdgeidError


class UpdateError(EdgeidError):
    """An update operation failed or cannot run now (exit 1); the box stays on a working slot."""


class BundleRejectedError(BadInputError):
    """A bundle was refused (exit 2): malformed, unsigned, not signed by a trusted key, altered,
    for other hardware, or an unpermitted downgrade. Nothing on the box was touched."""
