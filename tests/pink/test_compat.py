"""pink.compat: what Python 3.10 (Ubuntu 22.04's) lacks, the same on every Python.

The times are what a user may type for `--since`/`--until` (web/api.py) and
what the API writes (pink_cli/output.py): 3.10's own datetime.fromisoformat
reads only isoformat()'s output, so the 3.10 reading is checked against the
table here on every Python, and the table against 3.11's own reading where
it runs.
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone

import pytest

from pink import compat

UTC = timezone.utc
# (text, the datetime 3.11 reads, or None where it refuses the text)
TIMES = [
    ("2026-11-01", datetime(2026, 11, 1)),
    ("20261101", datetime(2026, 11, 1)),
    ("2026-11-01T12", datetime(2026, 11, 1, 12)),
    ("2026-11-01T12:30", datetime(2026, 11, 1, 12, 30)),
    ("2026-11-01 12:30:05", datetime(2026, 11, 1, 12, 30, 5)),
    ("2026-11-01T123005", datetime(2026, 11, 1, 12, 30, 5)),
    ("20261101T12:30:05", datetime(2026, 11, 1, 12, 30, 5)),
    ("2026-11-01T12:30:05.5", datetime(2026, 11, 1, 12, 30, 5, 500000)),
    ("2026-11-01T12:30:05,25", datetime(2026, 11, 1, 12, 30, 5, 250000)),
    ("2026-11-01T12:30:05.1234567", datetime(2026, 11, 1, 12, 30, 5, 123456)),
    ("2026-11-01T12:30:05.000Z", datetime(2026, 11, 1, 12, 30, 5, tzinfo=UTC)),  # the API's, a browser's
    ("2026-11-01T12:30:05Z", datetime(2026, 11, 1, 12, 30, 5, tzinfo=UTC)),
    ("2026-11-01T12:30:05+01:00", datetime(2026, 11, 1, 12, 30, 5, tzinfo=timezone(timedelta(hours=1)))),
    ("2026-11-01T12:30:05+0100", datetime(2026, 11, 1, 12, 30, 5, tzinfo=timezone(timedelta(hours=1)))),
    ("2026-11-01T12:30:05+01", datetime(2026, 11, 1, 12, 30, 5, tzinfo=timezone(timedelta(hours=1)))),
    ("2026-11-01T12:30:05-05:30", datetime(2026, 11, 1, 12, 30, 5,
                                           tzinfo=timezone(-timedelta(hours=5, minutes=30)))),
    ("2026-11-01T12:30:05 +01:00", datetime(2026, 11, 1, 12, 30, 5, tzinfo=timezone(timedelta(hours=1)))),
    ("2026-W44-1", datetime(2026, 10, 26)),
    ("2026W441", datetime(2026, 10, 26)),
    ("2026-W44", datetime(2026, 10, 26)),
    ("", None),
    ("yesterday", None),
    ("2026-1-1", None),
    ("2026-13-01", None),
    ("2026-11-01T24:00", None),
    ("2026-11-01T12:30:05z", None),
    ("2026-305", None),
]


def read(parse, text: str) -> datetime | None:
    try:
        return parse(text)
    except ValueError:
        return None


@pytest.mark.parametrize("text,expected", TIMES, ids=[t or "empty" for t, _ in TIMES])
def test_the_310_reading_of_iso_times_is_311s(text, expected):
    assert read(compat._iso_310, text) == expected
    assert read(compat.fromisoformat, text) == expected
    if sys.version_info >= (3, 11):
        assert read(datetime.fromisoformat, text) == expected


def test_tomllib_reads_pink_toml():
    assert compat.tomllib.loads('[web]\nurl = "https://x"\n') == {"web": {"url": "https://x"}}
    with pytest.raises(compat.tomllib.TOMLDecodeError):
        compat.tomllib.loads("[web\n")
