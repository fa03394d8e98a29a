"""Composite objects: what CompleteMultipartUpload makes instead of writing every byte again.

The parts of a completed upload stay where UploadPart put them (ordinary values under
`\\0s3/mpu/<upload id>/<nnnnn>`, see multipart.py), and the object's record says so: a composite
record (index/record.py) holds the total size, the mtime, the upload id and the part numbers in
order. No file lies under the object's own key. Readers stream the parts in order, each from one
of its replicas; the admin tools treat the parts as the ordinary values they are and leave the
composite record alone (it names no volume).

The manifest: a small ordinary value under the upload's part number 0 (`.../00000`, a number no
UploadPart can use) holding the object's key, mtime and part numbers. It is what `rebuild` turns
back into the object's record (the index is not on the volumes), and while it exists the upload's
parts belong to an object: UploadPart refuses to replace one, and abort and gc's clean-up of
orphan parts (admin/uploads.py) leave them.

Order of writes of Complete: manifest -> parts checked unchanged -> object's record (compare-and-
set over whatever the key held) -> a plain value's files it replaced deleted, the key held again
meanwhile (values.put_record) -> upload dropped -> unused parts deleted. Removing a composite
value (DELETE, overwrite): record changed first, then the manifest (so a rebuild no longer
brings it back), then the parts; a part that cannot be deleted then is an orphan (upload and
manifest gone), which `minikv gc` deletes.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator

from minikv.http.response import ClientGone
from minikv.index.engine import settle
from minikv.index.record import (
    LIVE,
    OP_REBALANCE,
    UNLINKED,
    decode_composite,
    decode_data,
    encode_pending,
    is_composite,
    now_ms,
    readable,
)
from minikv.index.store import MAX_KEY
from minikv.s3.errors import S3Error

PART_PREFIX = b"\x00s3/mpu/"
MANIFEST_NUMBER = 0
MANIFEST_MAGIC = b"minikv-composite 1\n"
MANIFEST_LIMIT = 1 << 20  # 10,000 part numbers and a key fit many times over
MAX_PART = 10_000  # S3's highest part number (s3/multipart.py)
UPLOAD_ID = re.compile(r"[0-9a-f]{32}")  # what meta.new_upload makes (secrets.token_hex(16))
DELETES_AT_ONCE = 16
_RANGE = re.compile(r"[bB][yY][tT][eE][sS]=\s*([0-9]{0,19})-([0-9]{0,19})\s*")  # bounded: no 5000-digit int()


def part_key(upload_id: str, number: int) -> bytes:
    return PART_PREFIX + upload_id.encode() + b"/%05d" % number


def manifest_key(upload_id: str) -> bytes:
    return part_key(upload_id, MANIFEST_NUMBER)


def manifest(key: bytes, mtime_ms: int, numbers: list[int]) -> bytes:
    """The manifest's bytes: magic line, the object's key (base64), mtime, part numbers."""
    return b"".join((MANIFEST_MAGIC, base64.b64encode(key), b"\n%d\n" % mtime_ms,
                     b",".join(b"%d" % n for n in numbers), b"\n"))


def manifest_upload(key: bytes) -> str | None:
    """The upload id of `key` when it is a manifest's (`<PART_PREFIX><upload id>/00000`), else
    None: a file on a volume can be named anything, and an id that is not UTF-8 ended rebuild's
    multipart step, one holding `/` made a record no reader can decode."""
    if not (key.startswith(PART_PREFIX) and key.endswith(b"/00000")):
        return None
    upload_id = key[len(PART_PREFIX):-6].decode("latin-1")
    return upload_id if UPLOAD_ID.fullmatch(upload_id) else None


def parse_manifest(data: bytes) -> tuple[bytes, int, list[int]] | None:
    """(object key, mtime ms, part numbers) of a manifest's bytes, None if they are not one."""
    if not data.startswith(MANIFEST_MAGIC):
        return None
    try:
        key, mtime, numbers = data[len(MANIFEST_MAGIC):].split(b"\n")[:3]
        key, ms, parts = base64.b64decode(key, validate=True), int(mtime), [int(n) for n in numbers.split(b",")]
    except ValueError:
        return None
    # a crafted or damaged one is no manifest: an empty key, or a mtime no record holds, ended
    # rebuild's multipart step with an exception from the index or the record's encoding
    if not 0 < len(key) <= MAX_KEY or not 0 <= ms < 1 << 63 or not all(0 < n <= MAX_PART for n in parts):
        return None
    return key, ms, parts


async def parts(store, raw: bytes) -> list[tuple[bytes, bytes]]:
    """(key, readable record) of every part of the composite record `raw`, in order: one scan
    of the upload's keys. 503 if one is missing or its sizes do not add up to the object's."""
    upload_id, numbers = decode_composite(raw)
    pairs, _ = await settle(store.scan(PART_PREFIX + upload_id.encode() + b"/", part_key(upload_id, 1)))
    found = dict(pairs)
    out = []
    for number in numbers:
        key = part_key(upload_id, number)
        record = found.get(key)
        record = record if record is None or record[0] == LIVE else readable(record)
        if record is None:
            raise S3Error("ServiceUnavailable", f"part {number} of this multipart object has no readable record "
                          f"(upload {upload_id}): run `minikv verify`")
        out.append((key, record))
    if sum(decode_data(r).size for _, r in out) != decode_data(raw).size:
        raise S3Error("InternalError", f"the parts of upload {upload_id} do not add up to the object's size")
    return out


async def rebalance(values, raw: bytes) -> None:
    """Move the manifest and parts of the composite record `raw` onto the volumes placement names
    for them now, one after the other: they are ordinary values, but under internal keys no URL
    names, so a REBALANCE of the object (what `rebalance -server` sends) is what reaches them.
    S3Error: 409 when one is being written or moved, 503 when a copy fails (it stays where it was)."""
    from minikv.admin.move import LostLock, move_key
    from minikv.http.client import VolumeError
    from minikv.index.recovery import cas_or_later

    upload_id, numbers = decode_composite(raw)
    for key in [manifest_key(upload_id), *(part_key(upload_id, n) for n in numbers)]:
        part = await settle(values.store.get(key))
        if part is None or part[0] == UNLINKED:
            continue  # nothing to move: `minikv verify` reports the object's missing part
        if part[0] != LIVE:
            raise S3Error("OperationAborted", "a part of this object is being written or moved: try again")
        volumes = values.placement(key)
        if decode_data(part).volumes == volumes:
            continue
        pending = encode_pending(OP_REBALANCE, values.pid, now_ms(), volumes, part)
        done, _ = await settle(values.store.cas(key, part, pending))
        if not done:
            raise S3Error("OperationAborted", "a part of this object is being written or moved: try again")
        try:
            await move_key(values.pool, values.store, key, part, volumes, pending, values.health.is_up,
                           values.epoch, detach=True)
        except VolumeError as e:
            raise S3Error("ServiceUnavailable", f"{e}; that part stays where it was") from None
        except LostLock as e:
            raise S3Error("OperationAborted", str(e)) from None
        except Exception:  # a bug, or the index away: the part must not stay locked
            await cas_or_later(values.store, key, pending, part)
            raise


async def stream(values, store, raw: bytes, first: int = 0, last: int | None = None) -> AsyncIterator[bytes]:
    """Bytes `first`..`last` (inclusive; None: to the end) of the composite value `raw`, part
    after part, each part streamed from one of its replicas (a Range for the parts cut)."""
    found = await parts(store, raw)
    end = decode_data(raw).size - 1 if last is None else last
    offset = 0
    for key, record in found:
        size = decode_data(record).size
        lo, hi = max(first, offset), min(end, offset + size - 1)
        if lo <= hi:
            headers = [] if (lo, hi) == (offset, offset + size - 1) else [("Range", f"bytes={lo - offset}-{hi - offset}")]
            async for chunk in values.stream(key, record, headers, expect=hi - lo + 1):
                yield chunk
        offset += size
        if offset > end:
            break


async def send(values, store, raw: bytes, first: int, last: int, out, head) -> None:
    """Write `head()` (the answer's head) and then bytes `first`..`last` of the composite value
    `raw` to the client connection `out`. The first bytes are fetched before the head goes out,
    so a part that cannot be read raises S3Error with nothing sent; once the head is out, a
    failure can only cut the connection short (ClientGone)."""
    source = stream(values, store, raw, first, last)
    started = False
    try:
        chunk = await anext(source, b"")
        out.write(head())
        started = True
        while chunk:
            out.write(chunk)
            await out.drain()
            chunk = await anext(source, b"")
    except S3Error:
        if not started:
            raise
        out.close()
        raise ClientGone("a part failed mid-answer") from None
    finally:
        await source.aclose()


async def drop_manifest(values, raw: bytes) -> str:
    """Delete the manifest of the composite value `raw`: "" when done, else why not."""
    upload_id, _ = decode_composite(raw)
    try:
        await values.delete(manifest_key(upload_id))
    except S3Error as e:
        return f"the manifest of upload {upload_id} could not be deleted: {e.message}"
    return ""


async def remove(values, raw: bytes | None) -> list[str]:
    """Delete the manifest, then the parts, of the composite value `raw` whose record is gone
    (or no longer names it): the reasons of what could not be deleted (then orphans for gc)."""
    if not is_composite(raw):
        return []
    if why := await drop_manifest(values, raw):
        return [why]
    upload_id, numbers = decode_composite(raw)
    gate = asyncio.Semaphore(DELETES_AT_ONCE)

    async def one(number: int) -> None:
        async with gate:
            await values.delete(part_key(upload_id, number))

    results = await asyncio.gather(*(one(n) for n in numbers), return_exceptions=True)
    return [str(r) for r in results if isinstance(r, BaseException)]


def byte_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) of a single `bytes=` range of a `size`-byte value; None for a header that
    is not one (the whole value is sent, as S3 and RFC 9110 ignore a range they cannot read);
    416 InvalidRange when it starts past the end. Every S3 GET reads its Range here, so an
    ordinary value (nginx) and a composite one answer alike."""
    m = _RANGE.fullmatch(header.strip())
    if m is None:
        return None
    first_text, last_text = m[1], m[2]
    if not first_text:
        if not last_text:
            return None
        if int(last_text) == 0:
            _unsatisfiable()
        if size == 0:  # the last n bytes of nothing: the whole (empty) value, as nginx answers
            return None
        return max(0, size - int(last_text)), size - 1
    first = int(first_text)
    if last_text and int(last_text) < first:
        return None
    if first >= size:
        _unsatisfiable()
    return first, size - 1 if not last_text else min(int(last_text), size - 1)


def _unsatisfiable():
    raise S3Error("InvalidRange", "The requested range is not satisfiable")
