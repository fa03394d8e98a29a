"""`minikv rebuild -volumes ... -db NEW [VOLUME_DIR ... | VOLUME=DIR ...]`: make the index again
from what the volumes hold.

For when the index is lost, or to take over a cluster written by the Go minikeyvalue (same
layout). The volumes are read through nginx's JSON listings (admin/walk.py), or, given their
folders on this machine, straight from the disk (admin/local.py: no volume server needed; with
VOLUME=DIR for some of them, one run per volume host, each after the first with -force, adds up
to the same index). Every key found gets a LIVE record naming the volumes that hold it in
placement order (those placement puts it on first, best first, then the others), with size and
mtime from the listing.

Speed: the 256 `<aa>` folders are shared out among -workers processes (default 2, admin/parts.py), each walking
its share with its listings asked in batches (admin/walk.py) and writing FLUSH records per transaction: on LMDB
each key is put only where it is absent and merged (below) where it is not, under LMDB's write
lock; on PostgreSQL the batch is COPYed in and inserted in one statement (admin/rebuild_pg.py).
So a batch never overwrites a record a live server changed meanwhile. Into a new LMDB index a
batch is FRESH_BATCH records, sorted and written a FLUSH-long slice of keys per transaction:
fewer pages of the tree touched per key. No server uses an index that did not exist: the rebuild
holds the servers' lock on it (minikv-server.lock) until it ends, so a server started on it
meanwhile waits, then refuses, rather than see a key it deleted come back from a batch up to
FRESH_AFTER seconds old. (With -force into an index a server runs on, a batch is 0.5 s old at
most: a key deleted in that time can come back, as from any listing older than the delete.)
Memory holds one
`<aa>/<bb>` folder per listing in flight and one batch, whatever the number of keys.

S3 multipart objects (s3/composite.py) have no file of their own: their records are written last,
from the manifests the walk found (admin/rebuild_composite.py).

What the volumes cannot tell, and so a rebuilt index does not know:
- Unlinked keys: a volume keeps no unlink mark, so keys that were UNLINKED come back LIVE and
  readable (as in the Go original). UNLINK them again if they should stay gone.
- md5: records get none (Content-Md5 is then left out) unless `-md5` is given, which reads every
  value once, streamed, to compute it.
- Copies that disagree on size (a truncated file): the size most copies have wins (the larger
  on a tie; an empty file, which a crash can leave, only when all are); the others are left out of
  the record and show up in `verify` as orphans, and `repair` copies a right one over them.
- Keys longer than the index holds (511 bytes; the Go original has no limit): each is named and
  left out, its files stay, and rebuild exits 1 once it has done the rest.

Safety: rebuild writes into a path that does not exist or holds an empty index. `-force` writes
into an existing one: keys it lacks are added; for keys it has, the record is kept (state, md5)
and only gains the volumes found holding a copy of its size; a PENDING record is left alone.
That also makes an interrupted rebuild complete when run again with `-force`.
`-dry-run` reads the volumes and reports, writing nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from operator import itemgetter
from typing import NamedTuple

from minikv.admin.common import all_up, command_main, open_index, show, stop_on_signal
from minikv.admin.local import LocalWalker, volume_dirs
from minikv.admin.parts import DEFAULT_PROCS, run_parts, shares
from minikv.admin.progress import Progress
from minikv.admin.rebuild_pg import add_many as pg_add_many
from minikv.admin.records import Placer
from minikv.admin.walk import Found, Walker
from minikv.config import Config
from minikv.http.client import Pool, VolumeError
from minikv.index.engine import is_url
from minikv.index.pg import describe
from minikv.index.record import LIVE, NO_MD5, PENDING, decode_data, encode_data, is_composite
from minikv.index.store import MAX_KEY, Store
from minikv.placement import epoch, host_of, key2path, key2volume
from minikv.replicas import md5_of

FLUSH = 16384  # records per write transaction: one commit (and fsync with -fsync) each
FLUSH_AFTER = 0.5  # seconds a found key waits at most before it is written
# Into an index that did not exist when the rebuild started (no server was using it) records are
# gathered in larger batches, still written FLUSH to a transaction: sorted, each transaction then
# holds a slice of the key range and touches that many fewer pages of the tree (1M keys: a third
# less of LMDB's work). A batch also ends at FRESH_KEY_BYTES of keys: long keys make it shorter,
# so that its memory (~30 MB a process with short keys) does not grow with them.
FRESH_BATCH = 131072
FRESH_KEY_BYTES = 8 << 20
FRESH_AFTER = 5.0
SHOW_EVERY = 0.5  # seconds between updates of the keys and rate beside the bar
EARLY = 8  # `<aa>` folders between the parts' early writes of their batches (written_early)
_first = itemgetter(0)  # a batch sorts by key alone: bytes compared, not tuples


def placement_order(key: bytes, volumes: list[str], config: Config, want: list[str] | None = None) -> list[str]:
    """`volumes` with the ones placement names first (in its order), then the others ranked as
    placement ranks their servers: what the Go original's rebuild does, made deterministic.
    `want` is the key's placement when the caller has it already (it costs a few md5s)."""
    if want is None:
        want = key2volume(key, config.volumes, config.replicas, config.subvolumes)
    first = [v for v in want if v in volumes]
    if len(first) == len(volumes):
        return first  # the usual case: every copy is where placement puts it
    rank = {h: i for i, h in enumerate(key2volume(key, config.volumes, len(config.volumes), 1))}
    rest = sorted({v for v in volumes if v not in want}, key=lambda v: (rank.get(host_of(v), len(rank)), v))
    return first + rest


def layout(key: bytes, volumes: list[str], config: Config, want: list[str] | None = None) -> int:
    """The record's epoch: the layout's when the volumes are exactly its placement, else 0."""
    if want is None:
        want = key2volume(key, config.volumes, config.replicas, config.subvolumes)
    if volumes == want:
        return epoch(config.volumes, config.replicas, config.subvolumes)
    return 0


def right_size(found: list[Found]) -> int:
    """The size of a key's copies that disagree: the one most have (the larger on a tie), and 0
    only when no copy holds bytes. An empty file is what a crash leaves (a rename that reached
    the disk before the data); an empty value is rare (the plain API refuses it, S3 allows it).
    Two empty copies that outvoted the only one holding the value would have `repair` overwrite
    it: kept, the bytes can still be deleted; overwritten, they are gone."""
    sizes = Counter(f.size for f in found)
    return max(sizes, key=lambda s: (s > 0, sizes[s], s))


def make_record(key: bytes, found: list[Found], config: Config, md5: bytes = NO_MD5) -> tuple[bytes, list[Found]]:
    """The LIVE record for a key's files, and the files left out (another size than right_size)."""
    size = found[0].size
    if any(f.size != size for f in found):
        size = right_size(found)
    chosen = [f for f in found if f.size == size]
    want = key2volume(key, config.volumes, config.replicas, config.subvolumes)
    volumes = placement_order(key, [f.volume for f in chosen], config, want)
    mtime = max(0, *(f.mtime_ms for f in chosen))  # 0, not negative, for a file dated before 1970
    record = encode_data(LIVE, volumes, size, mtime, md5, layout(key, volumes, config, want))
    return record, [f for f in found if f.size != size]


def local_md5(dirs: dict[str, str], volume: str, key: bytes) -> tuple[int, bytes] | None:
    """(size, md5) of the key's file in its volume's local folder; None when there is none."""
    host, _, sub = volume.partition("/")
    try:
        with open(dirs[host] + (f"/{sub}" if sub else "") + key2path(key), "rb") as f:
            digest = hashlib.file_digest(f, "md5")
            return f.tell(), digest.digest()
    except FileNotFoundError:
        return None


class Rebuild:
    def __init__(self, config: Config, md5: bool, pool: Pool, store: Store | None, progress: Progress,
                 dirs: dict[str, str] | None = None, fresh: bool = False, first: float = 1.0):
        self.config = config
        self.full_batch, self.batch_age = (FRESH_BATCH, FRESH_AFTER) if fresh else (FLUSH, FLUSH_AFTER)
        # the first batch a fraction of the others (Part.first), by count and by bytes (long keys
        # end batches by their bytes): the parts, walking at one pace, then write their batches in
        # turns instead of all at once, each waiting for LMDB's write lock while another holds it
        self.batch_size = max(1, int(self.full_batch * first))
        self.key_limit = max(1, int(FRESH_KEY_BYTES * first))
        self.key_bytes = 0  # of the batch's keys (FRESH_KEY_BYTES)
        self.shown = 0.0
        self.with_md5 = md5
        self.flushed = time.monotonic()
        self.pool = pool
        self.store = store
        self.progress = progress
        self.dirs = dirs or {}  # local mode: {volume: folder}; md5s are read from the files
        self.batch: list[tuple[bytes, bytes]] = []
        self.placer = Placer(config)

    async def handle(self, group: dict[bytes, list[Found]]) -> None:
        p = self.progress
        p.add("keys", len(group))
        p.add("files", sum(map(len, group.values())))
        record = self.placer.record  # looked up once per folder: a rebuild's Python per key is most of its time
        for key, found in group.items():
            if len(key) > MAX_KEY:  # the Go original's goleveldb has no limit: one such key must not end the run
                p.add("long")
                p.problem(f"{show(key)[:80]}...: {len(key)} bytes, longer than the index holds ({MAX_KEY}): left "
                          "out of it (its files stay on the volumes, readable there)")
                continue
            if self.with_md5:
                raw, left_out = make_record(key, found, self.config, await self.md5(key, found))
            else:
                raw, left_out = record(key, found)
            if left_out:
                p.add("conflicts")
                p.problem(f"{show(key)}: copies on {', '.join(f.volume for f in left_out)} differ in size from "
                          "the others and are left out of the record (`minikv repair` replaces them)")
            # self.batch each time: with -md5 over HTTP the walk's workers run handle() side by
            # side, and one's flush() starts a new batch while another awaits a value's md5
            self.batch.append((key, raw))
        self.key_bytes += sum(map(len, group))
        # a batch is also written after FLUSH_AFTER seconds: what a live server deletes meanwhile
        # is not brought back from an old listing, and an interrupted run loses little
        now = time.monotonic()
        if (len(self.batch) >= self.batch_size or self.key_bytes >= self.key_limit
                or now - self.flushed > self.batch_age):
            self.flush()
        if now - self.shown > SHOW_EVERY:
            self.shown = now
            p.show(keys=p.counts["keys"], rate=f"{p.counts['keys'] / max(p.elapsed, 1e-3):.0f} keys/s")

    async def md5(self, key: bytes, found: list[Found]) -> bytes:
        """The md5 of a copy of the most common size, read as a stream (NO_MD5 if none reads)."""
        size = right_size(found)
        for f in found:
            if f.size != size:
                continue
            try:
                got = local_md5(self.dirs, f.volume, key) if self.dirs else await md5_of(self.pool, f.volume, key)
            except (VolumeError, OSError) as e:
                self.progress.problem(f"{show(key)}: cannot read it for its md5: {e}")
                continue
            if got is not None and got[0] == size:
                return got[1]
        self.progress.add("failed")
        return NO_MD5

    def merge(self, key: bytes, current: bytes | None, new: bytes) -> bytes | None:
        record = self._merge(key, current, new)
        if record is not None:
            self.progress.add("written")
        return record

    def _merge(self, key: bytes, current: bytes | None, new: bytes) -> bytes | None:
        if current is None:
            return new
        if current[0] == PENDING:
            # a write in flight (a server runs on this index): its own outcome will be right
            self.progress.add("busy")
            return None
        if is_composite(current):  # a multipart object's record: rebuild_composite.py settles which wins
            return None
        cur, got = decode_data(current), decode_data(new)
        if cur.size != got.size:
            self.progress.add("kept")
            self.progress.problem(f"{show(key)}: the index says {cur.size} bytes, the volumes hold "
                                  f"{got.size}: record kept as it is (run `minikv verify`)")
            return None
        volumes = placement_order(key, cur.volumes + [v for v in got.volumes if v not in cur.volumes], self.config)
        md5 = cur.md5 if cur.md5 != NO_MD5 else got.md5
        if volumes == cur.volumes and md5 == cur.md5:
            return None
        return encode_data(cur.state, volumes, cur.size, cur.mtime_ms, md5, layout(key, volumes, self.config))

    def flush(self) -> None:
        if self.batch and isinstance(self.store, Store):
            self.batch.sort(key=_first)  # the puts then walk the tree in order (a key is in a batch once)
            # FLUSH keys a transaction at most: LMDB allocates a page for each page a transaction
            # changes, and keeps them for the next (up to 2*FLUSH made it 60 MB at 1M keys)
            step = -(-len(self.batch) // -(-len(self.batch) // FLUSH))
            for i in range(0, len(self.batch), step):
                self.progress.add("written", self.store.add_many(self.batch[i:i + step], self.merge))
        elif self.batch and self.store is not None:  # PostgreSQL: COPY, then one insert (rebuild_pg.py)
            self.progress.add("written", pg_add_many(self.store, self.batch, self.merge))
        elif self.batch:
            self.progress.add("written", len(self.batch))  # dry run: what would be written
        self.batch = []
        self.batch_size = self.full_batch
        self.key_limit = FRESH_KEY_BYTES
        self.key_bytes = 0
        self.flushed = time.monotonic()


class Part(NamedTuple):
    """What one process of a rebuild does: the folders `<aa>` of `aas`, into `db` (None: dry run)."""

    config: Config
    dirs: dict[str, str]
    db: str | None
    md5: bool
    concurrency: int
    aas: Iterable[int]  # parts.shares
    fresh: bool = False  # into an index that did not exist: larger batches (Rebuild)
    first: float = 1.0  # the first batch's size, a fraction of the others' (Rebuild)
    early: int = 256  # the `<aa>` folder from which on the batch is written before each, whatever its size (written_early)


def written_early(aas: Iterable[int], early: int, job: Rebuild) -> Iterator[int]:
    """The folders of `aas`, the batch written before each from `early` on. The parts end
    together (parts.Claims), each with up to a batch to write, in turns at LMDB's write lock:
    a core stood idle for 0.2-0.3 s of the last. Written before a folder near the end (another
    for each part, EARLY apart; from the 17th part on, all at folder 128), a batch goes in while
    the others still walk; after it, a batch is a folder's keys, and so is what is left at the
    end."""
    for a in aas:
        if a >= early:
            job.flush()
        yield a


async def run_part(part: Part, progress: Progress, stop: asyncio.Event, pool: Pool) -> list[str]:
    """Walk the part's folders and write their records; the listing errors (the walk is then
    incomplete). Counts go to `progress`."""
    store = None
    if part.db is not None:
        store = open_index(part.config, "rebuild") if is_url(part.db) else Store(part.db, sync=part.config.fsync)
        if store is None:
            return [f"cannot open the index {describe(part.db)}"]
    try:
        walker = LocalWalker(part.dirs) if part.dirs else Walker(pool, part.config.volumes, part.concurrency)
        roots = await walker.roots()
        progress.add("roots", len(roots))
        job = Rebuild(part.config, part.md5, pool, store, progress, part.dirs, part.fresh, part.first)
        aas = written_early(part.aas, part.early, job)
        try:
            progress.add("skipped", await walker.walk(roots, job.handle, progress.tick, stop, aas))
        finally:
            job.flush()
        return walker.errors
    finally:
        if store is not None:
            store.close()


async def _composites(config: Config, dirs: dict[str, str], pool: Pool, progress: Progress) -> None:
    """The records of S3 multipart objects, once every part and manifest has its own."""
    # imported here: it loads the S3 code, which the walk's processes need not
    from minikv.admin.rebuild_composite import composites

    store = open_index(config, "rebuild") if is_url(config.db) else Store(config.db, sync=config.fsync)
    if store is None:
        progress.problem("cannot open the index to restore the multipart objects: run rebuild again with -force")
        progress.add("failed")
        return
    try:
        await composites(store, pool, dirs, progress)
    finally:
        store.close()


async def rebuild(args, config: Config) -> int:
    try:
        dirs = volume_dirs(config.volumes, args.positionals)
    except ValueError as e:
        print(f"minikv rebuild: {e}", file=sys.stderr)
        return 2
    pool = config.pool()
    held = None  # the servers' lock on a new LMDB index, while we write it
    try:
        if not dirs and not await all_up(pool, config, "rebuild",
                                         "every volume must be up, or its copies would be missing from the "
                                         "index: start it, or leave it out of -volumes"):
            return 1
        if not args.dry_run:
            if is_url(config.db):  # through the bridge: one transaction per batch (index/pg_sync.py)
                if (store := open_index(config, "rebuild")) is None:
                    return 2
                fresh = False
            else:
                from minikv.server import try_lock_db  # here: the server's code is not the walk's

                # a new index is ours alone until we end (FRESH_AFTER): a server started on it
                # waits for the lock, then refuses. One that holds it already serves an index
                # that exists, with its own records: not new.
                held = try_lock_db(config.db, "rebuild")
                fresh = held is not None and not os.path.exists(os.path.join(config.db, "data.mdb"))
                if held is not None and not fresh:
                    os.close(held)  # an index that exists: a server may serve it meanwhile (-force)
                    held = None
                store = Store(config.db, sync=config.fsync)
            n = store.count()
            store.close()  # each part opens its own: an LMDB handle must not cross into another process
            if not fresh and n and not args.force:
                print(f"minikv rebuild: the index at {describe(config.db)} already holds {n} records. Rebuild into "
                      "a new path, or add -force to add what the volumes hold to it (its records are "
                      "kept)", file=sys.stderr)
                return 2
        progress = Progress("rebuild", total=256, bar_unit="dirs")
        stop = asyncio.Event()
        stop_on_signal(stop, progress)
        procs = max(1, min(config.workers if "workers" in args.given else DEFAULT_PROCS, 256))
        db = None if args.dry_run else config.db
        parts = [Part(config, dirs, db, args.md5, args.concurrency, aas, not args.dry_run and fresh, (i + 1) / procs,
                      max(128, 256 - EARLY * (procs - i)) if procs > 1 else 256)
                 for i, aas in enumerate(shares(procs))]
        if procs == 1:
            errors = await run_part(parts[0], progress, stop, pool)
        else:
            errors = await run_parts(run_part, "rebuild", parts, progress, stop)
        if not args.dry_run and not stop.is_set() and not errors:
            await _composites(config, dirs, pool, progress)
        c = progress.counts
        c["errors"] = len(errors)
        for err in errors:
            progress.problem(f"incomplete: {err}")
        progress.summary([("keys", "keys found"), ("files", "files"),
                          ("written", "records " + ("to write (dry run)" if args.dry_run else "written")),
                          ("conflicts", "size conflicts"), ("long", "keys too long, left out"),
                          ("busy", "busy"), ("kept", "kept"),
                          ("skipped", "foreign files skipped"), ("errors", "listing errors"),
                          ("multipart", "multipart objects")])
        print(f"rebuild: read {c['roots'] // procs} (sub)volume folders on {len(dirs or config.volumes)} volumes"
              + (" from their local folders" if dirs else "") + f" in {procs} process(es). Keys that "
              "were UNLINKED before are LIVE again (volumes keep no unlink mark): UNLINK them again. "
              + ("md5s were computed (-md5)." if args.md5 else "Records have no md5 (add -md5 to compute it)."),
              file=sys.stderr)
        if stop.is_set() or errors:
            print("rebuild: incomplete; run it again with -force to finish (what is written is kept)",
                  file=sys.stderr)
            return 130 if stop.is_set() else 1
        return 1 if c["failed"] or c["long"] else 0
    finally:
        pool.close()
        if held is not None:
            os.close(held)  # servers may start on it now


main = command_main("rebuild", rebuild)
