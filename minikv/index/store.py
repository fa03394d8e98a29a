"""The index store: key -> record bytes, behind a four-call interface (get, compare-and-set,
delete by compare-and-set, ordered prefix scan) so another backend could replace LMDB without
touching the HTTP layer.

LMDB fits the index server: many worker processes read one memory map without locks and
writers are serialised by LMDB's own robust inter-process mutex, so a compare-and-set is one
short write transaction and two workers can never both win a key.

Beside the records, `tops` holds every top-level folder `/name/` that some key is below (the
S3 buckets), kept in the same write transactions as the records: ListBuckets reads it instead
of walking the keys, which on a minikeyvalue-style index of flat keys (`/name`, no second `/`)
would read every key. It is built once, when a database made before it is first opened for
writing (one pass that jumps over each folder), and marked so by the entry TOPS_BUILT.

Durability: by default commits are not fsync'd (as goleveldb's default in the Go original).
A crashed *process* loses nothing: its commits are in the OS page cache. A power loss or kernel
crash may lose the last commits, and since nothing orders the writes then, may leave the map
damaged: use `sync=True` (`-fsync`, every commit fsync'd) where that matters. See RELIABILITY.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

import lmdb

from minikv.index.record import PENDING, check_transition

# Only address space is reserved; the file grows with the data. 1 TiB holds billions of keys.
MAP_SIZE = 1 << 40
# Set by admin/trim.py in admin commands: called every PACE records that long write transactions
# put and walks look up one by one (paced; one count for both, across calls). Scattered keys fault in pages all
# over the map (and the kernel maps up to 16 cached neighbours with each fault): 4,096 puts mapped
# most of a 1,000,000-key index in 40 ms, sooner than a thread that looks now and then could let
# go of them.
now_and_then: Callable[[], None] | None = None
PACE = 256
_counted = 0  # records since now_and_then() was last called
MAX_KEY = 511  # LMDB's compiled-in key size limit
TOPS_BUILT = b"built"  # in `tops`: the table covers every key (its folders all start with "/")


def top_of(key: bytes) -> bytes | None:
    """`/name/` for a key `/name/...` (name not empty), else None."""
    if key[:1] != b"/":
        return None
    end = key.find(b"/", 1)
    return key[:end + 1] if end > 1 else None


class StoreError(Exception):
    """The database could not be written (its disk is full, or failing): nothing changed."""


def paced(items: Iterable) -> Iterable:
    """`items`, with now_and_then() called after every PACE records when it is set (the count
    goes on from one call to the next: many small groups of lookups count as one long one)."""
    hook = now_and_then
    return items if hook is None else _paced(items, hook)


def _paced(items: Iterable, hook: Callable[[], None]) -> Iterator:
    for item in items:
        yield item
        counted(1, hook)


def counted(n: int, hook: Callable[[], None]) -> None:
    """`n` more records towards the next now_and_then() (`hook`)."""
    global _counted
    _counted += n
    if _counted >= PACE:
        _counted = 0
        hook()


class Store:
    def __init__(self, path: str, sync: bool = False, readonly: bool = False):
        os.makedirs(path, exist_ok=True)
        self.path = path
        self.env = lmdb.open(
            path, map_size=MAP_SIZE, sync=sync, metasync=True, readahead=False,
            max_readers=1024, readonly=readonly, lock=True, max_dbs=3,
        )
        # records by key; and the keys whose record is PENDING, so that recovery after a crash
        # looks at the writes that were in flight instead of scanning every key.
        self.keys = self.env.open_db(b"keys", create=not readonly)
        self.pending = self.env.open_db(b"pending", create=not readonly)
        try:
            self.tops = self.env.open_db(b"tops", create=not readonly)
        except lmdb.NotFoundError:  # read-only, on a database made before the table
            self.tops = None
        if not readonly:
            self._build_tops()

    def _build_tops(self) -> None:
        try:
            self._build_tops_now()
        except lmdb.Error:  # its disk full, say: ListBuckets walks the keys until a later start
            pass

    def _build_tops_now(self) -> None:
        with self.env.begin(write=True) as txn:
            if txn.get(TOPS_BUILT, db=self.tops) is not None:
                return
            cursor = txn.cursor(db=self.keys)
            pos = b"/"
            while cursor.set_range(pos):
                key = cursor.key()
                if key[:1] != b"/":
                    break
                top = top_of(key)
                if top is None:
                    pos = key + b"\0"
                    continue
                txn.put(top, b"", db=self.tops)
                pos = top[:-1] + b"0"  # "0" follows "/": the first key past the folder
            txn.put(TOPS_BUILT, b"", db=self.tops)

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
                if (current is None) != (new is None) and (top := top_of(key)) is not None:
                    self._track_top(txn, top, new is not None)
                if new is not None and new[0] == PENDING:
                    txn.put(key, b"", db=self.pending)
                elif current is not None and current[0] == PENDING:
                    txn.delete(key, db=self.pending)
                out.append((True, new))
        return out

    def _track_top(self, txn, top: bytes, added: bool) -> None:
        """Keep `tops` right after a key below `top` was added or removed."""
        if added:
            if txn.get(top, db=self.tops) is None:  # a read first: most keys join a known folder
                txn.put(top, b"", db=self.tops)
            return
        cursor = txn.cursor()
        if not (cursor.set_range(top) and cursor.key().startswith(top)):
            txn.delete(top, db=self.tops)  # the folder's last key is gone

    def top_folders(self, start: bytes, limit: int) -> list[bytes] | None:
        """Up to `limit` top-level folders `/name/` from `start` on, in order; None when the
        table is not there (a database made before it, opened read-only)."""
        if self.tops is None:
            return None
        out = []
        with self.env.begin(db=self.tops) as txn:
            if txn.get(TOPS_BUILT) is None:
                return None
            cursor = txn.cursor()
            if not cursor.set_range(max(start, b"/")):
                return out
            for key in cursor.iternext(values=False):
                if key[:1] != b"/" or len(out) == limit:
                    break
                out.append(key)
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
            for key, value in paced(items):
                current = txn.get(key)
                new = merge(key, current, value)
                if new is not None:
                    txn.put(key, new)
                    if current is None and (top := top_of(key)) is not None:
                        self._track_top(txn, top, True)

    def add_many(self, items: list[tuple[bytes, bytes]],
                 merge: Callable[[bytes, bytes | None, bytes], bytes | None]) -> int:
        """merge_many for a rebuild's batch, at a fraction of its cost when most keys are new:
        the keys are put only where absent, PACE at a time in one call (LMDB's putmulti, no read
        and no Python per key), and merge() runs for the keys already there. `items` sorted by
        key (and each key once) make the puts walk the tree in order. Returns how many keys
        were added."""
        added = 0
        last_top = b"\0"  # no key's top: every chunk's first key is looked at
        with self.env.begin(write=True, db=self.keys) as txn:
            cursor = txn.cursor()
            for i in range(0, len(items), PACE):
                chunk = items[i:i + PACE]
                n = cursor.putmulti(chunk, overwrite=False)[1]
                added += n
                if n != len(chunk):  # some were there: what a key holds that is not ours was there
                    for key, value in chunk:
                        current = txn.get(key)
                        if current != value and (new := merge(key, current, value)) is not None:
                            txn.put(key, new)
                for key, _ in chunk:  # sorted: a folder's keys come together, one look each
                    if not key.startswith(last_top):
                        top = top_of(key)
                        if top is not None:
                            self._track_top(txn, top, True)
                            last_top = top
                if now_and_then is not None:
                    counted(len(chunk), now_and_then)
        return added

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
