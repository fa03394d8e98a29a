"""Multipart uploads: CreateMultipartUpload, UploadPart(Copy), CompleteMultipartUpload,
AbortMultipartUpload, ListParts, ListMultipartUploads.

Where things are:
- an upload in progress is an entry of the `uploads` table of the S3 meta store (meta.py):
  id -> (created, the object's key);
- each part is an ordinary value on the volumes, under the internal index key
  `\\0s3/mpu/<upload id>/<part number, 5 digits>`, written like any S3 value (values.py:
  replicated, placed by its own key, md5 in its record, a retried part replaces the old one).
  The leading NUL keeps these keys out of every `/...` listing of the plain API and S3, and no
  HTTP client can write such a key (the plain API refuses NUL). They are real records, so
  crash recovery, `verify`, `repair` and `rebuild` treat them like any other value.
Nothing lives in /tmp and no part is ever held in memory.

Complete makes the object a composite value (composite.py): its record names the upload and the
parts in order, a manifest (part number 0) records the same on the volumes for `rebuild`, and no
byte is copied; the object's attributes (attrs.py: the headers given to Create, the S3 ETag
"md5-of-part-md5s-N", the part sizes for GET ?partNumber=, the upload id) are stored with its
record. The upload is then dropped and the parts Complete did not name are deleted. A failed
Complete changes nothing the client sees (the upload stays, to complete again); a Complete
retried after it succeeded (its answer lost) finds the upload id in the object's attributes and
gets the same answer again. While the manifest exists, UploadPart cannot replace a part of the
upload (checked under the part's lock: a part sent during Complete either commits before
Complete checks the parts again, and Complete then fails, or is refused). The manifest is also
what makes one Complete at a time: it is written only where none is, so a second Complete of
the upload sent while the first runs (an SDK's retry, a second client) gets 409 and changes
nothing. Two at once would each name the parts of its own list in one shared manifest, and each
delete the parts the other's object reads.

Abandoned uploads: `stale_uploads(meta, age)` lists uploads older than `age` seconds and
`abort_upload(s3, id)` removes one with its parts; parts whose upload is gone (a crash between
the two steps of an abort) are deleted by `minikv gc` too (admin/uploads.py), which uses these.
A part takes its key only once its body is complete, so an abort may not list one still being
sent: the abort looks again after dropping the upload, and a part stored later finds its upload
gone and deletes itself (NoSuchUpload). Neither ever removes a part of a completed upload (its
manifest exists): the object's DELETE or overwrite does. Open: an Abort sent while a Complete of
the same upload runs can delete parts the object then names; reading it answers 503 naming the
missing part, never other bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator

from minikv.index.engine import settle
from minikv.index.record import (
    LIVE,
    OP_REBALANCE,
    PENDING,
    decode_composite,
    decode_data,
    decode_pending,
    encode_composite,
    is_composite,
    now_ms,
)
from minikv.s3 import attrs as attributes
from minikv.s3.common import Ctx, md5_etag, object_key, quoted
from minikv.s3.composite import PART_PREFIX, UPLOAD_ID, manifest, manifest_key, part_key
from minikv.s3.composite import stream as composite_stream
from minikv.s3.errors import S3Error
from minikv.s3.numbers import decimal, decimal_in
from minikv.s3.objects import _payload, copied
from minikv.s3.values import readable
from minikv.s3.xml import iso_time, parse

MAX_PART_NUMBER = 10_000
MIN_PART_SIZE = 5 << 20  # every part but the last, as S3
COMPLETE_BODY_LIMIT = 4 << 20
DELETES_AT_ONCE = 16
MAX_UPLOADS = 1000  # uploads in one ListMultipartUploads answer, as S3
# A Complete gives up unless its object's record commits within COMPLETE_TAKES seconds of its
# manifest, so a manifest older than STALE_MANIFEST that no object uses is one a failed Complete
# could not delete (its volumes were down), or one whose worker died: the next Complete takes it
# over, not a 409 forever. The margin covers a commit under way at the deadline and the clocks of
# index servers sharing a PostgreSQL index; more only keeps a crashed Complete's upload stuck.
COMPLETE_TAKES = 120.0
STALE_MANIFEST = COMPLETE_TAKES + 60.0


async def _upload(s3, ctx: Ctx, upload_id: str | None) -> str:
    """The upload id of the request, checked to be in progress and to be for this key."""
    if upload_id is None or not UPLOAD_ID.fullmatch(upload_id):
        raise S3Error("NoSuchUpload", "The specified upload does not exist.", UploadId=upload_id or "")
    found = await settle(s3.meta.upload(upload_id))
    if found is None or found[0] != ctx.key:
        raise S3Error("NoSuchUpload", "The specified upload does not exist. The upload ID may be invalid, "
                      "or the upload may have been aborted or completed.", UploadId=upload_id)
    return upload_id


def _names(ctx: Ctx) -> list[tuple[str, str]]:
    return [("Bucket", ctx.bucket.decode("utf-8", "replace")), ("Key", ctx.obj.decode("utf-8", "replace"))]


def create(s3, ctx: Ctx) -> bytes:
    object_key(ctx.key)
    stored = attributes.from_headers(ctx.req.headers)
    upload_id = s3.meta.new_upload(ctx.key, now_ms(), attributes.encode({"h": stored}) if stored else None)
    return ctx.xml("InitiateMultipartUploadResult", [*_names(ctx), ("UploadId", upload_id)])


async def upload_part(s3, ctx: Ctx) -> bytes:
    upload_id = await _upload(s3, ctx, ctx.param("uploadId"))
    # required: without it the part would be stored as number 0, which no Complete can name
    number = decimal_in(ctx.param("partNumber"), 1, MAX_PART_NUMBER, "InvalidArgument",
                        f"Part number must be an integer between 1 and {MAX_PART_NUMBER}, inclusive")
    key = part_key(upload_id, number)
    if ctx.header(b"x-amz-copy-source") is not None:
        return await _upload_part_copy(s3, ctx, upload_id, key)
    payload = _payload(ctx)
    live = await s3.values.put(key, payload.chunks(), payload.length, check=_not_completing(s3, upload_id))
    await _still_wanted(s3, upload_id, key)
    return ctx.respond(200, [("ETag", quoted(md5_etag(live)))])


def _not_completing(s3, upload_id: str):
    """The check a part's write makes under its lock: no Complete of its upload has begun
    (its manifest, written first, is absent), so no object can name the file it replaces."""
    async def check() -> None:
        if await settle(s3.store.get(manifest_key(upload_id))) is not None:
            raise S3Error("NoSuchUpload", "The upload is being completed or was completed: its parts can no "
                          "longer be replaced; nothing was changed.", UploadId=upload_id)
    return check


def _only_complete(s3, upload_id: str, key: bytes):
    """The check the manifest's write makes under its lock: no other Complete of the upload
    holds the manifest (one in flight, or one that made the object), unless it is a stale
    one's (STALE_MANIFEST)."""
    async def check() -> None:
        raw = await settle(s3.store.get(manifest_key(upload_id)))
        previous = decode_pending(raw).previous if raw is not None and raw[0] == PENDING else None
        if not previous:
            return
        stale = now_ms() - decode_data(previous).mtime_ms > STALE_MANIFEST * 1000
        if stale and await _made_by(s3, key, upload_id) is None:
            return
        raise S3Error("OperationAborted", "another CompleteMultipartUpload of this upload is in flight or has "
                      "completed it; nothing was changed: send it again for its result", UploadId=upload_id)
    return check


def _source(s3, src: bytes, raw: bytes, forward: list, length: int):
    """The bytes of the copy source `src` (record `raw`), or of the range `forward` names."""
    if not is_composite(raw):
        return s3.values.stream(src, raw, forward, expect=length, checked=True)
    first = 0
    if forward:
        first = int(forward[0][1][len("bytes="):].split("-")[0])
    return composite_stream(s3.values, s3.store, raw, first, first + length - 1)


async def _still_wanted(s3, upload_id: str, key: bytes) -> None:
    """A part takes its key only once its body is complete (values.py), so an Abort or the
    Complete of its upload, which deletes the parts it lists, may not have seen it: stored
    after the upload was dropped, it is deleted here (else nothing would ever remove it), and
    NoSuchUpload. One stored before the drop is found by abort_upload's second look."""
    if await settle(s3.meta.upload(upload_id)) is not None:
        return
    if await settle(s3.store.get(manifest_key(upload_id))) is None:  # else an object may use it
        await s3.values.delete(key)
    raise S3Error("NoSuchUpload", "The specified upload does not exist: it was aborted or completed while "
                  "this part was being sent, and the part was not kept.", UploadId=upload_id)


async def _upload_part_copy(s3, ctx: Ctx, upload_id: str, key: bytes) -> bytes:
    live = await copied(s3, ctx, lambda src, raw: _copy_part(s3, ctx, upload_id, key, src, raw))
    await _still_wanted(s3, upload_id, key)
    data = decode_data(live)
    return ctx.xml("CopyPartResult", [("LastModified", iso_time(data.mtime_ms)),
                                      ("ETag", quoted(md5_etag(live)))])


async def _copy_part(s3, ctx: Ctx, upload_id: str, key: bytes, src: bytes, raw: bytes) -> bytes:
    """Store the part `key` from the copy source `src` (record `raw`): its new record."""
    size = decode_data(raw).size
    forward, length = [], size
    if (rng := ctx.header(b"x-amz-copy-source-range")) is not None:
        m = re.fullmatch(rb"bytes=([0-9]{1,19})-([0-9]{1,19})", rng.strip())  # bounded: no 5000-digit int()
        if m is None or int(m[1]) > int(m[2]):
            raise S3Error("InvalidArgument", "The x-amz-copy-source-range value must be of the form "
                          "bytes=first-last where first and last are the zero-based offsets of the first and last "
                          "bytes to copy, within the source object")
        if int(m[2]) >= size:
            raise S3Error("InvalidRange", f"The x-amz-copy-source-range {rng.decode('latin-1')} is outside the "
                          f"{size}-byte source object")
        forward = [("Range", rng.decode("latin-1"))]
        length = int(m[2]) - int(m[1]) + 1
    return await s3.values.put(key, _source(s3, src, raw, forward, length), length,
                               check=_not_completing(s3, upload_id))


async def _completed(s3, ctx: Ctx, upload_id: str | None) -> bytes | None:
    """The answer of a Complete that already succeeded for this upload, if the object it made
    is still the key's value (an SDK retries a Complete whose answer it lost)."""
    raw = readable(await settle(s3.store.get(ctx.key))) if upload_id and len(ctx.key) <= 511 else None
    if raw is None:
        return None
    attrs = await settle(s3.meta.attrs(ctx.key, raw))
    if attrs.get("u") != upload_id:
        return None
    return _complete_result(ctx, attrs["e"])


def _complete_result(ctx: Ctx, etag: str) -> bytes:
    location = f"http://{(ctx.header(b'host') or b'').decode('latin-1')}{ctx.path.decode('latin-1')}"
    return ctx.xml("CompleteMultipartUploadResult",
                   [("Location", location), *_names(ctx), ("ETag", quoted(etag))])


async def complete(s3, ctx: Ctx) -> bytes:
    try:
        upload_id = await _upload(s3, ctx, ctx.param("uploadId"))
    except S3Error:
        if (again := await _completed(s3, ctx, ctx.param("uploadId"))) is not None:
            return again
        raise
    doc = parse(await _payload(ctx).read_all(COMPLETE_BODY_LIMIT), COMPLETE_BODY_LIMIT)
    if doc.tag != "CompleteMultipartUpload":
        raise S3Error("MalformedXML", "expected a <CompleteMultipartUpload> document")
    wanted = []
    for node in doc.findall("Part"):
        number = decimal(node.value("PartNumber"))
        if number is None:
            raise S3Error("MalformedXML", "a <Part> without a valid <PartNumber>")
        wanted.append((number, (node.value("ETag") or "").strip('"')))
    if not wanted:
        raise S3Error("MalformedXML", "the upload must name at least one part")
    if any(a[0] > b[0] for a, b in zip(wanted, wanted[1:])):
        raise S3Error("InvalidPartOrder", "The list of parts was not in ascending order. "
                      "Parts must be ordered by part number.", UploadId=upload_id)
    # a number named twice (a client that sent a part again and kept both answers): its last
    # entry counts, as in S3, whose later upload of a part replaces the earlier one
    wanted = [w for w, after in zip(wanted, wanted[1:] + [(None, "")]) if w[0] != after[0]]
    parts = []  # (key, record)
    for i, (number, etag) in enumerate(wanted):
        key = part_key(upload_id, number)
        raw = await settle(s3.store.get(key))
        if raw is None or raw[0] != ord("L") or md5_etag(raw) != etag:
            raise S3Error("InvalidPart", "One or more of the specified parts could not be found. The part may "
                          "not have been uploaded, or the specified entity tag may not match the part's entity tag.",
                          UploadId=upload_id, PartNumber=str(number), ETag=etag)
        if i < len(wanted) - 1 and decode_data(raw).size < MIN_PART_SIZE:
            raise S3Error("EntityTooSmall", "Your proposed upload is smaller than the minimum allowed size",
                          PartNumber=str(number), MinSizeAllowed=str(MIN_PART_SIZE))
        parts.append((key, raw))
    total = sum(decode_data(raw).size for _, raw in parts)
    limit = s3.values.config.max_value_size
    if limit and total > limit:  # each part was within it: the object must be too
        raise S3Error("EntityTooLarge", f"the parts add up to {total} bytes, over the limit of {limit} bytes "
                      "(-max-value-size); nothing was changed", MaxSizeAllowed=str(limit))
    etag = hashlib.md5(b"".join(raw[17:33] for _, raw in parts)).hexdigest() + f"-{len(parts)}"

    numbers = [number for number, _ in wanted]
    mtime = now_ms()
    doc = manifest(ctx.key, mtime, numbers)
    deadline = asyncio.get_running_loop().time() + COMPLETE_TAKES
    mine = None  # the manifest's record, once this Complete committed it
    try:
        try:
            mine = await s3.values.put(manifest_key(upload_id), _one(doc), len(doc),
                                       check=_only_complete(s3, upload_id, ctx.key))
        except S3Error as e:
            mine = getattr(e, "live", None)  # stored on fewer volumes than asked: ours all the same
            if e.code == "OperationAborted" and (again := await _completed(s3, ctx, upload_id)) is not None:
                return again  # the other Complete made the object: its answer, as for a retry
            raise
        # a part sent again before the manifest existed may have replaced a file checked above:
        # its record tells (it changes before the file does); from now on none can (upload_part)
        for (number, named), (key, raw) in zip(wanted, parts):
            if not _same_value(await settle(s3.store.get(key)), raw):
                raise S3Error("InvalidPart", f"part {number} was sent again while the upload was being "
                              "completed; nothing was changed: list the parts and complete it again",
                              UploadId=upload_id, PartNumber=str(number), ETag=named)
        attrs = {"h": (await settle(s3.meta.upload_attrs(upload_id))).get("h", []), "e": etag,
                 "p": [decode_data(raw).size for _, raw in parts], "u": upload_id}
        record = encode_composite(LIVE, total, mtime, upload_id, numbers)
        await s3.values.put_record(ctx.key, record, attributes.encode(attrs), deadline)
    except BaseException:
        # the manifest goes if this Complete committed it (not one refused by the other's: the
        # same parts in the same millisecond make the same bytes) and it is still that record,
        # and no object was made after all (the failure came after the object's commit: the
        # client gone, say)
        if mine is not None and await settle(s3.store.get(manifest_key(upload_id))) == mine \
                and await _made_by(s3, ctx.key, upload_id) is None:
            try:
                await s3.values.delete(manifest_key(upload_id))
            except S3Error:
                pass  # left: the upload's parts cannot be replaced until an abort or STALE_MANIFEST
        raise
    try:
        await settle(s3.meta.drop_upload(upload_id))
        await _delete_parts(s3, upload_id, keep=set(numbers))
    except Exception:  # noqa: BLE001 - the object is complete; the rest is clean-up
        pass  # an upload left listed is removed by an abort, which keeps the parts an object uses
    return _complete_result(ctx, etag)


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _same_value(current: bytes | None, raw: bytes) -> bool:
    """Does the record `current` still stand for the value of record `raw`: unchanged, or the
    same value (size, mtime, md5) moved to other volumes, or being moved (REBALANCE)?"""
    if current == raw:
        return True
    if current is None:
        return False
    if current[0] == LIVE:
        return current[1:33] == raw[1:33]
    return current[0] == PENDING and decode_pending(current).op == OP_REBALANCE \
        and decode_pending(current).previous == raw


async def abort(s3, ctx: Ctx) -> bytes:
    upload_id = await _upload(s3, ctx, ctx.param("uploadId"))
    await abort_upload(s3, upload_id)
    return ctx.respond(204)


async def list_parts(s3, ctx: Ctx) -> bytes:
    upload_id = await _upload(s3, ctx, ctx.param("uploadId"))
    limit = ctx.int_param("max-parts", 1000, 0, 1000)
    marker = ctx.int_param("part-number-marker", 0, 0, MAX_PART_NUMBER)
    prefix = PART_PREFIX + upload_id.encode() + b"/"
    pairs, nxt = await settle(s3.store.scan(prefix, part_key(upload_id, marker + 1), limit, lambda v: v[0] == ord("L")))
    items = [*_names(ctx), ("UploadId", upload_id), ("PartNumberMarker", marker),
             ("MaxParts", limit), ("IsTruncated", bool(nxt))]
    if nxt and pairs:
        items.append(("NextPartNumberMarker", int(pairs[-1][0][-5:])))
    for key, raw in pairs:
        data = decode_data(raw)
        items.append(("Part", [("PartNumber", int(key[-5:])), ("LastModified", iso_time(data.mtime_ms)),
                               ("ETag", quoted(md5_etag(raw))), ("Size", data.size)]))
    return ctx.xml("ListPartsResult", items)


def list_uploads(s3, ctx: Ctx) -> bytes:
    """ListMultipartUploads of one bucket, in key order, paged by max-uploads (at most 1000),
    key-marker and upload-id-marker: a page reads only its own uploads."""
    base = b"/" + ctx.bucket + b"/"
    prefix = ctx.params.get("prefix", b"")
    limit = ctx.int_param("max-uploads", MAX_UPLOADS, 0, 1 << 31)
    key_marker = ctx.params.get("key-marker", b"")
    id_marker = ctx.param("upload-id-marker") or ""
    start = b""
    if key_marker:  # strictly after: the marker key's uploads after id_marker, or past all of them
        start = base + key_marker + (b"\0" + id_marker.encode() + b"\0" if id_marker else b"\1")
    found = s3.meta.uploads_from(start, base + prefix, min(limit, MAX_UPLOADS) + 1)
    page = found[:min(limit, MAX_UPLOADS)]
    truncated = bool(page) and len(found) > len(page)  # max-uploads=0: no page, so none to follow (as ListObjects)
    items: list[tuple] = [("Bucket", ctx.bucket.decode("utf-8", "replace")),
                          ("KeyMarker", key_marker.decode("utf-8", "replace")),
                          ("UploadIdMarker", id_marker if key_marker else "")]
    if truncated and page:
        items += [("NextKeyMarker", page[-1][0][len(base):].decode("utf-8", "replace")),
                  ("NextUploadIdMarker", page[-1][1])]
    if prefix:
        items.append(("Prefix", prefix.decode("utf-8", "replace")))
    items += [("MaxUploads", limit), ("IsTruncated", truncated)]
    for key, upload_id, created in page:
        items.append(("Upload", [("Key", key[len(base):].decode("utf-8", "replace")),
                                 ("UploadId", upload_id), ("Initiated", iso_time(created))]))
    return ctx.xml("ListMultipartUploadsResult", items)


# -- clean-up, also for `minikv gc` --
async def abort_upload(s3, upload_id: str) -> int:
    """Delete every part of an upload, then the upload itself; how many parts were deleted.
    If a part cannot be deleted now, the upload stays (abort again later) and S3Error is raised.
    The parts of an upload whose Complete made the object (it is the key's value) are kept."""
    if (made := await _object_of(s3, upload_id)) is not None:
        await settle(s3.meta.drop_upload(upload_id))
        deleted, _ = await _delete_parts(s3, upload_id, keep=set(decode_composite(made)[1]))
        return deleted
    deleted, failed = await _delete_parts(s3, upload_id)
    if failed:
        raise S3Error("ServiceUnavailable", f"{len(failed)} part(s) could not be deleted now "
                      f"({failed[0]}); abort the upload again later")
    await settle(s3.meta.drop_upload(upload_id))
    # once more: a part whose body was still coming when the parts were listed is stored only
    # then, and one that checked for its upload before the drop kept itself (_still_wanted).
    # One that cannot be deleted now is left to gc's orphan parts, as after a crash between the steps
    more, _ = await _delete_parts(s3, upload_id)
    return deleted + more


async def _object_of(s3, upload_id: str) -> bytes | None:
    """The composite record made by Complete of this (still listed) upload, if it is its key's value."""
    found = await settle(s3.meta.upload(upload_id))
    return await _made_by(s3, found[0], upload_id) if found is not None else None


async def _made_by(s3, key: bytes, upload_id: str) -> bytes | None:
    """The key's value (or the one a write in flight replaces), if a Complete of this upload made it."""
    raw = await settle(s3.store.get(key))
    raw = raw if raw is None or raw[0] != PENDING else decode_pending(raw).previous
    if is_composite(raw) and decode_composite(raw)[0] == upload_id:
        return raw
    return None


async def _delete_parts(s3, upload_id: str, keep: set[int] = frozenset()) -> tuple[int, list[BaseException]]:
    """Delete the parts an upload has now, but those numbered in `keep` (and then its manifest):
    (how many were deleted, the failures)."""
    pairs, _ = await settle(s3.store.scan(PART_PREFIX + upload_id.encode() + b"/"))
    if keep:
        pairs = [(k, v) for k, v in pairs if int(k[-5:]) not in keep and int(k[-5:]) != 0]
    gate = asyncio.Semaphore(DELETES_AT_ONCE)

    async def one(key: bytes) -> bool:
        async with gate:
            return await s3.values.delete(key)

    results = await asyncio.gather(*(one(k) for k, _ in pairs), return_exceptions=True)
    return sum(1 for r in results if r is True), [r for r in results if isinstance(r, BaseException)]


def stale_uploads(meta, age: float) -> list[tuple[str, bytes, int]]:
    """Uploads started more than `age` seconds ago: (id, key, created ms)."""
    cutoff = (time.time() - age) * 1000
    return [u for u in meta.all_uploads() if u[2] < cutoff]

