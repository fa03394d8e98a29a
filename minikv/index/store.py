"""The index store: key -> record bytes, behind a four-call interface (get, compare-and-set,
delete by compare-and-set, ordered prefix scan) so another backend could replace LMDB without
touching the HTTP layer.

LMDB fits the index server: many worker processes read one memory map without locks and
writers are serialised by LMDB's own robust inter-process mutex, so a compare-and-set is one
short write transaction and two workers can never both win a key.

Durability: by default commits are not fsync'd (as goleveldb's default in the Go original).
A crashed *process* loses nothing: its commits are in the OS page cache. A power loss or kernel
crash may lose the last commits, and since nothing orders the writes then, may leave the map
damaged: use `sync=True` (`-fsync`, every commit fsync'd) where that matters. See RELIABILITY.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import lmdb

from minikv.index.record import PENDING, check_transition

# Only address space is reserved; the file grows with the data. 1 TiB holds billions of keys.
MAP_SIZE = 1 << 40
MAX_KEY = 511  # LMDB's compiled-in key size limit


class StoreError(Exception):
    """The database could not be written (its disk is full, or failing): nothing changed."""


class Store:
    def __init__(self, path: str, sync: bool = False, readonly: bool = False):
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.env = lmdb.open(
            path, map_size=MAP_SIZE, sync=sync, metasync=True, readahead=False,
            max_readers=1024, readonly=readonly, lock=True, max_dbs=2,
        )
        # records by key; and the keys whose record is PENDING, so that recovery after a crash
        # looks at the writes that were in flight instead of scanning every key.
        self.keys = self.env.open_db(b"keys", create=not readonly)
        self.pending = self.env.open_db(b"pending", create=not readonly)

    def close(self) -> None:
        self.env.close()

    def reader_check(self) -> int:
        """Clear reader slots left by dead processes (call at start-up)."""
        return self.env.reader_check()

    def get(self, key: bytes) -> bytes | None:
        # the read transaction ends when the expression drops it (py-lmdb aborts it on release
        # and keeps it for reuse): a third cheaper than a `with` block, on every GET
        return self.env.begin(db=self.keys).get(key)

    def cas(self, key: bytes, expect: bytes | None, new: bytes | None) -> tuple[bool, bytes | None]:
        """Replace the record of `key` with `new` (None deletes it) only if it is `expect` now
        (None: absent). Returns (done, the record as it is after the call)."""
        return self.cas_many([(key, expect, new)])[0]

    def cas_many(self, ops: list[tuple[bytes, bytes | None, bytes | None]]) -> list[tuple[bool, bytes | None]]:
        """Several compare-and-sets in one write transaction (one commit, one fsync with sync=True),
        each seeing the ones before it; the same answers as cas() would give, in order."""
        try:
            return self._cas_many(ops)
        except lmdb.Error as e:  # the transaction was aborted whole
            raise StoreError(f"the index database {self.path} could not be written ({e}): "
                             "is its disk full?") from None

    def _cas_many(self, ops):
        out: list[tuple[bool, bytes | None]] = []
        with self.env.begin(write=True, db=self.keys) as txn:
            for key, expect, new in ops:
                current = txn.get(key)
                if current != expect:
                    out.append((False, current))
                    continue
                check_transition(current, new)
                if new is None:
                    txn.delete(key)
                else:
                    txn.put(key, new)
                if new is not None and new[0] == PENDING:
                    txn.put(key, b"", db=self.pending)
                elif current is not None and current[0] == PENDING:
                    txn.delete(key, db=self.pending)
                out.append((True, new))
        return out

    def pending_records(self) -> list[tuple[bytes, bytes]]:
        """Every (key, record) whose record is PENDING."""
        with self.env.begin(db=self.keys) as txn:
            keys = [k for k, _ in txn.cursor(db=self.pending)]
            return [(k, v) for k in keys if (v := txn.get(k)) is not None and v[0] == PENDING]

    def merge_many(self, items: list[tuple[bytes, bytes]],
                   merge: Callable[[bytes, bytes | None, bytes], bytes | None]) -> None:
        """For rebuild: store merge(key, current record, value) for each (key, value), all in one
        write transaction and without a state check; a merge that returns None leaves the key."""
        with self.env.begin(write=True, db=self.keys) as txn:
            for key, value in items:
                new = merge(key, txn.get(key), value)
                if new is not None:
                    txn.put(key, new)

    def scan(self, prefix: bytes, start: bytes = b"", limit: int = 0,
             keep: Callable[[bytes], bool] | None = None,
             budget: int = 0) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """Records whose key starts with `prefix`, from `start` on, in key order.

        Returns up to `limit` (0: all) pairs for which keep(value) holds, and the key to start
        the next page at (b"" when there is none). With `budget`, at most that many records are
        read, so that a caller on an event loop can take a turn between chunks of a long scan
        (each chunk its own read transaction: none is held across an await); the key returned
        is then the first one not read, whether or not it will be kept."""
        out: list[tuple[bytes, bytes]] = []
        read = 0
        with self.env.begin(db=self.keys) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(max(prefix, start)):
                return out, b""
            for key, value in cursor.iternext():
                if not key.startswith(prefix):
                    break
                if read == budget and budget:
                    return out, key
                read += 1
                if keep is not None and not keep(value):
                    continue
                if limit and len(out) == limit:
                    return out, key
                out.append((key, value))
        return out, b""

    def count(self) -> int:
        with self.env.begin(db=self.keys) as txn:
            return txn.stat(self.keys)["entries"]
