"""Password hashing (argon2id) and the password rules.

argon2-cffi's defaults are RFC 9106's low-memory profile (t=3, m=64 MiB, p=4): about 50-100 ms
per hash on a small box, which login throttling then multiplies for a guesser. A semaphore caps
how many hashes run at once so that a burst of logins cannot take more than a few times 64 MiB.
"""

from __future__ import annotations

import secrets
import threading

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from edgeid.runtime.errors import BadInputError

MIN_PASSWORD_CHARS = 12  # NIST SP 800-63B asks for at least 8; a shared box deserves more
MAX_PASSWORD_CHARS = 256  # longer is a paste error, and bounds the hashing work per attempt
# 4 concurrent hashes of 64 MiB each: what a 4 GB box can spare for logins.
MAX_CONCURRENT_HASHES = 4
ONE_TIME_PASSWORD_BYTES = 15  # 120 bits, 20 characters of base64url

_hasher = PasswordHasher(type=Type.ID)
_slots = threading.BoundedSemaphore(MAX_CONCURRENT_HASHES)
# Verified when a user does not exist, so an unknown name costs the same time as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class PasswordRuleError(BadInputError):
    """A new password breaks a rule (too short, too long, the same as the name or the old one)."""


def hash_password(password: str) -> str:
    with _slots:
        return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True when ``password`` matches; a missing user is checked against a dummy hash."""
    if len(password) > MAX_PASSWORD_CHARS:
        return False
    with _slots:
        try:
            return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False


def needs_rehash(stored_hash: str) -> bool:
    """True when the hash was made with weaker parameters than today's."""
    try:
        return _hasher.check_needs_rehash(stored_hash)
    except InvalidHashError:
        return True


def check_new_password(password: str, *, username: str) -> None:
    if len(password) < MIN_PASSWORD_CHARS:
        raise PasswordRuleError(
            f"the new password is shorter than {MIN_PASSWORD_CHARS} characters; choose a longer one"
        )
    if len(password) > MAX_PASSWORD_CHARS:
        raise PasswordRuleError(f"the new password is longer than {MAX_PASSWORD_CHARS} characters")
    if password.strip().lower() == username.lower():
        raise PasswordRuleError("the new password is the user name; choose another")


def one_time_password() -> str:
    """A random password handed to a person once; it must be changed at first login."""
    return secrets.token_urlsafe(ONE_TIME_PASSWORD_BYTES)
