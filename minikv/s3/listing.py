"""ListObjectsV2, ListObjects (V1) and ListBuckets, read from the index in key order.

Bucket `b`, object `k` is the key `/b/k`, so a listing is a prefix scan of `/b/<prefix>`. With a
delimiter, the keys that share a common prefix are reported once, and the scan jumps past all of
them at once (to the smallest key after that prefix) instead of reading them: a folder with a
million files costs one seek. MaxKeys counts keys and common prefixes together, as S3 does.

A continuation token is the key to resume at (the first entry not yet returned), base64url
encoded; it is opaque to clients and stays valid whatever is written meanwhile.
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import quote

from minikv.index.record import decode_data
from minikv.s3.buckets import must_exist
from minikv.s3.common import Ctx, md5_etag, quoted
from minikv.s3.errors import S3Error
from minikv.s3.values import readable
from minikv.s3.xml import iso_time

BATCH = 256
MAX_KEYS = 1000
MAX_BUCKETS = 10_000  # S3's largest max-buckets
READ_BUDGET = 20_000  # index records one ListObjects reads at most


def successor(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with `prefix` (None: there is none)."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return None


def scan(store, prefix: bytes, start: bytes, delimiter: bytes, limit: int, budget: int = READ_BUDGET):
    """Up to `limit` entries from `start` on: ("key", key, record) and ("prefix", common prefix),
    and the key to resume at (None when the listing is complete). At most about `budget` records
    are read: records no listing shows (unlinked, being written) cost reads too, and a page
    may end early, truncated, as S3's may."""
    entries: list[tuple] = []
    pos = max(prefix, start)
    last = b""  # the last record read
    while True:
        if budget <= 0:
            # with nothing to show, resume right after the last record read (a V1 marker then)
            return entries, pos if entries else last + b"\x00"
        pairs, nxt = store.scan(prefix, pos, BATCH, None, BATCH)  # one read of BATCH records
        budget -= len(pairs)
        if pairs:
            last = pairs[-1][0]
        jumped = False
        for key, raw in pairs:
            rec = readable(raw)
            if rec is None:
                continue
            if len(entries) == limit:
                return entries, key
            if delimiter and (i := key.find(delimiter, len(prefix))) >= 0:
                common = key[:i + len(delimiter)]
                entries.append(("prefix", common, None))
                pos = successor(common)
                jumped = True
                break
            entries.append(("key", key, rec))
        if jumped:
            if pos is None:
                return entries, None
            continue
        if not nxt:
            return entries, None
        pos = nxt


def _text(data: bytes, url: bool) -> str:
    if url:
        return quote(data, safe="/")  # S3's encoding-type=url; botocore decodes it back
    return data.decode("utf-8", "replace")


OWNER = [("ID", "minikv"), ("DisplayName", "minikv")]  # one user: whoever knows the key pair


def list_objects(s3, ctx: Ctx, versions: bool = False) -> bytes:
    """ListObjectsV2, ListObjects (V1), or with `versions` ListObjectVersions: a bucket without
    versioning, so every object is its one version, `null`, and a key marker is a V1 marker."""
    v2 = not versions and ctx.param("list-type") == "2"
    prefix = ctx.params.get("prefix", b"")
    delimiter = ctx.params.get("delimiter", b"")
    max_keys = ctx.int_param("max-keys", MAX_KEYS, 0, 1 << 31)
    limit = min(max_keys, MAX_KEYS)
    encoding = ctx.param("encoding-type")
    if encoding not in (None, "", "url"):
        raise S3Error("InvalidArgument", "Invalid Encoding Method specified in Request")
    url = encoding == "url"
    base = b"/" + ctx.bucket + b"/"
    start = b""
    token = ctx.param("continuation-token") if v2 else None
    after = ctx.params.get("start-after" if v2 else "key-marker" if versions else "marker", b"")
    if token:
        try:
            start = base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise S3Error("InvalidArgument", "The continuation token provided is incorrect") from None
        if not start.startswith(base):
            raise S3Error("InvalidArgument", "The continuation token provided is incorrect")
    elif after:
        start = base + after + b"\x00"  # strictly after
        if delimiter and after.startswith(prefix) and after.find(delimiter, len(prefix)) == len(after) - len(delimiter):
            # a common prefix, as NextMarker gives them: past all of its keys, not into them again
            past = successor(base + after)
            start = past if past is not None else base[:-1] + b"0"  # "0" follows "/": past the bucket
    # MaxKeys=0 asks for nothing, and S3 says so without a truncated page
    entries, resume = scan(s3.store, base + prefix, start, delimiter, limit) if limit else ([], None)
    if not entries and resume is None:
        must_exist(s3, ctx.bucket)  # an empty answer for a bucket that is not there would be a lie
    truncated = resume is not None
    etags = s3.meta.etags_for([(k, r) for kind, k, r in entries if kind == "key"])
    cut = len(base)
    # V1 does not encode the Prefix it echoes (V2 and ListObjectVersions do)
    items: list[tuple] = [("Name", ctx.bucket.decode("utf-8", "replace")),
                          ("Prefix", _text(prefix, url and (v2 or versions)))]
    if v2:
        if "continuation-token" in ctx.params:  # echoed even when empty, as S3 does
            items.append(("ContinuationToken", token or ""))
        if after:
            items.append(("StartAfter", _text(after, url)))
        items.append(("KeyCount", len(entries)))
    elif versions:
        items.append(("KeyMarker", _text(after, url)))
        items.append(("VersionIdMarker", ctx.param("version-id-marker") or ""))
    else:
        items.append(("Marker", _text(after, url)))
    items.append(("MaxKeys", max_keys))
    if delimiter:
        items.append(("Delimiter", _text(delimiter, url)))
    if url:
        items.append(("EncodingType", "url"))
    items.append(("IsTruncated", truncated))
    if truncated:
        if v2:
            items.append(("NextContinuationToken", base64.urlsafe_b64encode(resume).rstrip(b"=").decode()))
        else:
            marker = entries[-1][1][cut:] if entries else resume[cut:-1]  # nothing shown: after the last read
            items.append(("NextKeyMarker" if versions else "NextMarker", _text(marker, url)))
            if versions:
                items.append(("NextVersionIdMarker", "null"))
    owner = not v2 or ctx.param("fetch-owner", "").lower() == "true"
    for kind, key, rec in entries:
        if kind == "key":
            data = decode_data(rec)
            fields = [("Key", _text(key[cut:], url))]
            if versions:
                fields += [("VersionId", "null"), ("IsLatest", True)]
            fields += [("LastModified", iso_time(data.mtime_ms)),
                       ("ETag", quoted(etags.get(key) or md5_etag(rec))),
                       ("Size", data.size),
                       ("StorageClass", "STANDARD")]
            if owner:
                fields.append(("Owner", OWNER))
            items.append(("Version" if versions else "Contents", fields))
    for kind, key, _ in entries:
        if kind == "prefix":
            items.append(("CommonPrefixes", [("Prefix", _text(key[cut:], url))]))
    return ctx.xml("ListVersionsResult" if versions else "ListBucketResult", items)


def buckets(store, start: bytes = b"/", limit: int = MAX_BUCKETS) -> tuple[list[bytes], bytes | None]:
    """Up to `limit` top-level folders `/b/` (b: the bucket) from `start` on, in key order, of
    keys that have a second path segment; and the folder to resume at (None: no more). Read from
    the index's table of top-level folders, so flat keys (minikeyvalue style) cost nothing."""
    tops = store.top_folders(start, limit + 1)
    if isinstance(tops, tuple):  # PostgreSQL's: a bounded walk of the keys, and where it stopped
        tops, stop = tops
        if len(tops) <= limit:
            return tops, stop
    elif tops is None:  # a database opened read-only, made before that table: walk the keys
        tops = _walk_tops(store, start, limit + 1)
    return tops[:limit], tops[limit] if len(tops) > limit else None


def _walk_tops(store, pos: bytes, limit: int) -> list[bytes]:
    out: list[bytes] = []
    while len(out) < limit:
        pairs, _ = store.scan(b"/", pos, 1)
        if not pairs:
            break
        key = pairs[0][0]
        name, slash, _ = key[1:].partition(b"/")
        if slash and name:
            out.append(b"/" + name + b"/")
            pos = b"/" + name + b"0"  # "0" follows "/": past the folder in one seek
        else:
            pos = key + b"\x00"
    return out


def list_buckets(s3, ctx: Ctx) -> bytes:
    """ListBuckets, paged as S3 pages it (max-buckets, continuation-token, prefix): one answer
    names at most MAX_BUCKETS buckets."""
    limit = ctx.int_param("max-buckets", MAX_BUCKETS, 1, MAX_BUCKETS)
    prefix = ctx.params.get("prefix", b"")
    start = b"/" + prefix
    if token := ctx.param("continuation-token"):
        try:
            resume = base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            resume = b""
        if not resume.startswith(start):
            raise S3Error("InvalidArgument", "The continuation token provided is incorrect")
        start = resume
    # the buckets with keys (the index's folders) and those CreateBucket made, merged in order;
    # each source is complete only up to where it was cut
    tops, cut = buckets(s3.store, start, limit)
    made_list = s3.meta.buckets_from(start, limit + 1)
    made = dict(made_list)
    if len(made_list) > limit:
        cut = made_list[limit][0] if cut is None else min(cut, made_list[limit][0])
    known = sorted(t for t in set(tops) | set(made) if cut is None or t < cut)
    names, resume = (known[:limit], known[limit]) if len(known) > limit else (known, cut)
    tops = [t for t in names if t.startswith(b"/" + prefix)]  # sorted: the prefix's folders are together
    dates = first_writes(s3.store, [t for t in tops if t not in made])
    if len(tops) < len(names) or (resume is not None and not resume.startswith(b"/" + prefix)):
        resume = None
    items: list[tuple] = [
        ("Owner", OWNER),
        ("Buckets", [("Bucket", [("Name", t[1:-1].decode("utf-8", "replace")),
                                 ("CreationDate", iso_time(made[t] if t in made else dates[t]))])
                     for t in tops]),
    ]
    if resume is not None:
        items.append(("ContinuationToken", base64.urlsafe_b64encode(resume).rstrip(b"=").decode()))
    if prefix:
        items.append(("Prefix", prefix.decode("utf-8", "replace")))
    return ctx.xml("ListAllMyBucketsResult", items)


def first_writes(store, tops: list[bytes]) -> dict[bytes, int]:
    """first_write of each of `tops`; on an engine that answers over the network, in one
    statement for the page (index/pg.py: first_records), not one round trip per bucket."""
    if not tops or not getattr(store, "walks_tops", False):
        return {t: first_write(store, t) for t in tops}
    found = store.first_records(tops, 8)
    out = {}
    for top in tops:
        live = [rec for raw in found.get(top, ()) if (rec := readable(raw)) is not None]
        out[top] = decode_data(live[0]).mtime_ms if live else 0  # as first_write
    return out


def first_write(store, top: bytes) -> int:
    """A bucket that only its keys make: dated by its first key's last write (ms). A few
    records at most: a page names up to MAX_BUCKETS buckets."""
    pairs, _ = store.scan(top, top, 8, None, 8)
    for _, raw in pairs:
        if (rec := readable(raw)) is not None:
            return decode_data(rec).mtime_ms
    return 0  # only keys being written or unlinked: no date to give


def bucket_is_empty(s3, ctx: Ctx) -> bool:
    entries, resume = scan(s3.store, b"/" + ctx.bucket + b"/", b"", b"", 1)
    return not entries and resume is None  # many records no listing shows: not known to be empty
