"""What S3 needs beyond the index records, in a small LMDB of its own next to the index
(`<db>/s3/`): the multipart uploads in progress, and the ETags of objects made by multipart.

- `uploads`: upload id -> created (ms, <Q) + the object's key. The parts themselves are index
  records on the volumes (see multipart.py); this says which uploads exist and since when, so
  abandoned ones can be found (`stale_uploads`).
- `upload_keys`: the object's key + NUL + upload id -> created, the same uploads in key order, so
  ListMultipartUploads reads one bucket's page instead of every upload (kept in the same write
  transactions; built once when a store made before it is opened, marked by UPLOAD_KEYS_BUILT).
- `buckets`: `/name/` -> created (ms, <Q), for the buckets made by CreateBucket (a bucket also
  exists while any key lies below `/name/`: see buckets.py). Kept as the folder, not the name,
  so it sorts as the index's folders do and ListBuckets can merge the two in one pass.
- `etags`: key -> fingerprint + ETag, for objects whose S3 ETag is not their md5 (multipart's
  "md5-of-md5s-N"). The fingerprint is the record's size, mtime and md5 as they were when the
  ETag was made, so an entry left behind by a plain-API DELETE and PUT is simply not used.
  Written by versions before `attrs`; still read, never written.
- `attrs`: hash of the key + fingerprint -> the object's attributes (attrs.py: stored headers,
  ETag, part sizes). One entry per value, not per key, so it is written BEFORE the record that
  makes the value LIVE: a reader never sees a new value with the old value's headers, and a
  write that fails never touches the attributes of the value it meant to replace. The writer
  drops the replaced value's entry after its commit; one left by a crash in between, or by a
  plain-API DELETE, is never read again (its fingerprint is gone) and costs ~100 bytes.
  The headers given to CreateMultipartUpload wait there too, under NUL + "u" + upload id (no
  value's entry is that short), until Complete gives them to the object.

A separate environment, not more databases in the index's: the index keeps its small fixed
interface (get, compare-and-set, scan) and its own tools never meet S3's data.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
from collections.abc import Iterator

import lmdb

from minikv.s3.attrs import decode

_CREATED = struct.Struct("<Q")
MAP_SIZE = 1 << 36  # address space only; the file grows with the data
UPLOAD_KEYS_BUILT = b"\0built"  # object keys start with "/": this entry is not an upload


def fingerprint(raw: bytes) -> bytes:
    """A LIVE record's size, mtime and md5 (bytes 1-33 of its encoding)."""
    return raw[1:33]


def attrs_key(key: bytes, raw: bytes) -> bytes:
    """The `attrs` entry of one value of a key (hashed: keys go up to 511 bytes, LMDB's limit)."""
    return hashlib.blake2b(key, digest_size=32).digest() + fingerprint(raw)


class Meta:
    def __init__(self, path: str, sync: bool = False):
        os.makedirs(path, exist_ok=True)
        self.env = lmdb.open(path, map_size=MAP_SIZE, sync=sync, metasync=True, readahead=False,
                             max_readers=1024, max_dbs=8)
        self.uploads = self.env.open_db(b"uploads")
        self.etags = self.env.open_db(b"etags")
        self.upload_keys = self.env.open_db(b"upload_keys")
        self.attrs_db = self.env.open_db(b"attrs")
        self.buckets = self.env.open_db(b"buckets")
        try:
            with self.env.begin(write=True) as txn:
                if txn.get(UPLOAD_KEYS_BUILT, db=self.upload_keys) is None:
                    for upload_id, raw in txn.cursor(db=self.uploads):
                        txn.put(raw[_CREATED.size:] + b"\0" + upload_id, raw[:_CREATED.size], db=self.upload_keys)
                    txn.put(UPLOAD_KEYS_BUILT, b"", db=self.upload_keys)
        except lmdb.Error:  # its disk full, say: uploads_from reads every upload until a later start
            pass

    def close(self) -> None:
        self.env.close()

    # -- multipart uploads --
    def new_upload(self, key: bytes, now_ms: int, attrs: bytes | None = None) -> str:
        upload_id = secrets.token_hex(16)
        with self.env.begin(write=True, db=self.uploads) as txn:
            txn.put(upload_id.encode(), _CREATED.pack(now_ms) + key)
            txn.put(key + b"\0" + upload_id.encode(), _CREATED.pack(now_ms), db=self.upload_keys)
            if attrs:
                txn.put(b"\0u" + upload_id.encode(), attrs, db=self.attrs_db)
        return upload_id

    def upload_attrs(self, upload_id: str) -> dict:
        """The attributes CreateMultipartUpload was given for the object."""
        with self.env.begin(db=self.attrs_db) as txn:
            return decode(txn.get(b"\0u" + upload_id.encode("latin-1")))

    def upload(self, upload_id: str) -> tuple[bytes, int] | None:
        """(key, created ms) of an upload in progress, or None."""
        with self.env.begin(db=self.uploads) as txn:
            raw = txn.get(upload_id.encode("latin-1"))
        if raw is None:
            return None
        return raw[_CREATED.size:], _CREATED.unpack_from(raw)[0]

    def drop_upload(self, upload_id: str) -> bool:
        with self.env.begin(write=True, db=self.uploads) as txn:
            raw = txn.get(upload_id.encode("latin-1"))
            if raw is not None:
                txn.delete(raw[_CREATED.size:] + b"\0" + upload_id.encode("latin-1"), db=self.upload_keys)
            txn.delete(b"\0u" + upload_id.encode("latin-1"), db=self.attrs_db)
            return txn.delete(upload_id.encode("latin-1"))

    def uploads_from(self, start: bytes, prefix: bytes, limit: int) -> list[tuple[bytes, str, int]]:
        """Up to `limit` uploads whose key starts with `prefix`, in (key, id) order from the
        position `start` (a key, or key + NUL + id) on: (key, id, created ms)."""
        out = []
        with self.env.begin(db=self.upload_keys) as txn:
            if txn.get(UPLOAD_KEYS_BUILT) is None:  # not built yet: the slow way
                found = sorted((k + b"\0" + i.encode(), k, i, t) for i, k, t in self.all_uploads()
                               if k.startswith(prefix))
                return [(k, i, t) for entry, k, i, t in found if entry >= start][:limit]
            cursor = txn.cursor()
            if not cursor.set_range(max(start, prefix)):
                return out
            for entry, created in cursor:
                if not entry.startswith(prefix) or len(out) == limit:
                    break
                key, _, upload_id = entry.rpartition(b"\0")
                out.append((key, upload_id.decode(), _CREATED.unpack(created)[0]))
        return out

    def all_uploads(self) -> Iterator[tuple[str, bytes, int]]:
        """Every upload in progress: (id, key, created ms), in id order."""
        with self.env.begin(db=self.uploads) as txn:
            items = [(k.decode(), v[_CREATED.size:], _CREATED.unpack_from(v)[0]) for k, v in txn.cursor()]
        yield from items

    # -- object attributes (attrs.py) --
    def put_attrs(self, key: bytes, raw: bytes, encoded: bytes) -> None:
        with self.env.begin(write=True, db=self.attrs_db) as txn:
            txn.put(attrs_key(key, raw), encoded)

    def attrs(self, key: bytes, raw: bytes) -> dict:
        """The attributes of the LIVE record `raw` of `key` ({} if none were stored)."""
        with self.env.begin(db=self.attrs_db) as txn:
            found = txn.get(attrs_key(key, raw))
            if found is None:
                old = txn.get(key, db=self.etags)
                if old is not None and old[:32] == fingerprint(raw):
                    return {"e": old[32:].decode()}
                return {}
        return decode(found)

    def drop_attrs(self, key: bytes, raw: bytes) -> None:
        entry = attrs_key(key, raw)
        with self.env.begin(db=self.attrs_db) as txn:
            present = txn.get(entry) is not None
        if present:  # a read first: most values have none, and a write transaction costs more
            with self.env.begin(write=True, db=self.attrs_db) as txn:
                txn.delete(entry)

    # -- buckets made by CreateBucket --
    def create_bucket(self, name: bytes, now_ms: int) -> bool:
        """Record the bucket `name` as made now; False (and no change) if it was made before."""
        with self.env.begin(write=True, db=self.buckets) as txn:
            return txn.put(b"/" + name + b"/", _CREATED.pack(now_ms), overwrite=False)

    def bucket_created(self, name: bytes) -> int | None:
        """When CreateBucket made `name` (ms), or None."""
        with self.env.begin(db=self.buckets) as txn:
            raw = txn.get(b"/" + name + b"/")
        return None if raw is None else _CREATED.unpack(raw)[0]

    def drop_bucket(self, name: bytes) -> bool:
        with self.env.begin(write=True, db=self.buckets) as txn:
            return txn.delete(b"/" + name + b"/")

    def buckets_from(self, start: bytes, limit: int) -> list[tuple[bytes, int]]:
        """Up to `limit` buckets made by CreateBucket, in order from the folder `start` on:
        (`/name/`, created ms)."""
        out = []
        with self.env.begin(db=self.buckets) as txn:
            cursor = txn.cursor()
            if cursor.set_range(start):
                for name, raw in cursor:
                    if len(out) == limit:
                        break
                    out.append((name, _CREATED.unpack(raw)[0]))
        return out

    # -- ETags that are not the md5 --
    def set_etag(self, key: bytes, raw: bytes, etag: str) -> None:
        with self.env.begin(write=True, db=self.etags) as txn:
            txn.put(key, fingerprint(raw) + etag.encode())

    def etag(self, key: bytes, raw: bytes) -> str | None:
        """The stored ETag of the LIVE record `raw` of `key`, if one was made for that value."""
        return self.attrs(key, raw).get("e")

    def etags_for(self, pairs: list[tuple[bytes, bytes]]) -> dict[bytes, str]:
        """ETags of many (key, raw record) at once, for a listing page (one transaction)."""
        out = {}
        with self.env.begin(db=self.etags) as txn:
            for key, raw in pairs:
                found = txn.get(attrs_key(key, raw), db=self.attrs_db)
                if found is not None:
                    if etag := decode(found).get("e"):
                        out[key] = etag
                    continue
                stored = txn.get(key)
                if stored is not None and stored[:32] == fingerprint(raw):
                    out[key] = stored[32:].decode()
        return out

    def drop_etag(self, key: bytes) -> None:
        with self.env.begin(db=self.etags) as txn:
            present = txn.get(key) is not None
        if present:  # a read first: most objects never had one, and a write transaction costs more
            with self.env.begin(write=True, db=self.etags) as txn:
                txn.delete(key)
