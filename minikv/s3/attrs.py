"""Object attributes S3 keeps beside the bytes: the headers a client set on the write
(Content-Type, Cache-Control, Content-Disposition, Content-Encoding, Content-Language, Expires,
x-amz-meta-*), the ETag when it is not the md5 (multipart's "md5-of-md5s-N"), the part sizes of
a multipart object (GET ?partNumber=) and the id of the upload that made it (so a retried
CompleteMultipartUpload is answered again).

Pure logic: taking them from a request, checking them, encoding them for the meta store
(meta.py keeps them per value, next to the index, so the plain API's read path never pays for
them) and turning them back into response headers.

An attribute set is a dict: "h" [[name, value]...] (latin-1 text of the header bytes, names in
lower case), "e" ETag, "p" [part sizes], "u" upload id. Encoded as compact JSON.
"""

from __future__ import annotations

import json
import re

from minikv.s3.errors import S3Error

# headers S3 stores with an object and sends back on GET/HEAD
STORED = (b"content-type", b"cache-control", b"content-disposition", b"content-encoding",
          b"content-language", b"expires")
USER_PREFIX = b"x-amz-meta-"
USER_LIMIT = 2048  # bytes of x-amz-meta-* names and values, as S3
# what S3 answers, by stored name
CANONICAL = {b"content-type": "Content-Type", b"cache-control": "Cache-Control",
             b"content-disposition": "Content-Disposition", b"content-encoding": "Content-Encoding",
             b"content-language": "Content-Language", b"expires": "Expires"}
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def from_headers(headers: list[tuple[bytes, bytes]]) -> list[list[str]]:
    """The headers of a write request S3 keeps with the object, checked: 400 MetadataTooLarge
    past 2 KB of user metadata, 400 InvalidArgument for a control character (a value we store
    is a header we send later)."""
    out = []
    user = 0
    for name, value in headers:
        if name in STORED or name.startswith(USER_PREFIX):
            if _CONTROL.search(value):
                raise S3Error("InvalidArgument", f"header {name.decode('latin-1')} must not contain control "
                              "characters")
            if name.startswith(USER_PREFIX):
                user += len(name) - len(USER_PREFIX) + len(value)
                if user > USER_LIMIT:
                    raise S3Error("MetadataTooLarge", f"Your metadata headers exceed the maximum allowed "
                                  f"metadata size: x-amz-meta-* names and values may hold {USER_LIMIT} bytes "
                                  "in all", MaxSizeAllowed=str(USER_LIMIT))
            if name == b"content-encoding" and not (value := _without_aws_chunked(value)):
                continue
            out.append([name.decode("latin-1"), value.decode("latin-1")])
    return out


def _without_aws_chunked(value: bytes) -> bytes:
    """Content-Encoding less its `aws-chunked` codings: they name the framing of the request's
    body (payload.py removes it), not an encoding of the object, so S3 does not keep them."""
    if b"aws-chunked" not in value.lower():
        return value
    return b", ".join(c.strip() for c in value.split(b",") if c.strip() and c.strip().lower() != b"aws-chunked")


def response_headers(attrs: dict) -> list[tuple[str, bytes]]:
    """The stored headers as response headers (the bytes as they were sent)."""
    out = []
    for name, value in attrs.get("h", ()):
        raw_name = name.encode("latin-1")
        out.append((CANONICAL.get(raw_name, name), value.encode("latin-1")))
    return out


def encode(attrs: dict) -> bytes:
    return json.dumps(attrs, separators=(",", ":")).encode()


def decode(raw: bytes | None) -> dict:
    if not raw:
        return {}
    try:
        found = json.loads(raw)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def part_range(attrs: dict, size: int, number: int) -> tuple[int, int, int]:
    """(first byte, last byte, parts count) of part `number` of an object: a multipart object's
    own parts; any other object is one part. 416 InvalidPartNumber out of range."""
    parts = attrs.get("p") or [size]
    if not 1 <= number <= len(parts):
        raise S3Error("InvalidPartNumber", "The requested partnumber is not satisfiable", status=416,
                      PartNumberRequested=str(number), ActualPartCount=str(len(parts)))
    first = sum(parts[:number - 1])
    return first, first + parts[number - 1] - 1, len(parts)
