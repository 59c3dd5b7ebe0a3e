"""Sizes and limits as people read them: the CLI's tables and the web pages say them the same way."""

from __future__ import annotations


def size(n: int | None) -> str:
    """Bytes in B..TiB (one decimal above bytes); "-" when unknown."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def limit_value(name: str, value: int | None, unset: str = "-") -> str:
    """A per-user limit or its use: bytes in KiB..TiB, else a count; `unset` for None
    (a use not counted) and for a limit of 0 (none)."""
    if value is None or (value == 0 and unset != "-"):
        return unset
    return size(value) if "bytes" in name else str(value)
