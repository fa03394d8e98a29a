"""The plain API's GET and HEAD of a composite value (an S3 multipart object, s3/composite.py).

There is no file to redirect to: the bytes are the upload's parts, each an ordinary value on its
own volumes. HEAD answers 200 with the total size from the record; GET streams the parts through
the index, in order, each from one of its replicas, with a single `Range: bytes=` answered 206
(416 past the end), as nginx would for an ordinary value. No Content-Md5: the md5 of the whole
is not computed. Only these keys take this path: for every other key a read is still one record
and a 302 (api/app.py checks one byte of the record).
"""

from __future__ import annotations

from minikv.http.response import HTTPError, head
from minikv.index.engine import settle
from minikv.index.record import LIVE, decode_data, readable
from minikv.index.store import StoreError
from minikv.s3 import composite
from minikv.s3.errors import S3Error


def read(app, key: bytes, raw: bytes, is_head: bool, req):
    size = decode_data(raw).size
    first, last, status, headers = 0, size - 1, 200, [("Accept-Ranges", "bytes")]
    rng = req.header(b"range") if req is not None else None
    if rng is not None:
        try:
            found = composite.byte_range(rng.decode("latin-1"), size)
        except S3Error:
            raise HTTPError(416, "the range starts past the end of the value",
                            [("Content-Range", f"bytes */{size}")]) from None
        if found is not None:
            (first, last), status = found, 206
            headers.append(("Content-Range", f"bytes {first}-{last}/{size}"))
    if is_head or size == 0 or app.s3 is None:
        return head(status, headers, last - first + 1)
    return _stream(app, key, raw, req, status, headers, first, last)


async def _stream(app, key: bytes, raw: bytes, req, status: int, headers: list, first: int, last: int) -> None:
    values = app.s3.values
    try:
        await composite.send(values, values.store, raw, first, last, req.conn,
                             lambda: head(status, headers, last - first + 1))
    except S3Error as e:  # nothing was sent yet
        try:
            now = await settle(values.store.get(key))
        except StoreError:
            now = raw  # cannot tell: the error as it was
        if now is None or now[0] != LIVE and readable(now) is None:
            raise HTTPError(404) from None  # deleted (or unlinked) while being read
        raise HTTPError(503, e.message) from None
