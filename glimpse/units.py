"""Parsing human-friendly sizes ("1GiB", "512MB", 1073741824) for memory knobs."""

from __future__ import annotations

import re

from glimpse.errors import InvalidInputError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: int | str, knob: str) -> int:
    """Bytes from an int or a string like "1GiB" / "256MB"; raises InvalidInputError naming the knob."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if m and m.group(2).lower() in _UNITS and float(m.group(1)) > 0:
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise InvalidInputError(f"{knob}={value!r} is not a positive size; use bytes or a unit like 512MiB, 2GiB")
