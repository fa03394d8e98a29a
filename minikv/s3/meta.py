"""What S3 needs beyond the index records, in a small LMDB of its own next to the index
(`<db>/s3/`): the multipart uploads in progress, and the ETags of objects made by multipart.

- `uploads`: upload id -> created (ms, <Q) + the object's key. The parts themselves are index
  records on the volumes (see multipart.py); this says which uploads exist and since when, so
  abandoned ones can be found (`stale_uploads`).
- `etags`: key -> fingerprint + ETag, for objects whose S3 ETag is not their md5 (multipart's
  "md5-of-md5s-N"). The fingerprint is the record's size, mtime and md5 as they were when the
  ETag was made, so an entry left behind by a plain-API DELETE and PUT is simply not used.

A separate environment, not more databases in the index's: the index keeps its small fixed
interface (get, compare-and-set, scan) and its own tools never meet S3's data.
"""

from __future__ import annotations

import os
import secrets
import struct
from collections.abc import Iterator

import lmdb

_CREATED = struct.Struct("<Q")
MAP_SIZE = 1 << 36  # address space only; the file grows with the data


def fingerprint(raw: bytes) -> bytes:
    """A LIVE record's size, mtime and md5 (bytes 1-33 of its encoding)."""
    return raw[1:33]


class Meta:
    def __init__(self, path: str, sync: bool = False):
        os.makedirs(path, exist_ok=True)
        self.env = lmdb.open(path, map_size=MAP_SIZE, sync=sync, metasync=True, readahead=False,
                             max_readers=1024, max_dbs=2)
        self.uploads = self.env.open_db(b"uploads")
        self.etags = self.env.open_db(b"etags")

    def close(self) -> None:
        self.env.close()

    # -- multipart uploads --
    def new_upload(self, key: bytes, now_ms: int) -> str:
        upload_id = secrets.token_hex(16)
        with self.env.begin(write=True, db=self.uploads) as txn:
            txn.put(upload_id.encode(), _CREATED.pack(now_ms) + key)
        return upload_id

    def upload(self, upload_id: str) -> tuple[bytes, int] | None:
        """(key, created ms) of an upload in progress, or None."""
        with self.env.begin(db=self.uploads) as txn:
            raw = txn.get(upload_id.encode("latin-1"))
        if raw is None:
            return None
        return raw[_CREATED.size:], _CREATED.unpack_from(raw)[0]

    def drop_upload(self, upload_id: str) -> bool:
        with self.env.begin(write=True, db=self.uploads) as txn:
            return txn.delete(upload_id.encode("latin-1"))

    def all_uploads(self) -> Iterator[tuple[str, bytes, int]]:
        """Every upload in progress: (id, key, created ms), in id order."""
        with self.env.begin(db=self.uploads) as txn:
            items = [(k.decode(), v[_CREATED.size:], _CREATED.unpack_from(v)[0]) for k, v in txn.cursor()]
        yield from items

    # -- ETags that are not the md5 --
    def set_etag(self, key: bytes, raw: bytes, etag: str) -> None:
        with self.env.begin(write=True, db=self.etags) as txn:
            txn.put(key, fingerprint(raw) + etag.encode())

    def etag(self, key: bytes, raw: bytes) -> str | None:
        """The stored ETag of the LIVE record `raw` of `key`, if one was made for that value."""
        with self.env.begin(db=self.etags) as txn:
            stored = txn.get(key)
        if stored is None or stored[:32] != fingerprint(raw):
            return None
        return stored[32:].decode()

    def etags_for(self, pairs: list[tuple[bytes, bytes]]) -> dict[bytes, str]:
        """ETags of many (key, raw record) at once, for a listing page (one transaction)."""
        out = {}
        with self.env.begin(db=self.etags) as txn:
            for key, raw in pairs:
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
