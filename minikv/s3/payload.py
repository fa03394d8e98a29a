"""A request body as the bytes of the value: `aws-chunked` framing removed, and every integrity
claim the client made checked before the value is committed.

SDKs send a body three ways: plain (Content-Length, maybe HTTP chunked); `aws-chunked` with a
checksum trailer (`STREAMING-UNSIGNED-PAYLOAD-TRAILER`: pyarrow's aws-sdk-cpp, botocore over
TLS); `aws-chunked` with a signature per chunk (`STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER]`).
`Payload.chunks()` yields the value's bytes in all three cases, and when the body ends (before
the caller sends the last bytes to the volumes, see values.py) checks what was declared:
- the length (`x-amz-decoded-content-length` / Content-Length): IncompleteBody;
- `Content-MD5`: BadDigest; `x-amz-content-sha256` when it is a hash: XAmzContentSHA256Mismatch;
- `x-amz-checksum-crc32|sha1|sha256`, as a header or a trailer: BadDigest (crc32c and
  crc64nvme need libraries the standard library lacks: accepted unchecked);
- with credentials configured, every chunk signature and the trailer signature:
  SignatureDoesNotMatch.
(The md5 that becomes the ETag is computed by the writer, values.py; here only when a
Content-MD5 asks for it.)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable

from minikv.s3.errors import S3Error
from minikv.s3.numbers import decimal, hex_size
from minikv.s3.sigv4 import Signed

MAX_LINE = 8192  # a chunk header or trailer line
MAX_TRAILERS = 64  # trailer lines are kept until the end: their count is bounded too


class _Crc32:
    def __init__(self):
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


CHECKSUMS: dict[str, Callable] = {"crc32": _Crc32, "sha1": hashlib.sha1, "sha256": hashlib.sha256}


class Payload:
    """The value's bytes from a request body. `length` is the decoded length when declared."""

    def __init__(self, read: Callable[[], Awaitable[bytes]], headers: list[tuple[bytes, bytes]],
                 signed: Signed | None):
        self._read = read
        self.signed = signed
        h: dict[bytes, bytes] = {}
        for n, v in headers:
            h[n] = v
        self.content_sha256 = h.get(b"x-amz-content-sha256", b"").decode("latin-1")
        encoding = h.get(b"content-encoding", b"").decode("latin-1").lower()
        # `aws-chunked` in Content-Encoding alone does not make a body framed: clients send it as
        # an object's stored encoding too (S3 then drops it from what it keeps) with the hash of
        # a plain body in x-amz-content-sha256; a framed body declares a STREAMING- payload, its
        # decoded length, or (a presigned URL) no payload hash at all
        self.chunked = self.content_sha256.startswith("STREAMING-") or "aws-chunked" in encoding and (
            b"x-amz-decoded-content-length" in h or b"x-amz-content-sha256" not in h)
        self.chunk_signed = self.content_sha256.startswith("STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
        declared = h.get(b"x-amz-decoded-content-length") if self.chunked else h.get(b"content-length")
        self.length = decimal(declared)
        if declared is not None and self.length is None:
            raise S3Error("InvalidArgument", "the declared content length is not a plain decimal number")
        self.md5 = None
        self.size = 0
        self._expect_md5 = None
        if (cmd5 := h.get(b"content-md5")) is not None:
            try:
                self._expect_md5 = base64.b64decode(cmd5, validate=True)
            except binascii.Error:
                raise S3Error("InvalidDigest", "The Content-MD5 you specified was invalid.") from None
            if len(self._expect_md5) != 16:
                raise S3Error("InvalidDigest", "The Content-MD5 you specified was invalid.")
            self.md5 = hashlib.md5()
        self._sha256 = None
        if len(self.content_sha256) == 64:
            self._sha256 = hashlib.sha256()
        # checksums: declared in a header now, or announced as a trailer (value at the end)
        self._checksums: dict[str, tuple[object, bytes | None]] = {}
        for algo in CHECKSUMS:
            value = h.get(b"x-amz-checksum-" + algo.encode())
            if value is not None:
                self._checksums[algo] = (CHECKSUMS[algo](), value.strip())
        trailer = h.get(b"x-amz-trailer", b"").decode("latin-1").strip().lower()
        if trailer.startswith("x-amz-checksum-") and trailer[15:] in CHECKSUMS and trailer[15:] not in self._checksums:
            self._checksums[trailer[15:]] = (CHECKSUMS[trailer[15:]](), None)

    # -- reading --
    async def chunks(self) -> AsyncIterator[bytes]:
        source = self._dechunk() if self.chunked else self._plain()
        async for data in source:
            self.size += len(data)
            if self.length is not None and self.size > self.length:  # no need to read the rest
                raise S3Error("IncompleteBody", f"the body is longer than the {self.length} bytes declared")
            if self.md5 is not None:
                self.md5.update(data)
            if self._sha256 is not None:
                self._sha256.update(data)
            for state, _ in self._checksums.values():
                state.update(data)
            yield data
        self._check()

    async def read_all(self, limit: int) -> bytes:
        out = []
        async for data in self.chunks():
            if self.size > limit:
                raise S3Error("MaxMessageLengthExceeded", f"request body larger than {limit} bytes")
            out.append(data)
        return b"".join(out)

    async def _plain(self) -> AsyncIterator[bytes]:
        while data := await self._read():
            yield data

    async def _dechunk(self) -> AsyncIterator[bytes]:
        buf = b""

        async def more() -> bytes:
            data = await self._read()
            if not data:
                raise S3Error("IncompleteBody", "the aws-chunked body ended early")
            return data

        async def line() -> bytes:
            nonlocal buf
            while (i := buf.find(b"\r\n")) < 0:
                if len(buf) > MAX_LINE:
                    raise S3Error("InvalidRequest", "malformed aws-chunked body: line too long")
                buf += await more()
            out, buf = buf[:i], buf[i + 2:]
            return out

        previous = self.signed.signature if self.signed is not None else ""
        while True:
            header = await line()
            size_text, _, ext = header.partition(b";")
            # hex digits only: int(text, 16) would take "-1" (a size that never runs out), "0x1", " 1"
            size = hex_size(size_text)
            if size is None:
                raise S3Error("InvalidRequest", "malformed aws-chunked body: a chunk size must be hex digits, "
                              f"not {size_text[:32]!r}")
            signature = ext.partition(b"chunk-signature=")[2].strip().decode("latin-1")
            digest = hashlib.sha256() if self.chunk_signed and self.signed is not None else None
            remaining = size
            while remaining:
                if not buf:
                    buf = await more()
                piece, buf = buf[:remaining], buf[remaining:]
                remaining -= len(piece)
                if digest is not None:
                    digest.update(piece)
                yield piece
            if digest is not None:
                expected = self.signed.chunk_signature(previous, digest.hexdigest())
                if not hmac.compare_digest(expected, signature):
                    raise S3Error("SignatureDoesNotMatch", "a chunk signature of the aws-chunked body is wrong")
                previous = expected
            if size == 0:
                break
            if await line() != b"":
                raise S3Error("InvalidRequest", "malformed aws-chunked body: chunk longer than declared")
        trailer_lines = []
        while (text := await line()) != b"":
            if len(trailer_lines) == MAX_TRAILERS:
                raise S3Error("InvalidRequest", f"malformed aws-chunked body: more than {MAX_TRAILERS} trailers")
            trailer_lines.append(text)
        self._trailers(trailer_lines, previous)

    def _trailers(self, lines: list[bytes], previous: str) -> None:
        canonical = b""
        trailer_sig = None
        for text in lines:
            name, _, value = text.partition(b":")
            name, value = name.strip().lower(), value.strip()
            if name == b"x-amz-trailer-signature":
                trailer_sig = value.decode("latin-1")
                continue
            canonical += name + b":" + value + b"\n"
            if name.startswith(b"x-amz-checksum-"):
                algo = name[15:].decode("latin-1")
                if algo in self._checksums:
                    self._checksums[algo] = (self._checksums[algo][0], value)
        if self.chunk_signed and self.signed is not None and self.content_sha256.endswith("-TRAILER"):
            if trailer_sig is None or not hmac.compare_digest(
                    self.signed.trailer_signature(previous, canonical), trailer_sig):
                raise S3Error("SignatureDoesNotMatch", "the trailer signature of the aws-chunked body is wrong")

    def _check(self) -> None:
        if self.length is not None and self.size != self.length:
            raise S3Error("IncompleteBody", f"the body has {self.size} bytes, {self.length} were declared")
        if self._expect_md5 is not None and self.md5.digest() != self._expect_md5:
            raise S3Error("BadDigest", "The Content-MD5 you specified did not match what we received.")
        if self._sha256 is not None and self._sha256.hexdigest() != self.content_sha256.lower():
            raise S3Error("XAmzContentSHA256Mismatch",
                          "The provided 'x-amz-content-sha256' header does not match what was computed.")
        for algo, (state, expected) in self._checksums.items():
            if expected is None:
                continue  # announced as a trailer that never came: nothing to compare
            if base64.b64encode(state.digest()) != expected:
                raise S3Error("BadDigest", f"The {algo.upper()} you specified did not match the calculated checksum.")
