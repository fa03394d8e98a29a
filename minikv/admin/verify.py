"""`minikv verify -volumes ... -db ...`: is every key's every copy where the index says, and right?

Changes nothing. Two passes:
1. every file on the volumes of -volumes, read from their listings (admin/walk.py), one
   `<aa>/<bb>` folder at a time: orphans, copies no record names (admin/orphans.py); and each
   LIVE record whose every copy is listed with its size is noted as right (in a scratch LMDB
   beside -db, removed at the end: memory stays bounded whatever the number of keys).
2. every LIVE record: unless the walk saw it right as it is now, each replica it names is asked
   for (HEAD, or with -md5 read whole and hashed, streamed) and judged by admin/check.py:
   missing, wrong size, wrong md5, unreachable. Per key: under-replicated (fewer right copies
   than -replicas), lost (none), misplaced (not on the volumes placement names; `minikv
   rebalance` or `repair` moves it).
So a healthy cluster costs one listing per folder instead of one HEAD per copy, and whatever
the walk finds suspect is asked again by HEAD before it is reported. Given the volumes' folders
on this machine (`minikv verify ... DIR DIR DIR` in the order of -volumes, or `VOLUME=DIR` for
some, as rebuild and gc take them), pass 1 reads them straight from the file system (scandir
and a stat per file: admin/local.py) instead of the listings; the rest is the same. With -md5 every copy is
read (pass 2 for every key, the walk only for orphans).
Each problem is one line on stderr; the summary counts them. Exit code 0 when all is well, 1
when anything was found (then `minikv repair` fixes what can be fixed).
UNLINKED keys and keys with a write in flight are counted, not checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import sys
import tempfile

import lmdb

from minikv.admin.check import KINDS, inspect, judge
from minikv.admin.common import (
    PAGE,
    command_main,
    foreign_names,
    open_index,
    probe,
    show,
    stop_on_signal,
)
from minikv.admin.local import LocalWalker, volume_dirs
from minikv.admin.orphans import Orphans
from minikv.admin.progress import Progress
from minikv.admin.walk import Found, Walker
from minikv.config import Config
from minikv.http.client import Pool
from minikv.index.engine import is_url
from minikv.index.record import LIVE, PENDING, UNLINKED, decode_composite, decode_data, is_composite
from minikv.index.store import Store
from minikv.placement import epoch, key2volume, needs_rebalance
from minikv.s3.composite import manifest_key, part_key

FINDINGS = ("under-replicated", "lost", "misplaced", *KINDS, "orphans", "failed")


SEEN_BATCH = 10_000  # keys the walk saw right, written to the scratch LMDB per transaction


class Seen:
    """The LIVE records the walk saw right, by key: a scratch LMDB beside the index (its disk
    has room for an index), so memory does not grow with the number of keys."""

    def __init__(self, db: str):
        # a PostgreSQL index has no folder here: the system's temp folder then ($TMPDIR)
        parent = None if is_url(db) else os.path.dirname(os.path.abspath(db))
        self.path = tempfile.mkdtemp(prefix=".verify-", dir=parent)
        self.env = lmdb.open(self.path, map_size=1 << 40, sync=False, metasync=False, lock=False)
        self.batch: list[tuple[bytes, bytes]] = []

    def add(self, key: bytes, raw: bytes) -> None:
        self.batch.append((key, digest(raw)))
        if len(self.batch) >= SEEN_BATCH:
            self.flush()

    def flush(self) -> None:
        with self.env.begin(write=True) as txn:
            for key, value in self.batch:
                txn.put(key, value)
        self.batch = []

    def right(self, key: bytes, raw: bytes) -> bool:
        """Did the walk see this key's record, as it is now, with every copy right?"""
        return self.env.begin().get(key) == digest(raw)

    def reader(self):
        """A read transaction for many `right` questions: `txn.get(key) == digest(raw)`."""
        return self.env.begin()

    def close(self) -> None:
        self.env.close()
        shutil.rmtree(self.path, ignore_errors=True)


def digest(raw: bytes) -> bytes:
    """What Seen keeps of a record: enough to tell it changed since the walk."""
    return hashlib.md5(raw).digest()[:8]


class Verify:
    def __init__(self, config: Config, store: Store, pool: Pool, progress: Progress, with_md5: bool,
                 seen: Seen | None = None):
        self.config = config
        self.store = store
        self.pool = pool
        self.progress = progress
        self.with_md5 = with_md5
        self.seen = seen
        self.walked = set(config.volumes)
        self.epoch = epoch(config.volumes, config.replicas, config.subvolumes)

    def misplaced(self, key: bytes, record) -> list[str] | None:
        """Where placement wants the key when its record says otherwise, else None. A record
        written under this layout (its epoch) is where placement says: no hashing needed."""
        if record.epoch == self.epoch:
            return None
        c = self.config
        want = key2volume(key, c.volumes, c.replicas, c.subvolumes)
        return want if needs_rebalance(want, record.volumes) else None

    def note_misplaced(self, key: bytes, record, want: list[str] | None) -> None:
        if want is not None:
            self.progress.add("misplaced")
            self.progress.problem(f"{show(key)}: misplaced: on {','.join(record.volumes)}, placement says "
                                  f"{','.join(want)}")

    def quick(self, pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """Pass 2 for one page of records, without an await: every key the walk saw right (on a
        healthy cluster, all) is judged here, in one read of the scratch LMDB; the others are
        returned, for `key` to ask their volumes."""
        if self.seen is None:
            return pairs
        p = self.progress
        rest = []
        counts = p.counts
        with self.seen.reader() as txn:
            for key, raw in pairs:
                if raw[0] != LIVE or txn.get(key) != digest(raw):
                    rest.append((key, raw))
                    continue
                counts["seen"] += 1
                record = decode_data(raw)
                if len(record.volumes) < self.config.replicas:
                    counts["under-replicated"] += 1
                want = self.misplaced(key, record)
                self.note_misplaced(key, record, want)
                if want is None:
                    counts["ok"] += 1
        p.tick(len(pairs) - len(rest))
        return rest

    def walked_group(self, group: dict[bytes, list[Found]]) -> dict[bytes, list[Found]]:
        """Pass 1: note the LIVE records whose every copy the listings show with its size.
        Returns the part of `group` that may hold orphans (files no LIVE record names), for
        admin/orphans.py to look at: most keys need nothing more than this one read."""
        rest: dict[bytes, list[Found]] = {}
        env = getattr(self.store, "env", None)  # LMDB: one read transaction for the group
        with env.begin(db=self.store.keys) if env is not None else contextlib.nullcontext(self.store) as txn:
            for key, found in group.items():
                raw = txn.get(key)  # PostgreSQL (the bridge): a query per key
                if raw is None or raw[0] != LIVE:
                    rest[key] = found
                    continue
                record = decode_data(raw)
                sizes = {f.volume: f.size for f in found}
                if len(sizes) > len(record.volumes) or any(f.volume not in record.volumes for f in found):
                    rest[key] = found
                if self.seen is not None and all(sizes.get(v) == record.size for v in record.volumes):
                    self.seen.add(key, raw)
        return rest

    def composite(self, key: bytes, raw: bytes) -> None:
        """An S3 multipart object names no file of its own: its parts and manifest are keys
        verified as any other; here only that each still has a record."""
        upload_id, numbers = decode_composite(raw)
        missing = [k for k in [manifest_key(upload_id)] + [part_key(upload_id, n) for n in numbers]
                   if self.store.get(k) is None]
        if missing and self.store.get(key) == raw:
            self.progress.add("lost")
            self.progress.problem(f"{show(key)}: multipart object whose {show(missing[0])} has no record "
                                  f"({len(missing)} missing)")
        else:
            self.progress.add("ok")

    async def key(self, key: bytes, raw: bytes) -> None:
        p = self.progress
        p.add("seen")
        if raw[0] == PENDING:
            p.add("busy")
            return
        if raw[0] == UNLINKED:
            p.add("unlinked")
            return
        if is_composite(raw):
            return self.composite(key, raw)
        record = decode_data(raw)
        c = self.config
        want = self.misplaced(key, record)
        misplaced = want is not None
        if self.seen is not None and self.seen.right(key, raw):
            if len(record.volumes) < c.replicas:
                p.add("under-replicated")
            self.note_misplaced(key, record, want)
            if not misplaced:
                p.add("ok")
            return
        verdict = judge(record, await inspect(self.pool, key, record.volumes, self.with_md5))
        if (verdict.problems or verdict.conflict) and self.store.get(key) != raw:
            p.add("busy")  # written or deleted since we read it: what we saw is stale
            return
        for volume, kind, detail in verdict.problems:
            p.add(kind)
            p.problem(f"{show(key)}: {volume}: {kind} ({detail})")
        if verdict.conflict:
            p.add("conflicts")
            p.problem(f"{show(key)}: its copies differ in content and the record has no md5 to tell "
                      "which is right")
        if not verdict.good:
            p.add("lost")
            p.problem(f"{show(key)}: lost: no right copy left")
        elif len(verdict.good) < c.replicas:
            p.add("under-replicated")
        self.note_misplaced(key, record, want)  # after "busy" is ruled out: a stale record says nothing
        if not (verdict.problems or verdict.conflict or misplaced):
            p.add("ok")
        p.show(ok=p.counts["ok"], problems=p.lines)


async def each_record_quick(store: Store, job: Verify, concurrency: int, stop: asyncio.Event) -> None:
    """Pass 2 over every record, a page at a time: what `job.quick` settles costs no task; the
    rest is asked of the volumes by `job.key`, `concurrency` at once (an error on one key is
    counted and reported; the others go on)."""
    p = job.progress
    slots = asyncio.Semaphore(concurrency)
    running: set[asyncio.Task] = set()

    async def one(key: bytes, raw: bytes) -> None:
        try:
            await job.key(key, raw)
        except Exception as e:  # one bad key must not stop a long run; it is reported
            p.add("failed")
            p.problem(f"{show(key)}: {e!r}")
        finally:
            slots.release()
            p.tick()

    start = b""
    while not stop.is_set():
        pairs, start = store.scan(b"", start, PAGE)
        for key, raw in job.quick(pairs):
            await slots.acquire()
            if stop.is_set():
                slots.release()
                break
            task = asyncio.get_running_loop().create_task(one(key, raw))
            running.add(task)
            task.add_done_callback(running.discard)
        if not start:
            break
    await asyncio.gather(*running)


async def verify(args, config: Config) -> int:
    try:
        dirs = volume_dirs(config.volumes, args.positionals)
    except ValueError as e:
        print(f"minikv verify: {e}", file=sys.stderr)
        return 2
    store = open_index(config, "verify")
    if store is None:
        return 2
    pool = config.pool()
    try:
        down = await probe(pool, config.volumes)
        for reason in down.values():
            print(f"verify: {reason}; its copies count as unreachable", file=sys.stderr)
        if why := foreign_names(store, config):
            print(f"minikv verify: {why}", file=sys.stderr)
            return 2
        try:
            seen = None if args.md5 else Seen(config.db)
        except OSError as e:
            print(f"minikv verify: cannot make its scratch folder beside -db ({e}): make the folder "
                  "that holds -db writable, or add -md5 (which needs none and reads every copy)", file=sys.stderr)
            return 2
        try:
            walk = Progress("verify", total=256, bar_unit="dirs")
            stop = asyncio.Event()
            stop_on_signal(stop, walk)
            job = Verify(config, store, pool, walk, args.md5, seen)
            # a volume that is down has no listing: its copies are asked for (unreachable) in pass 2
            walker = LocalWalker(dirs) if dirs else Walker(pool, [v for v in config.volumes if v not in down],
                                                           args.concurrency)
            orphans = Orphans(store, pool, walk, delete=False)

            async def handle(group: dict[bytes, list[Found]]) -> None:
                if rest := job.walked_group(group):
                    await orphans.handle(rest)

            await walker.walk(await walker.roots(), handle, walk.tick, stop)
            if seen is not None:
                seen.flush()
            walk.close()
            progress = job.progress = Progress("verify", total=store.count())
            progress.start = walk.start  # the summary's time and rate are the whole command's
            progress.counts.update(walk.counts)
            progress.lines += walk.lines
            for err in walker.errors:
                progress.add("failed")
                progress.problem(f"orphan search incomplete: {err}")
            if not stop.is_set():
                stop_on_signal(stop, progress)
                await each_record_quick(store, job, args.concurrency, stop)
        finally:
            if seen is not None:
                seen.close()
        progress.summary([("seen", "keys seen"), ("ok", "ok"), ("under-replicated", "under-replicated"),
                          ("lost", "lost"), ("misplaced", "misplaced"), ("missing", "missing files"),
                          ("wrong size", "files of wrong size"), ("wrong md5", "files with wrong md5"),
                          ("unreachable", "unreachable files"), ("conflicts", "md5 conflicts"),
                          ("orphans", "orphan files"), ("failed", "failed"), ("unlinked", "unlinked"),
                          ("busy", "busy")], always=5)
        if stop.is_set():
            return 130
        found = any(progress.counts[k] for k in (*FINDINGS, "conflicts"))
        if found:
            print("verify: problems found; `minikv repair` re-replicates and moves keys "
                  "(add -delete-orphans to delete orphan files)", file=sys.stderr)
        return 1 if found else 0
    finally:
        pool.close()
        store.close()


main = command_main("verify", verify)
