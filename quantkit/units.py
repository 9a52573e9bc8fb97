"""Parsing of the human quantities on the command line: contexts ("4k"), sizes ("24GiB"), bit lists."""

from __future__ import annotations

import re

from quantkit.errors import InvalidBits, InvalidContext, InvalidSize

_CONTEXT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*$")


def parse_context(text: str) -> int:
    """"4k" -> 4096, "32K" -> 32768, "1m" -> 1048576, "3000" -> 3000. Tokens, binary k as in every card."""
    m = _CONTEXT.match(text)
    if not m:
        raise InvalidContext(text, "write a token count such as 4096 or 4k")
    value = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]
    if value != int(value):
        raise InvalidContext(text, "must come to a whole number of tokens")
    if value <= 0:
        raise InvalidContext(text, "must be a positive number of tokens")
    return int(value)


def parse_size(text: str) -> int:
    """GPU memory sizes: "24GiB", "24GB", "24G", "80gb", "16384MiB". A card sold as 24 GB has 24 GiB,
    so GB and GiB both mean 2^30 here."""
    m = _SIZE.match(text)
    if not m or not m.group(2):
        raise InvalidSize(text)
    value = float(m.group(1)) * 1024 ** {"k": 1, "m": 2, "g": 3, "t": 4}[m.group(2).lower()]
    if value <= 0:
        raise InvalidSize(text)
    return int(value)


def parse_gpu_size(text: str) -> int:
    """A card's memory: a size as `parse_size` reads it, or a bare number of GiB ("12" is a 12 GiB card:
    no card has 12 bytes)."""
    try:
        value = float(text)
    except ValueError:
        return parse_size(text)
    if not value > 0 or value != value or value == float("inf"):
        raise InvalidSize(text)
    return int(value * 1024**3)


def parse_bits(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidBits(text, "not a number") from None
    return value


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def branch_name(bits: float) -> str:
    """The Hub branch convention: 6.5 -> "6_5", 8.0 -> "8_0", 4.25 -> "4_25"."""
    whole, _, frac = f"{bits:.2f}".rstrip("0").partition(".")
    return f"{whole}_{frac or '0'}"


def format_gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"
