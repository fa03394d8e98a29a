"""Object operations: HeadObject, GetObject, PutObject, CopyObject, DeleteObject, DeleteObjects.

HEAD answers from the index record (size, md5 as ETag, mtime as Last-Modified) and the
object's attributes in the meta store (attrs.py: Content-Type, x-amz-meta-*..., a multipart
ETag and part sizes), with no redirect and no network call. GET streams the value from a healthy replica through the index,
with the client's Range forwarded to nginx and its 206 / Content-Range relayed, and with flow
control both ways (a slow client pauses the volume's socket). Writes go through values.py.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from urllib.parse import unquote_to_bytes

from minikv.http import server, splice
from minikv.http.client import VolumeError
from minikv.http.response import ClientGone
from minikv.index.engine import settle
from minikv.index.record import decode_data, is_composite
from minikv.s3 import attrs as attributes
from minikv.s3 import composite
from minikv.s3.common import Ctx, check_conditions, http_time, md5_etag, object_key, quoted
from minikv.s3.errors import S3Error
from minikv.s3.numbers import decimal_in
from minikv.s3.payload import Payload
from minikv.s3.values import Overwritten, read_chunk, readable
from minikv.s3.xml import iso_time, parse

MAX_DELETE = 1000
DELETE_BODY_LIMIT = 2 << 20
DELETES_AT_ONCE = 16
GET_TRIES = 5  # reads of the record a GET makes when overwrites keep replacing the value under it
# response-* query parameters a (presigned) GET may use to set the answer's headers
OVERRIDES = {"response-content-type": "Content-Type", "response-content-disposition": "Content-Disposition",
             "response-content-encoding": "Content-Encoding", "response-content-language": "Content-Language",
             "response-cache-control": "Cache-Control", "response-expires": "Expires"}


def no_such_key(ctx: Ctx) -> S3Error:
    return S3Error("NoSuchKey", "The specified key does not exist.",
                   Key=ctx.obj.decode("utf-8", "replace"))


def _record(s3, ctx: Ctx) -> bytes:
    raw = readable(s3.store.get(ctx.key)) if len(ctx.key) <= 511 else None
    if raw is None:
        raise no_such_key(ctx)
    return raw


def _object_headers(s3, ctx: Ctx, raw: bytes, attrs: dict) -> tuple[list, str]:
    data = decode_data(raw)
    etag = attrs.get("e") or md5_etag(raw)
    check_conditions(ctx, etag, data.mtime_ms)
    headers = [("ETag", quoted(etag)), ("Last-Modified", http_time(data.mtime_ms)),
               ("Accept-Ranges", "bytes")]
    own: dict[str, bytes | str] = dict(attributes.response_headers(attrs))
    for name, header in OVERRIDES.items():
        if (value := ctx.params.get(name)) is not None:
            _check_override(ctx, name, value)
            own[header] = value  # the bytes as sent: UTF-8 file names pass through
    own.setdefault("Content-Type", "binary/octet-stream")
    headers.extend(own.items())
    return headers, etag


_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _check_override(ctx: Ctx, name: str, value: bytes) -> None:
    """A response-* override is a header we send: only on signed requests (as S3: otherwise any
    link could serve any object as text/html from this origin), and never with CR/LF in it."""
    if ctx.signed is None and ctx.header(b"authorization") is None and "X-Amz-Signature" not in ctx.params:
        # with credentials configured every request is verified (ctx.signed); without them a
        # signature cannot be checked, but a request that carries none is anonymous for sure
        raise S3Error("InvalidRequest", "Request specific response headers cannot be used for anonymous "
                      f"GET requests ({name}): sign the request or drop the parameter")
    if _CONTROL.search(value):
        raise S3Error("InvalidArgument", f"{name} must not contain control characters (CR, LF, ...)")


def _part(ctx: Ctx, attrs: dict, size: int, headers: list) -> tuple[int, int] | None:
    """The byte range of ?partNumber=N, its headers added to `headers`: None without the
    parameter, or for part 1 of an object not made by multipart (the whole object)."""
    text = ctx.param("partNumber")
    if text is None:
        return None
    if ctx.header(b"range") is not None:
        raise S3Error("InvalidRequest", "Cannot specify both Range header and partNumber query parameter")
    number = decimal_in(text, 1, 10_000, "InvalidArgument",
                        "Part number must be an integer between 1 and 10000, inclusive")
    first, last, count = attributes.part_range(attrs, size, number)
    if "p" not in attrs:
        return None
    headers.append(("x-amz-mp-parts-count", count))
    return first, last


def head_object(s3, ctx: Ctx) -> bytes:
    raw = _record(s3, ctx)
    attrs = s3.meta.attrs(ctx.key, raw)
    headers, _ = _object_headers(s3, ctx, raw, attrs)
    size = decode_data(raw).size
    if (part := _part(ctx, attrs, size, headers)) is not None:
        headers.append(("Content-Range", f"bytes {part[0]}-{part[1]}/{size}"))
        return ctx.respond(206, headers, length=part[1] - part[0] + 1)
    return ctx.respond(200, headers, length=size)


def get_object(s3, ctx: Ctx):
    raw = _record(s3, ctx)
    return _get(s3, ctx, raw, s3.meta.attrs(ctx.key, raw))


def _get(s3, ctx: Ctx, raw: bytes, attrs: dict, tries: int = 1):
    """The GET of the value of record `raw` (with its attributes): the answer, or a coroutine
    that sends it. `tries`: how many times the record was read for it (_send)."""
    headers, _ = _object_headers(s3, ctx, raw, attrs)
    forward = []
    rng = ctx.header(b"range")
    if (part := _part(ctx, attrs, decode_data(raw).size, headers)) is not None:
        if part[1] < part[0]:  # an empty part
            return ctx.respond(200, headers, length=0)
        forward.append(("Range", f"bytes={part[0]}-{part[1]}"))
    elif rng is not None and b"," not in rng:  # S3 serves one range; several: the whole value
        # read here, not by nginx, which answers 416 to a range S3 ignores (`bytes=3-2`)
        if (found := composite.byte_range(rng.decode("latin-1"), decode_data(raw).size)) is not None:
            forward.append(("Range", f"bytes={found[0]}-{found[1]}"))
    return _send(s3, ctx, raw, headers, forward, tries)


async def _send(s3, ctx: Ctx, raw: bytes, headers: list, forward: list, tries: int = 1):
    if decode_data(raw).size == 0 and not forward:
        return ctx.respond(200, headers, length=0)
    if is_composite(raw):
        return await _send_composite(s3, ctx, raw, headers, forward)
    try:
        conn, body = await s3.values.open(ctx.key, raw, forward, checked=True)
    except Overwritten:
        conn = None  # its files are gone: another value took the key
    if conn is None or not await s3.values.kept(ctx.key, raw, conn):
        # an overwrite renamed its files in since the record was read: these bytes may be its,
        # not those the headers (ETag, Last-Modified, preconditions) were made for
        if tries >= GET_TRIES:
            raise S3Error("SlowDown", f"the object was overwritten {tries} times while it was being read: "
                          "read it again")
        current = readable(await s3.values.settled(ctx.key))
        if current is None:
            raise no_such_key(ctx)
        answer = _get(s3, ctx, current, await settle(s3.meta.attrs(ctx.key, current)), tries + 1)
        return await answer if asyncio.iscoroutine(answer) else answer
    out = ctx.req.conn
    try:
        length = conn.headers.get(b"content-length")
        if length is None:
            raise S3Error("InternalError", f"volume {conn.host} sent no Content-Length")
        if conn.status == 206 and (cr := conn.headers.get(b"content-range")) is not None:
            headers.append(("Content-Range", cr.decode("latin-1")))
        out.write(ctx.respond(conn.status, headers, length=int(length)))
        try:
            if splice.AVAILABLE and int(length) >= splice.SPLICE_MIN and not body.done \
                    and (link := splice.link(conn.transport, out.transport)) is not None:
                await _spliced(s3, conn, body, out, int(length), link)
            else:
                while chunk := await read_chunk(body, s3.pool.stall):
                    out.write(chunk)
                    await out.drain()
        except (asyncio.TimeoutError, VolumeError, splice.SourceFailed):
            # the head is out: the only way left to tell the client is to cut the connection short
            out.close()
            raise ClientGone("the volume failed mid-answer") from None
        except splice.ClientLeft as e:
            out.close()
            raise ClientGone(str(e)) from None
    finally:
        s3.pool.finish_download(conn)
    return None


async def _spliced(s3, conn, body, out, length: int, link) -> None:
    """Send the rest of a big answer socket to socket (http/splice.py): what the volume sent
    with its head is written first and drained, then the kernel moves the rest."""
    try:
        conn.transport.pause_reading()  # from here on nothing reads the volume's socket but splice
        sent = 0
        while body._chunks:
            chunk = body._chunks.popleft()
            out.write(chunk)
            sent += len(chunk)
        transport = out.transport
        if transport.get_write_buffer_size():  # wait until it is empty: the spliced bytes come after
            transport.set_write_buffer_limits(high=0)
            try:
                await out.drain()
            finally:
                transport.set_write_buffer_limits()
        if out.closed:
            raise splice.ClientLeft("client closed the connection")
        if conn.closed:
            raise splice.SourceFailed("closed the connection mid-answer")
    except BaseException:
        link.close()
        raise
    server.IO[1] += length - sent
    await splice.forward(link, length - sent, s3.pool.stall, lambda: out.closed)


async def _send_composite(s3, ctx: Ctx, raw: bytes, headers: list, forward: list) -> None:
    """A composite value (composite.py), or the range `forward` names, part after part. The
    first bytes are fetched before the head goes out, so a part that cannot be read is a 503."""
    size = decode_data(raw).size
    first, last, status = 0, size - 1, 200
    if forward and (found := composite.byte_range(forward[0][1], size)) is not None:
        (first, last), status = found, 206
        headers.append(("Content-Range", f"bytes {first}-{last}/{size}"))
    await composite.send(s3.values, s3.store, raw, first, last, ctx.req.conn,
                         lambda: ctx.respond(status, headers, length=last - first + 1))
    return None


def _payload(ctx: Ctx) -> Payload:
    payload = Payload(ctx.req.body.read, ctx.req.headers, ctx.signed)
    if payload.length is None and not ctx.req.has_body:
        payload.length = 0
    return payload


def _encoded(attrs: dict) -> bytes | None:
    return attributes.encode(attrs) if any(attrs.values()) else None


async def put_object(s3, ctx: Ctx) -> bytes:
    object_key(ctx.key)
    stored = attributes.from_headers(ctx.req.headers)  # checked before the body is read
    payload = _payload(ctx)
    live = await s3.values.put(ctx.key, payload.chunks(), payload.length, _encoded({"h": stored}))
    await settle(s3.meta.drop_etag(ctx.key))
    return ctx.respond(200, [("ETag", quoted(md5_etag(live)))])


async def copy_source(s3, ctx: Ctx, settled: bool = False) -> tuple[bytes, bytes]:
    """(key, readable record) named by x-amz-copy-source: `/bucket/key` or `bucket/key`,
    URL-encoded, maybe with `?versionId=` (there is only one version). `settled`: once no
    overwrite is in flight (Values.settled), for a copy whose source was overwritten."""
    text = ctx.header(b"x-amz-copy-source") or b""
    src = text.split(b"?", 1)[0]
    src = b"/" + unquote_to_bytes(src.lstrip(b"/"))
    if b"/" not in src[1:]:
        raise S3Error("InvalidArgument", "x-amz-copy-source must be /bucket/key")
    if len(src) > 511:
        raw = None
    else:
        raw = readable(await (s3.values.settled(src) if settled else settle(s3.store.get(src))))
    if raw is None:
        raise S3Error("NoSuchKey", "The specified key does not exist.", Key=src.decode("utf-8", "replace"))
    etag = await settle(s3.meta.etag(src, raw)) or md5_etag(raw)
    check_conditions(ctx, etag, decode_data(raw).mtime_ms, prefix=b"x-amz-copy-source-")
    return src, raw


async def copied(s3, ctx: Ctx, copy: Callable[[bytes, bytes], Awaitable[bytes]]) -> bytes:
    """`copy(src, raw)` of the copy source's key and record, read again (with the client's
    conditions checked again) when an overwrite replaced the value while it was being read, up
    to GET_TRIES times: else the bytes copied could be the new value's, stored with the old
    one's headers, past an x-amz-copy-source-if-match made for the old one."""
    for tries in range(1, GET_TRIES + 1):
        src, raw = await copy_source(s3, ctx, settled=tries > 1)
        try:
            return await copy(src, raw)
        except Overwritten:
            continue  # nothing of the copy was stored: the put stops before its first byte
    raise S3Error("SlowDown", f"the copy source was overwritten {GET_TRIES} times while it was being read: "
                  "copy it again")


async def copy_object(s3, ctx: Ctx) -> bytes:
    object_key(ctx.key)
    directive = (ctx.header(b"x-amz-metadata-directive") or b"COPY").strip().upper()
    if directive not in (b"COPY", b"REPLACE"):
        raise S3Error("InvalidArgument", "Unknown metadata directive: use COPY or REPLACE")
    replace = attributes.from_headers(ctx.req.headers) if directive == b"REPLACE" else None

    async def copy(src: bytes, raw: bytes) -> bytes:
        source_attrs = await settle(s3.meta.attrs(src, raw))
        stored = source_attrs.get("h", []) if replace is None else replace
        if src == ctx.key:
            if replace is None:
                raise S3Error("InvalidRequest", "This copy request is illegal because it is trying to copy an "
                              "object to itself without changing the object's metadata, storage class, website "
                              "redirect location or encryption attributes: use MetadataDirective=REPLACE")
            # same bytes, new headers: the value's attributes are replaced in place
            kept = {k: v for k, v in source_attrs.items() if k in ("e", "p")}
            await settle(s3.meta.put_attrs(ctx.key, raw, attributes.encode({**kept, "h": stored})))
            return raw
        size = decode_data(raw).size
        source = composite.stream(s3.values, s3.store, raw) if is_composite(raw) \
            else s3.values.stream(src, raw, expect=size, checked=True)
        live = await s3.values.put(ctx.key, source, size, _encoded({"h": stored}))
        await settle(s3.meta.drop_etag(ctx.key))
        return live

    raw = await copied(s3, ctx, copy)
    data = decode_data(raw)
    return ctx.xml("CopyObjectResult", [("LastModified", iso_time(data.mtime_ms)),
                                        ("ETag", quoted(await settle(s3.meta.etag(ctx.key, raw)) or md5_etag(raw)))])


async def delete_object(s3, ctx: Ctx) -> bytes:
    if len(ctx.key) <= 511:
        await s3.values.delete(ctx.key, s3.config.protect)
        await settle(s3.meta.drop_etag(ctx.key))
    return ctx.respond(204)  # S3 answers 204 whether or not the key existed


async def delete_objects(s3, ctx: Ctx) -> bytes:
    payload = _payload(ctx)
    doc = parse(await payload.read_all(DELETE_BODY_LIMIT), DELETE_BODY_LIMIT)
    if doc.tag != "Delete":
        raise S3Error("MalformedXML", "expected a <Delete> document")
    quiet = (doc.value("Quiet") or "").lower() == "true"
    names = [o.value("Key") for o in doc.findall("Object")]
    if len(names) > MAX_DELETE:
        raise S3Error("MalformedXML", f"at most {MAX_DELETE} keys per DeleteObjects")
    if any(n is None for n in names):
        raise S3Error("MalformedXML", "every <Object> needs a <Key>")
    if any(o.find(t) is not None for o in doc.findall("Object") for t in ("ETag", "LastModifiedTime", "Size")):
        # conditional deletes: ignoring the condition would delete what the client meant to keep
        raise S3Error("NotImplemented", "conditional deletes (ETag, LastModifiedTime or Size in an <Object>) "
                      "are not implemented by minikv: send the keys without them")
    # keys are taken verbatim: XML text is not trimmed for them
    names = [o.find("Key").text for o in doc.findall("Object")]
    gate = asyncio.Semaphore(DELETES_AT_ONCE)

    async def one(name: str):
        if not name:  # no object has it; `/<bucket>/` is a plain-API key no S3 call may delete
            return name, S3Error("UserKeyMustBeSpecified", "an <Object> with an empty <Key> names no object; "
                                 "nothing was deleted for it")
        key = b"/" + ctx.bucket + b"/" + name.encode("utf-8", "surrogateescape")
        async with gate:
            try:
                if len(key) <= 511:
                    await s3.values.delete(key, s3.config.protect)
                    await settle(s3.meta.drop_etag(key))
            except S3Error as e:
                return name, e
        return name, None

    results = await asyncio.gather(*(one(n) for n in names))
    items = []
    for name, err in results:
        if err is None:
            if not quiet:
                items.append(("Deleted", [("Key", name)]))
        else:
            items.append(("Error", [("Key", name), ("Code", err.code), ("Message", err.message)]))
    return ctx.xml("DeleteResult", items)
