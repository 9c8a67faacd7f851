"""Why personal data is looked at or changed: a case number and a reason, defined once.

Every door (web pages, ``/api/v1``, the CLI, case ingest) builds a ``Justification`` with
``Justification.of`` and every audit record that needs one is checked against the same rules,
so a case number the web refuses is refused on the command line too.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from edgeid.runtime.errors import BadInputError

# Case numbers differ by force ("2024/001234", "VID-17-0042"): letters, digits and the usual
# separators, at most 64 characters.
MAX_CASE_CHARS = 64
CASE_NUMBER = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ./_#:()-]{0,63}")
CASE_NUMBER_PATTERN = CASE_NUMBER.pattern  # for API schemas and HTML ``pattern=``
MIN_REASON_CHARS = 10  # "why this photo, for this case": a word or two is not a reason
MAX_REASON_CHARS = 1000
_REASON_CONTROL_OK = frozenset("\n\t\r")


class JustificationError(BadInputError):
    """A case number or reason is missing or malformed; nothing was revealed or changed."""


def check_case(case: str | None) -> str:
    """The case number, trimmed, or ``JustificationError`` naming the rule."""
    text = (case or "").strip()
    if not text:
        raise JustificationError("give the case number this is for (--case on the command line)")
    if not CASE_NUMBER.fullmatch(text):
        raise JustificationError(
            "the case number may hold letters, digits, spaces and . / _ # : ( ) -, "
            f"start with a letter or digit, at most {MAX_CASE_CHARS} characters"
        )
    return text


def check_reason(reason: str | None) -> str:
    """The reason, trimmed with line ends made ``\\n``, or ``JustificationError``."""
    text = (reason or "").strip()
    if len(text) < MIN_REASON_CHARS:
        raise JustificationError(
            f"give the reason (at least {MIN_REASON_CHARS} characters; --reason on the "
            "command line)"
        )
    if len(text) > MAX_REASON_CHARS:
        raise JustificationError(f"the reason is longer than {MAX_REASON_CHARS} characters")
    if any(unicodedata.category(ch) == "Cc" and ch not in _REASON_CONTROL_OK for ch in text):
        raise JustificationError("the reason contains control characters; remove them")
    return text.replace("\r\n", "\n").replace("\r", "\n")


@dataclass(frozen=True)
class Justification:
    """A checked case number and reason. Build with ``of``; the fields are then valid."""

    case: str
    reason: str

    @classmethod
    def of(cls, case: str | None, reason: str | None) -> Justification:
        return cls(check_case(case), check_reason(reason))

    def __post_init__(self) -> None:
        # Constructing directly is allowed only with values that pass the same checks.
        if check_case(self.case) != self.case or check_reason(self.reason) != self.reason:
            raise JustificationError("a justification must be built with Justification.of")
