"""`minikv rebuild -volumes ... -db NEW`: make the index again from what the volumes hold.

For when the index is lost, or to take over a cluster written by the Go minikeyvalue (same
layout). The volumes are read through nginx's JSON listings (admin/walk.py); every key found
gets a LIVE record naming the volumes that hold it in placement order (those placement puts it
on first, best first, then the others), with size and mtime from the listing.

What the volumes cannot tell, and so a rebuilt index does not know:
- Unlinked keys: a volume keeps no unlink mark, so keys that were UNLINKED come back LIVE and
  readable (as in the Go original). UNLINK them again if they should stay gone.
- md5: records get none (Content-Md5 is then left out) unless `-md5` is given, which reads every
  value once, streamed, to compute it.
- Copies that disagree on size (a truncated file): the size most copies have wins (the larger
  on a tie); the others are left out of the record and show up in `verify` as orphans, and
  `repair` copies a right one over them.

Safety: rebuild writes into a path that does not exist or holds an empty index. `-force` writes
into an existing one: keys it lacks are added; for keys it has, the record is kept (state, md5)
and only gains the volumes found holding a copy of its size; a PENDING record is left alone.
That also makes an interrupted rebuild complete when run again with `-force`.
`-dry-run` reads the volumes and reports, writing nothing.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter

from minikv.admin.check import md5_of
from minikv.admin.common import all_up, command_main, show, stop_on_signal
from minikv.admin.progress import Progress
from minikv.admin.walk import Found, Walker
from minikv.config import Config
from minikv.http.client import Pool, VolumeError
from minikv.index.engine import is_url
from minikv.index.record import LIVE, NO_MD5, PENDING, decode_data, encode_data
from minikv.index.store import Store
from minikv.placement import epoch, host_of, key2volume

FLUSH = 256  # records per LMDB write transaction


def placement_order(key: bytes, volumes: list[str], config: Config) -> list[str]:
    """`volumes` with the ones placement names first (in its order), then the others ranked as
    placement ranks their servers: what the Go original's rebuild does, made deterministic."""
    want = key2volume(key, config.volumes, config.replicas, config.subvolumes)
    first = [v for v in want if v in volumes]
    rank = {h: i for i, h in enumerate(key2volume(key, config.volumes, len(config.volumes), 1))}
    rest = sorted({v for v in volumes if v not in want}, key=lambda v: (rank.get(host_of(v), len(rank)), v))
    return first + rest


def layout(key: bytes, volumes: list[str], config: Config) -> int:
    """The record's epoch: the layout's when the volumes are exactly its placement, else 0."""
    if volumes == key2volume(key, config.volumes, config.replicas, config.subvolumes):
        return epoch(config.volumes, config.replicas, config.subvolumes)
    return 0


def make_record(key: bytes, found: list[Found], config: Config, md5: bytes = NO_MD5) -> tuple[bytes, list[Found]]:
    """The LIVE record for a key's files, and the files left out (another size than most)."""
    sizes = Counter(f.size for f in found)
    size = max(sizes, key=lambda s: (sizes[s], s))
    chosen = [f for f in found if f.size == size]
    volumes = placement_order(key, [f.volume for f in chosen], config)
    record = encode_data(LIVE, volumes, size, max(f.mtime_ms for f in chosen), md5, layout(key, volumes, config))
    return record, [f for f in found if f.size != size]


class Rebuild:
    def __init__(self, config: Config, args, pool: Pool, store: Store | None, progress: Progress):
        self.config = config
        self.args = args
        self.pool = pool
        self.store = store
        self.progress = progress
        self.batch: list[tuple[bytes, bytes]] = []

    async def handle(self, group: dict[bytes, list[Found]]) -> None:
        p = self.progress
        for key, found in group.items():
            p.add("keys")
            p.add("files", len(found))
            md5 = NO_MD5
            if self.args.md5:
                md5 = await self.md5(key, found)
            record, left_out = make_record(key, found, self.config, md5)
            if left_out:
                p.add("conflicts")
                p.problem(f"{show(key)}: copies on {', '.join(f.volume for f in left_out)} differ in size from "
                          "the others and are left out of the record (`minikv repair` replaces them)")
            self.batch.append((key, record))
        p.show(keys=p.counts["keys"])
        if len(self.batch) >= FLUSH:
            self.flush()

    async def md5(self, key: bytes, found: list[Found]) -> bytes:
        """The md5 of a copy of the most common size, read as a stream (NO_MD5 if none reads)."""
        sizes = Counter(f.size for f in found)
        size = max(sizes, key=lambda s: (sizes[s], s))
        for f in found:
            if f.size != size:
                continue
            try:
                got = await md5_of(self.pool, f.volume, key)
            except VolumeError as e:
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
        if self.batch and self.store is not None:
            self.store.merge_many(self.batch, self.merge)
        elif self.batch:
            self.progress.add("written", len(self.batch))  # dry run: what would be written
        self.batch = []


async def rebuild(args, config: Config) -> int:
    pool = config.pool()
    store = None
    try:
        if not await all_up(pool, config, "rebuild",
                            "every volume must be up, or its copies would be missing from the "
                            "index: start it, or leave it out of -volumes"):
            return 1
        if not args.dry_run:
            if is_url(config.db):  # through the bridge: one transaction per batch (index/pg_sync.py)
                from minikv.admin.common import open_index

                if (store := open_index(config, "rebuild")) is None:
                    return 2
                fresh = False
            else:
                fresh = not os.path.exists(os.path.join(config.db, "data.mdb"))
                store = Store(config.db, sync=config.fsync)
            if not fresh and (n := store.count()) and not args.force:
                print(f"minikv rebuild: the index at {config.db} already holds {n} records. Rebuild into "
                      "a new path, or add -force to add what the volumes hold to it (its records are "
                      "kept)", file=sys.stderr)
                return 2
        walker = Walker(pool, config.volumes, args.concurrency)
        roots = await walker.roots()
        progress = Progress("rebuild", total=256, bar_unit="dirs")
        stop = asyncio.Event()
        stop_on_signal(stop, progress)
        job = Rebuild(config, args, pool, store, progress)
        try:
            skipped = await walker.walk(roots, job.handle, progress.tick, stop)
        finally:
            job.flush()
        c = progress.counts
        c["skipped"] = skipped
        c["errors"] = len(walker.errors)
        for err in walker.errors:
            progress.problem(f"incomplete: {err}")
        progress.summary([("keys", "keys found"), ("files", "files"),
                          ("written", "records " + ("to write (dry run)" if args.dry_run else "written")),
                          ("conflicts", "size conflicts"), ("busy", "busy"), ("kept", "kept"),
                          ("skipped", "foreign files skipped"), ("errors", "listing errors")])
        print(f"rebuild: read {len(roots)} (sub)volume folders on {len(config.volumes)} volumes. Keys that "
              "were UNLINKED before are LIVE again (volumes keep no unlink mark): UNLINK them again. "
              + ("md5s were computed (-md5)." if args.md5 else "Records have no md5 (add -md5 to compute it)."),
              file=sys.stderr)
        if stop.is_set() or walker.errors:
            print("rebuild: incomplete; run it again with -force to finish (what is written is kept)",
                  file=sys.stderr)
            return 130 if stop.is_set() else 1
        return 1 if c["failed"] else 0
    finally:
        pool.close()
        if store is not None:
            store.close()


main = command_main("rebuild", rebuild)
