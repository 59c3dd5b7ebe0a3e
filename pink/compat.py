"""What PINK takes from Pythons newer than the oldest it runs on (3.10,
Ubuntu 22.04's python3: docs/operations.md, "Supported systems"), imported
from here so that every call site reads the same on each Python, and this
file is all that goes when 3.10 does.

- `tomllib` (3.11): the `tomli` backport, installed by setup.cfg's
  environment marker on 3.10, has the same API.
- `fromisoformat`: `datetime.fromisoformat` as 3.11 reads ISO 8601. 3.10's
  reads only what `isoformat()` writes, so a web node on 3.10 would refuse
  `--since 2026-11-01T12:00:00.5Z` or `+0100`, which one on 3.11 takes.
"""

from __future__ import annotations

import re
import sys
from datetime import date, datetime, time, timedelta, timezone

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

__all__ = ["fromisoformat", "tomllib"]

# 3.11's grammar: a calendar date (extended or basic) or an ISO week date;
# then, after any one character, hh[:mm[:ss[.f]]] (colons optional, any
# number of fraction digits, `.` or `,`); then Z or an offset +hh[:mm[:ss[.f]]].
_ISO = re.compile(
    r"(?:(?P<y>\d{4})-?(?P<mo>\d{2})-?(?P<d>\d{2})|(?P<wy>\d{4})-?W(?P<w>\d{2})(?:-?(?P<wd>\d))?)"
    r"(?:.(?P<h>\d{2})(?::?(?P<mi>\d{2})(?::?(?P<s>\d{2})(?:[.,](?P<f>\d+))?)?)?"
    r"\s*(?P<tz>Z|[+-]\d{2}(?::?\d{2}(?::?\d{2}(?:[.,]\d+)?)?)?)?)?",
    re.ASCII)
_OFFSET = re.compile(r"([+-])(\d{2}):?(\d{2})?:?(\d{2})?(?:[.,](\d+))?", re.ASCII)


def _micro(digits: str | None) -> int:
    return int((digits or "0")[:6].ljust(6, "0"))


def _offset(text: str | None) -> timezone | None:
    if not text:
        return None
    if text == "Z":
        return timezone.utc
    sign, hh, mm, ss, frac = _OFFSET.fullmatch(text).groups()
    delta = timedelta(hours=int(hh), minutes=int(mm or 0), seconds=int(ss or 0), microseconds=_micro(frac))
    return timezone(-delta if sign == "-" else delta)


def _iso_310(text: str) -> datetime:
    """3.11's datetime.fromisoformat, written out for 3.10 (a ValueError as there)."""
    found = _ISO.fullmatch(text)
    if not found:
        raise ValueError(f"Invalid isoformat string: {text!r}")
    g = found.groupdict()
    day = (date(int(g["y"]), int(g["mo"]), int(g["d"])) if g["y"] else
           date.fromisocalendar(int(g["wy"]), int(g["w"]), int(g["wd"] or 1)))
    moment = time(int(g["h"] or 0), int(g["mi"] or 0), int(g["s"] or 0), _micro(g["f"]),
                  tzinfo=_offset(g["tz"]))
    return datetime.combine(day, moment)


fromisoformat = datetime.fromisoformat if sys.version_info >= (3, 11) else _iso_310
