"""What every S3 operation shares: the parsed request (`Ctx`), response building, ETags and dates."""

from __future__ import annotations

import hashlib
import secrets
from email.utils import formatdate, parsedate_to_datetime

from minikv.api.app import check_key
from minikv.http.response import HTTPError, head, http_date
from minikv.http.server import Request
from minikv.index.record import NO_MD5
from minikv.s3.errors import S3Error, from_http
from minikv.s3.numbers import decimal_in
from minikv.s3.sigv4 import Signed
from minikv.s3.xml import document


class Ctx:
    """One S3 request: path-style `/<bucket>/<object>`, the key being the decoded path."""

    __slots__ = ("req", "method", "key", "path", "query", "params", "bucket", "obj", "signed", "rid")

    def __init__(self, req: Request, key: bytes, path: bytes, query: bytes):
        self.req = req
        self.method = req.method
        self.key = key
        self.path = path
        self.query = query
        self.params: dict[str, bytes] = {}
        bucket, _, obj = key[1:].partition(b"/")
        self.bucket = bucket
        self.obj = obj
        self.signed: Signed | None = None
        self.rid = secrets.token_hex(8).upper()

    def param(self, name: str, default: str | None = None) -> str | None:
        value = self.params.get(name)
        return default if value is None else value.decode("utf-8", "surrogateescape")

    def header(self, name: bytes) -> bytes | None:
        return self.req.header(name)

    def int_param(self, name: str, default: int, low: int, high: int) -> int:
        text = self.param(name)
        if text is None or text == "":
            return default
        return decimal_in(text, low, high, "InvalidArgument",
                          f"{name} must be a whole number between {low} and {high}, not {text[:32]!r}")

    def respond(self, status: int = 200, headers=(), body: bytes = b"", length: int | None = None) -> bytes:
        hs = [("x-amz-request-id", self.rid), ("Date", http_date()), *headers]
        if body:
            hs.append(("Content-Type", "application/xml"))
        return head(status, hs, len(body) if length is None else length) + body

    def xml(self, root: str, items, status: int = 200, headers=()) -> bytes:
        return self.respond(status, headers, document(root, items))

    def error(self, e: S3Error) -> bytes:
        headers = [("x-amz-request-id", self.rid), ("Date", http_date()), *e.headers]
        if self.method == b"HEAD" or e.status == 304:
            return head(e.status, headers, 0)
        items = [("Code", e.code), ("Message", e.message), *e.fields.items(),
                 ("Resource", self.path.decode("latin-1")), ("RequestId", self.rid)]
        body = document("Error", items, namespace=False)
        return head(e.status, [*headers, ("Content-Type", "application/xml")], len(body)) + body


def object_key(key: bytes) -> None:
    """Refuse a key the volumes cannot hold, as an S3 error."""
    try:
        check_key(key)
    except HTTPError as e:
        raise from_http(e) from None


def quoted(etag: str) -> str:
    return f'"{etag}"'


def md5_etag(raw: bytes) -> str:
    md5 = raw[17:33]
    if md5 == NO_MD5:  # a value stored with -md5sum=false: an opaque tag, marked not-an-md5 by "-"
        return hashlib.md5(raw[1:17]).hexdigest() + "-1"
    return md5.hex()


def http_time(ms: int) -> str:
    return formatdate(ms / 1000, usegmt=True)


def _etags(text: bytes) -> list[str]:
    return [t.strip().strip('"').removeprefix('W/"') for t in text.decode("latin-1").split(",")]


def check_conditions(ctx: Ctx, etag: str, mtime_ms: int, prefix: bytes = b"") -> None:
    """If-Match / If-None-Match / If-(Un)Modified-Since of a GET or HEAD; with `prefix`
    `x-amz-copy-source-`, a copy's conditions on its source, where a none-match that holds is a
    412 too, not a 304. A match wins over a date, as in S3."""
    failed = S3Error("PreconditionFailed", "At least one of the pre-conditions you specified did not hold")
    unchanged = failed if prefix else S3Error("NotModified", "Not Modified", headers=[("ETag", quoted(etag))])
    if (v := ctx.header(prefix + b"if-match")) is not None:
        tags = _etags(v)
        if "*" not in tags and etag not in tags:
            raise failed
    elif (v := ctx.header(prefix + b"if-unmodified-since")) is not None and _newer(mtime_ms, v) is True:
        raise failed
    if (v := ctx.header(prefix + b"if-none-match")) is not None:
        tags = _etags(v)
        if "*" in tags or etag in tags:
            raise unchanged
    elif (v := ctx.header(prefix + b"if-modified-since")) is not None and _newer(mtime_ms, v) is False:
        raise unchanged


def _newer(mtime_ms: int, http_date_value: bytes) -> bool | None:
    """Was the value modified after that date? None if the date cannot be read (ignored, as S3 does)."""
    try:
        when = parsedate_to_datetime(http_date_value.decode("latin-1")).timestamp()
    except (TypeError, ValueError, OverflowError):  # a year like 9999999999999999999 overflows
        return None
    return mtime_ms // 1000 > when
