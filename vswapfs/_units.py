"""Sizes as admins write them: 4096, 512K, 1.5G, 2GiB (binary units, as
zramctl and swapon), and percentages of RAM for limits."""

from __future__ import annotations

import re

from .linux import mem_total

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in ``text``; raises ValueError for anything else (negative,
    garbage, unknown unit)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text.strip()!r} (use e.g. 4096, 512M, 2G)")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value >= 1 << 63:
        raise ValueError(f"size too large: {text.strip()!r}")
    return int(value)


def parse_limit(text: str) -> int:
    """A size, or a percentage of RAM like zswap's max_pool_percent."""
    t = text.strip()
    if t.endswith("%"):
        try:
            pct = float(t[:-1])
        except ValueError:
            raise ValueError(f"not a percentage: {t!r}") from None
        if not 0 <= pct <= 100:
            raise ValueError(f"percentage out of 0..100: {t!r}")
        return int(mem_total() * pct / 100)
    return parse_size(t)


def human(n: float) -> str:
    """1536 -> '1.5K', as zramctl prints sizes."""
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}".replace(".0", "")
        n /= 1024
    return str(n)
