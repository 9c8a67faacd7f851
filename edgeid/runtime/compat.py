"""The few Python 3.11 names edgeid uses, also on Python 3.10.

JetPack 6 (Ubuntu 22.04) ships TensorRT for its system Python 3.10 only, so the whole product runs
on 3.10. Import these names from here, never from ``datetime``, ``enum`` or ``tomllib``:
``make lint`` (vermin, ruff and mypy, all at 3.10) refuses the 3.11-only spellings.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from enum import Enum

# datetime.UTC (3.11) is this very object.
UTC = timezone.utc


def parse_iso_datetime(text: str) -> datetime:
    """``datetime.fromisoformat`` that also reads a trailing ``Z`` on 3.10 (3.11 reads it)."""
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    return datetime.fromisoformat(text)


class StrEnum310(str, Enum):
    """enum.StrEnum as 3.11 defines it: members are strings and print as their value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


if sys.version_info >= (3, 11):
    from enum import StrEnum  # novermin (3.11 only, guarded)

    import tomllib  # novermin (3.11 only, guarded)
else:  # Python 3.10 (Jetson)
    import tomli as tomllib

    StrEnum = StrEnum310

__all__ = ["UTC", "StrEnum", "StrEnum310", "parse_iso_datetime", "tomllib"]
