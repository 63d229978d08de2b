"""Human-friendly sizes and counts for flags, read as vLLM reads them: "1GiB", "512MB", "4G", "32k", 1073741824.

One letter after a number is vLLM's `human_readable_int`: lower case is a power of 10 (`k` = 1000, `m` = 10**6,
`g` = 10**9, `t` = 10**12), upper case a power of 2 (`K` = 1024, `M` = 2**20, `G` = 2**30, `T` = 2**40, whole
numbers only, as vLLM). Byte units spelled out are read in any case: `KB`/`MB`/`GB`/`TB` are powers of 10,
`KiB`/`MiB`/`GiB`/`TiB` powers of 2.
"""

from __future__ import annotations

import re
from decimal import Decimal

from glimpse.errors import InvalidInputError

_LETTERS = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def _scaled(value: int | str, units: dict[str, int]) -> int | None:
    """The positive integer `value` stands for, or None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if m is None:
        return None
    number, unit = m.groups()
    if unit in _LETTERS:
        scale = _LETTERS[unit]
        if unit.isupper() and "." in number:  # as vLLM: 1.5K is refused (a fraction of 1024 is rarely meant)
            return None
    elif unit == "" or unit.lower() in units:
        scale = units.get(unit.lower(), 1)
        if scale == 1 and "." in number:  # a fraction of a byte or of a token
            return None
    else:
        return None
    result = int(Decimal(number) * scale)  # exact: 4.35k is 4350 (float arithmetic would give 4349)
    return result if result > 0 else None


def _hint(value: int | str) -> str:
    m = re.fullmatch(r"\s*(\d+\.\d+)\s*([KMGT])\s*", str(value))
    return f" (K, M, G and T take whole numbers, as in vLLM; {m[1]}{m[2].lower()} is decimal)" if m else ""


def parse_bytes(value: int | str, knob: str) -> int:
    """Bytes from an int or a string like "1GiB", "256MB", "4G" (2**30), "4g" (10**9); raises InvalidInputError
    naming the knob."""
    result = _scaled(value, _BYTE_UNITS)
    if result is None:
        raise InvalidInputError(f"{knob}={value!r} is not a positive size{_hint(value)}; use bytes or a unit like "
                                "512MiB, 2GiB, 4G (= 4 x 2^30) or 4g (= 4 x 10^9)")  # fmt: skip
    return result


def parse_count(value: int | str, knob: str) -> int:
    """A positive whole number from an int or a string like "32768", "32k" (32000), "32K" (32768), "1.5m"
    (1500000), as vLLM reads --max-model-len; raises InvalidInputError naming the knob."""
    result = _scaled(value, {})
    if result is None:
        raise InvalidInputError(f"{knob}={value!r} is not a positive whole number{_hint(value)}; write e.g. 32768, "
                                "32k (= 32000) or 32K (= 32768)")  # fmt: skip
    return result


def int_at_least(low: int, why: str = ""):
    """An argparse `type`: an integer >= `low` (argparse turns the error into "argument --flag: ...",
    exit 2). `why` is added to the message: what a smaller value would do."""
    import argparse  # only the command line needs it

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{': ' + why if why else ''}; got {value}")
        return value

    return parse
