"""Building HTTP/1.1 responses as bytes, and the typed error that carries its own status.

Status lines are built once; a whole head goes out in one write. Header values are checked for
CR/LF here, in one place, because keys end up in `Location:` and must never split a header.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

STATUS_LINES: dict[int, bytes] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus
}


class HTTPError(Exception):
    """An error a client should see: the status it becomes and a one-line reason."""

    def __init__(self, status: int, reason: str = "", headers: list[tuple[str, str]] | None = None):
        super().__init__(reason or HTTPStatus(status).phrase)
        self.status = status
        self.reason = reason
        self.headers = headers or []


class ClientGone(Exception):
    """The client closed the connection (or timed out) before its request was read."""


def _line(name, value) -> bytes:
    if isinstance(name, str):
        name = name.encode("latin-1")
    if not isinstance(value, bytes):
        value = str(value).encode("latin-1")
    if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name:
        raise ValueError(f"CR/LF in response header {name!r}")
    return name + b": " + value + b"\r\n"


def head(status: int, headers=(), length: int | None = 0) -> bytes:
    """Status line and headers, with a Date unless `headers` has one. `length` None leaves
    Content-Length out (the caller sends Transfer-Encoding or a Content-Length of its own)."""
    if not headers and length == 0:  # 201, 204, 404...: made once a second, like the Date
        empty = _date_now()[4]
        made = empty.get(status)
        if made is None:
            made = empty[status] = STATUS_LINES[status] + b"Date: " + _date_now()[2] + b"\r\nContent-Length: 0\r\n\r\n"
        return made
    out = [STATUS_LINES[status]]
    out.extend(_line(n, v) for n, v in headers)
    if not any(n == "Date" for n, _ in headers):
        out.append(b"Date: " + http_date_bytes() + b"\r\n")
    if length is not None:
        out.append(b"Content-Length: %d\r\n" % length)
    out.append(b"\r\n")
    return b"".join(out)


def response(status: int, headers=(), body: bytes = b"") -> bytes:
    return head(status, headers, len(body)) + body


def error(status: int, reason: str = "", headers=()) -> bytes:
    """An error answer: the reason as a text body (404 stays bodiless, as minikeyvalue's)."""
    if status == 404 or not reason:
        return head(status, headers, 0)
    return response(status, [*headers, ("Content-Type", "text/plain; charset=utf-8")],
                    reason.encode("utf-8", "replace") + b"\n")


def add_close(data: bytes) -> bytes:
    """The same response with `Connection: close` added after its status line."""
    end = data.index(b"\r\n") + 2
    return data[:end] + b"Connection: close\r\n" + data[end:]


_date_cache: list = [0, "", b"", b"", {}]


def _date_now() -> list:
    now = int(time.time())
    if _date_cache[0] != now:  # recomputed at most once a second
        text = formatdate(now, usegmt=True)
        not_found = b"HTTP/1.1 404 Not Found\r\nDate: " + text.encode() + b"\r\nContent-Length: 0\r\n\r\n"
        _date_cache[:] = [now, text, text.encode(), not_found, {404: not_found}]
    return _date_cache


def not_found() -> bytes:
    """minikeyvalue's 404: no body (`Content-Length: 0`); the hottest answer, made once a second."""
    return _date_now()[3]


def http_date() -> str:
    """An RFC 1123 date for headers."""
    return _date_now()[1]


def http_date_bytes() -> bytes:
    return _date_now()[2]
