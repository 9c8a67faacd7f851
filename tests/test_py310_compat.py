"""edgeid.runtime.compat: the Python 3.10 stand-ins behave like the 3.11 originals.

The 3.10 branch cannot run here (no 3.10 interpreter on this Debian); its StrEnum is tested
directly against 3.11's enum.StrEnum, and make lint (vermin --target=3.10-) proves nothing
newer than 3.10 is used anywhere else.
"""

from __future__ import annotations

import enum
import json
import sys
from datetime import datetime, timedelta, timezone

import pytest

from edgeid.runtime.compat import UTC, StrEnum310, parse_iso_datetime


class Colour310(StrEnum310):
    RED = "red"
    DARK_BLUE = "dark-blue"


if sys.version_info >= (3, 11):

    class Colour311(enum.StrEnum):  # novermin (the original, to compare with)
        RED = "red"
        DARK_BLUE = "dark-blue"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="compares with 3.11's enum.StrEnum")
@pytest.mark.parametrize("member", ["RED", "DARK_BLUE"])
def test_backported_str_enum_prints_formats_and_serialises_like_3_11(member: str) -> None:
    ours, theirs = Colour310[member], Colour311[member]
    assert str(ours) == str(theirs) == theirs.value
    assert f"{ours}" == f"{theirs}" and f"{ours:>12}" == f"{theirs:>12}"
    assert ours == theirs.value and isinstance(ours, str)
    assert json.dumps({"c": ours}) == json.dumps({"c": theirs})
    assert Colour310(theirs.value) is ours
    assert "%s" % ours == theirs.value  # noqa: UP031 (the logging style)


def test_utc_is_the_utc_timezone() -> None:
    assert UTC is timezone.utc
    assert datetime(2026, 1, 1, tzinfo=UTC).utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T14:30Z", datetime(2024, 5, 1, 14, 30, tzinfo=UTC)),
        ("2024-05-01T14:30:05z", datetime(2024, 5, 1, 14, 30, 5, tzinfo=UTC)),
        ("2024-05-01T16:30+02:00", datetime(2024, 5, 1, 14, 30, tzinfo=UTC)),
        ("2024-05-01T14:30", datetime(2024, 5, 1, 14, 30)),
    ],
)
def test_iso_datetimes_with_a_z_parse(text: str, expected: datetime) -> None:
    assert parse_iso_datetime(text) == expected


def test_a_bad_iso_datetime_is_still_refused() -> None:
    with pytest.raises(ValueError):
        parse_iso_datetime("yesterday Z")
