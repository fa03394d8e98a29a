"""`minikv verify -volumes ... -db ...`: is every key's every copy where the index says, and right?

Changes nothing. Two passes:
1. every file on the volumes of -volumes, read from their listings (admin/walk.py), one
   `<aa>/<bb>` folder at a time: each key's copies and their sizes are noted (in a scratch LMDB
   beside -db, removed at the end: memory stays bounded whatever the number of keys; see
   admin/seen.py for why the walk asks the index nothing).
2. every record, in key order beside those notes: a LIVE record whose every copy was listed
   with its size is right; for any other, each replica it names is asked for (HEAD, or with
   -md5 read whole and hashed, streamed) and judged by admin/check.py: missing, wrong size,
   wrong md5, unreachable. Per key: under-replicated (fewer right copies than -replicas), lost
   (none), misplaced (not on the volumes placement names; `minikv rebalance` or `repair` moves
   it). Listed copies that no record names are orphans (admin/orphans.py asks again first).
Pass 1 is shared out among -workers processes (default 2, admin/parts.py), a share of the
256 `<aa>` folders each, as rebuild's walk is: it is CPU-bound (Python, and the kernel for local
folders). A process that dies makes the run fail: its share's orphans were not searched (its
keys are still checked, by pass 2 asking their volumes).
So a healthy cluster costs one listing per folder instead of one HEAD per copy, and whatever
the walk finds suspect is asked again by HEAD before it is reported. Given the volumes' folders
on this machine (`minikv verify ... DIR DIR DIR` in the order of -volumes, or `VOLUME=DIR` for
some, as rebuild and gc take them), pass 1 reads them straight from the file system (listdir
and an lstat per file: admin/local.py) instead of the listings; the rest is the same. With -md5 every copy is
read (pass 2 for every key, the notes only for orphans).
Each problem is one line on stderr; the summary counts them. Exit code 0 when all is well, 1
when anything was found (then `minikv repair` fixes what can be fixed).
UNLINKED keys and keys with a write in flight are counted, not checked.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from collections.abc import Iterable
from typing import NamedTuple

import lmdb

from minikv.admin.check import KINDS, composite_missing, inspect, judge
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
from minikv.admin.parts import processes, run_parts, shares
from minikv.admin.progress import Progress
from minikv.admin.seen import Copies, Merge, Notes
from minikv.admin.walk import Found, Walker
from minikv.config import Config
from minikv.http.client import Pool
from minikv.index.engine import is_url
from minikv.index.pg import describe
from minikv.index.record import (
    EPOCH_AT,
    LIVE,
    PENDING,
    UNLINKED,
    VOLUMES_AT,
    decode_data,
    is_composite,
)
from minikv.index.store import MAX_KEY, Store
from minikv.placement import epoch, key2volume, needs_rebalance

FINDINGS = ("under-replicated", "lost", "misplaced", *KINDS, "orphans", "failed")


_SIZE = struct.Struct("<Q")  # a LIVE record's size, first of its fields
ORPHAN_BATCH = 1024  # keys with no record handed to the orphan search at once (memory, and Ctrl-C between)


class Verify:
    def __init__(self, config: Config, store: Store, pool: Pool, progress: Progress, with_md5: bool):
        self.config = config
        self.store = store
        self.pool = pool
        self.progress = progress
        self.with_md5 = with_md5
        self.copies = Copies(config.volumes)
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

    def quick(self, pairs: list[tuple[bytes, bytes]], merge: Merge) -> tuple[list[tuple[bytes, bytes]],
                                                                             dict[bytes, list[Found]], int]:
        """Pass 2 for a page of records, beside the walk's notes (`merge`), without an await.
        Every LIVE record whose copies the walk listed, each with its size (on a healthy cluster,
        all), is judged here. Returned: the records to ask the volumes about (`key`), the listed
        copies that may be orphans (no LIVE record, or one that does not name them), and how
        many of `pairs` were looked at: it stops early when ORPHAN_BATCH keys with no record
        came up, for the caller to hand them on and call again with the rest."""
        p = self.progress
        rest = []
        orphans: dict[bytes, list[Found]] = {}
        before: list[tuple[bytes, bytes]] = []
        counts = p.counts
        here, replicas = self.epoch.to_bytes(4, "little"), self.config.replicas
        copies = self.copies
        settled = 0
        done = 0
        for key, raw in pairs:
            if not merge.before(key, before, ORPHAN_BATCH):
                break
            done += 1
            noted = merge.take(key)
            if not raw or raw[0] != LIVE or is_composite(raw):
                rest.append((key, raw))
                if noted is not None:  # admin/orphans.py tells which of them the record names
                    orphans[key] = copies.decode(noted)
                continue
            try:
                names, ids = copies.named(raw[VOLUMES_AT:])
                size = _SIZE.unpack_from(raw, 1)[0]
            except (ValueError, struct.error):  # a damaged record (not UTF-8, a name past 255 bytes): `key` reports it
                rest.append((key, raw))
                continue
            if noted is None:
                rest.append((key, raw))
                continue
            if ids is None or noted != copies.sized(ids, size):  # not the usual case: look closer
                found = copies.decode(noted)
                if any(f.volume not in names for f in found):
                    orphans[key] = found
                sizes = {f.volume: f.size for f in found}
                if self.with_md5 or not all(sizes.get(v) == size for v in names):
                    rest.append((key, raw))
                    continue
            elif self.with_md5:
                rest.append((key, raw))
                continue
            counts["seen"] += 1
            settled += 1
            if raw[EPOCH_AT:VOLUMES_AT] == here and len(names) >= replicas:
                counts["ok"] += 1  # the usual case, without decoding: placed by this layout, all copies
                continue
            record = decode_data(raw)
            if len(record.volumes) < replicas:
                counts["under-replicated"] += 1
            want = self.misplaced(key, record)
            self.note_misplaced(key, record, want)
            if want is None:
                counts["ok"] += 1
        for key, noted in before:  # files of keys with no record at all
            orphans[key] = copies.decode(noted)
        p.tick(settled)
        return rest, orphans, done

    def composite(self, key: bytes, raw: bytes) -> None:
        """An S3 multipart object names no file of its own: its parts and manifest are keys
        verified as any other; here only that each still has a record."""
        if (what := composite_missing(self.store, key, raw)) is not None:
            self.progress.add("lost")
            self.progress.problem(f"{show(key)}: {what}")
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


class WalkPart(NamedTuple):
    """Pass 1 for the folders `<aa>` of `aas`, in a process of its own (admin/parts.py)."""

    config: Config
    dirs: dict[str, str]  # local mode: {volume: folder}
    hosts: list[str]  # else the volumes whose listings are read (those up)
    notes: str  # the scratch LMDB's folder (admin/seen.py)
    concurrency: int
    aas: Iterable[int]  # parts.shares


async def walk_share(part: WalkPart, progress: Progress, stop: asyncio.Event, pool: Pool, store: Store,
                     notes: Notes) -> list[str]:
    """Walk the part's folders, noting every key's copies; the errors of the walk (then what
    its folders hold was not seen: their keys are asked for in pass 2, their orphans not)."""
    copies = Copies(part.config.volumes)
    walker = LocalWalker(part.dirs) if part.dirs else Walker(pool, part.hosts, part.concurrency)
    orphans = Orphans(store, pool, progress, delete=False)

    async def handle(group: dict[bytes, list[Found]]) -> None:
        long = {}
        for key, found in group.items():
            if len(key) > MAX_KEY:  # a key of the Go original that no index of ours holds (nor the notes)
                long[key] = found
            else:
                notes.add(key, copies.encode(found))
        if long:
            await orphans.handle(long)

    await walker.walk(await walker.roots(), handle, progress.tick, stop, part.aas)
    notes.flush()
    return walker.errors


async def walk_part(part: WalkPart, progress: Progress, stop: asyncio.Event, pool: Pool) -> list[str]:
    """walk_share in a process of its own, with its own handles on the index and the notes."""
    store = open_index(part.config, "verify")
    if store is None:
        return [f"cannot open the index {describe(part.config.db)}"]
    notes = Notes.attach(part.notes)
    try:
        return await walk_share(part, progress, stop, pool, store, notes)
    finally:
        notes.close()
        store.close()


async def each_record_quick(store: Store, job: Verify, notes: Notes, concurrency: int, stop: asyncio.Event) -> None:
    """Pass 2 over every record, a page at a time, beside the walk's notes: what `job.quick`
    settles costs no task; the rest is asked of the volumes by `job.key`, `concurrency` at once
    (an error on one key is counted and reported; the others go on), and the copies no record
    names go to the orphan search."""
    p = job.progress
    orphans = Orphans(store, job.pool, p, delete=False)
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

    merge = notes.merge()
    try:
        start = b""
        while not stop.is_set():
            pairs, start = store.scan(b"", start, PAGE)
            while not stop.is_set():
                rest, suspects, done = job.quick(pairs, merge)
                if suspects:
                    await orphans.handle(suspects)
                for key, raw in rest:
                    await slots.acquire()
                    if stop.is_set():
                        slots.release()
                        break
                    task = asyncio.get_running_loop().create_task(one(key, raw))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if done == len(pairs):
                    break
                pairs = pairs[done:]  # stopped at ORPHAN_BATCH keys with no record: the page goes on
            if not start:
                break
        while not stop.is_set() and (tail := merge.rest(ORPHAN_BATCH)):  # keys after the last record's
            await orphans.handle({key: job.copies.decode(noted) for key, noted in tail})
        await asyncio.gather(*running)
    finally:
        merge.close()


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
            notes = Notes(config.db)
        except (OSError, lmdb.Error) as e:
            where = "in the system's temp folder" if is_url(config.db) else "beside -db"
            print(f"minikv verify: cannot make its scratch folder {where} ({e}): make that folder writable",
                  file=sys.stderr)
            return 2
        try:
            walk = Progress("verify", total=256, bar_unit="dirs")
            stop = asyncio.Event()
            stop_on_signal(stop, walk)
            procs = processes(args, config, store.count())
            # a volume that is down has no listing: its copies are asked for (unreachable) in pass 2
            parts = [WalkPart(config, dirs, [v for v in config.volumes if v not in down], notes.path,
                              args.concurrency, aas) for aas in shares(procs)]
            if procs == 1:
                errors = await walk_share(parts[0], walk, stop, pool, store, notes)
            else:
                errors = await run_parts(walk_part, "verify", parts, walk, stop, shown="orphans")
            job = Verify(config, store, pool, walk, args.md5)
            walk.close()
            progress = job.progress = Progress("verify", total=store.count())
            progress.start = walk.start  # the summary's time and rate are the whole command's
            progress.counts.update(walk.counts)
            progress.lines += walk.lines
            for err in errors:
                progress.add("failed")
                progress.problem(f"orphan search incomplete: {err}")
            for host, reason in down.items():  # not listed: with no key on it, nothing else would tell
                if host not in dirs:
                    progress.add("failed")
                    progress.problem(f"orphan search incomplete: {reason}")
            if not stop.is_set():
                stop_on_signal(stop, progress)
                await each_record_quick(store, job, notes, args.concurrency, stop)
        finally:
            notes.close()
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
