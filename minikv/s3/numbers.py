"""Numbers in what S3 clients send (chunk sizes, lengths, part numbers, expiries), read strictly.

Python's `int()` is generous: it takes "+1", "-1", " 1 ", "1_000", and with base 16 "0x1";
a chunk size of -1 once made the aws-chunked reader spin without consuming input. Here a
number is plain ASCII digits only (hex digits for chunk sizes), with a bounded count of them so
no text of thousands of digits is ever converted.
"""

from __future__ import annotations

import re

from minikv.s3.errors import S3Error

_DECIMAL = re.compile(rb"[0-9]{1,19}")  # up to 2^63: any length or count S3 can mean
_HEX = re.compile(rb"[0-9a-fA-F]{1,16}")


def decimal(text: bytes | str | None) -> int | None:
    """The value of plain decimal digits, or None for anything else (sign, spaces, '_', ...)."""
    if text is None:
        return None
    if isinstance(text, str):
        if not text.isascii():
            return None
        text = text.encode()
    return int(text) if _DECIMAL.fullmatch(text) else None


def hex_size(text: bytes) -> int | None:
    """The value of plain hex digits (an aws-chunked chunk size), or None for anything else."""
    return int(text, 16) if _HEX.fullmatch(text) else None


def decimal_in(text: bytes | str | None, low: int, high: int, code: str, message: str) -> int:
    """A plain decimal between low and high inclusive, else S3Error(code, message)."""
    value = decimal(text)
    if value is None or not low <= value <= high:
        raise S3Error(code, message)
    return value
