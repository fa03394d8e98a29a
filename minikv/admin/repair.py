"""`minikv repair -volumes ... -db ... [-md5] [-delete-orphans]`: fix what verify finds.

For each LIVE key whose copies are not all right (missing, wrong size, with -md5 wrong content)
or not where placement says: judge its copies (admin/check.py), then move it onto its placement
volumes from a right copy with admin/move.py (the same locked copy → switch → retire as
rebalance), which overwrites the bad copies placement keeps and deletes those it does not. A key
with no right copy left is reported as lost and left alone (restore it from a backup, or DELETE
it), as is a key whose copies disagree without an md5 to tell which is right.

With -delete-orphans it then walks the volumes and deletes the files no record names, each
under its key's lock (admin/orphans.py); without, it counts them. `-dry-run` reports what it
would do. It starts by resolving the locks of processes that died, and running it again is safe.
"""

from __future__ import annotations

import asyncio
import sys

from minikv.admin import move
from minikv.admin.check import composite_missing, inspect, judge
from minikv.admin.common import (
    aliases,
    all_up,
    command_main,
    counted_move,
    each_record,
    foreign_names,
    indexed_hosts,
    open_index,
    resolve_stale,
    show,
    stop_on_signal,
)
from minikv.admin.orphans import Orphans
from minikv.admin.progress import Progress
from minikv.admin.rebalance import BUSY_TRIES
from minikv.admin.walk import Walker
from minikv.config import Config
from minikv.http.client import Pool
from minikv.index.record import PENDING, UNLINKED, decode_data, is_composite
from minikv.index.store import Store
from minikv.placement import epoch, key2volume, needs_rebalance


class Repair:
    def __init__(self, config: Config, args, store: Store, pool: Pool, progress: Progress):
        self.config = config
        self.args = args
        self.store = store
        self.pool = pool
        self.progress = progress
        self.epoch = epoch(config.volumes, config.replicas, config.subvolumes)

    async def key(self, key: bytes, raw: bytes | None) -> None:
        p = self.progress
        p.add("seen")
        c = self.config
        want = key2volume(key, c.volumes, c.replicas, c.subvolumes)
        for attempt in range(BUSY_TRIES):
            if raw is not None and raw[0] != UNLINKED and is_composite(raw):  # its parts are keys of their own
                if (what := composite_missing(self.store, key, raw)) is not None:
                    p.add("lost")
                    p.problem(f"{show(key)}: lost, {what}: upload it again or DELETE it")
                return
            if raw is None or raw[0] == UNLINKED:
                return
            if raw[0] == PENDING:
                await asyncio.sleep(0.1 * 2 ** attempt)
                raw = self.store.get(key)
                continue
            record = decode_data(raw)
            verdict = judge(record, await inspect(self.pool, key, record.volumes, self.args.md5))
            if not verdict.problems and not needs_rebalance(want, record.volumes):
                return
            if self.store.get(key) != raw:
                raw = self.store.get(key)  # changed while we looked: look again
                continue
            what = "; ".join(f"{v}: {kind}" for v, kind, _ in verdict.problems) or "misplaced"
            if not verdict.good:
                p.add("lost")
                p.problem(f"{show(key)}: lost, no right copy left ({what}): restore it from a backup or "
                          "DELETE it")
                return
            if verdict.conflict:
                p.add("failed")
                p.problem(f"{show(key)}: copies differ in content and the record has no md5 to tell "
                          "which is right: not touched")
                return
            if self.args.dry_run:
                p.add("repaired")
                p.problem(f"{show(key)}: would repair ({what})")
                return
            settled, raw = await counted_move(p, self.pool, self.store, key, raw, want, self.epoch,
                                              "repaired", f"not repaired ({what})", good=verdict.good)
            if settled:
                return  # else it changed since we read it: look again
        p.add("failed")
        p.problem(f"{show(key)}: another write kept it busy; not repaired (run repair again)")


async def repair(args, config: Config) -> int:
    store = open_index(config, "repair")
    if store is None:
        return 2
    pool = config.pool()
    try:
        if not await all_up(pool, config, "repair",
                            "copies are made on the volumes of -volumes, so all must be up: start "
                            "them, or leave the dead ones out of -volumes"):
            return 1
        # repair moves keys too (those off their placement): a volume named two ways would have
        # its copies "moved" onto themselves and deleted, with or without -delete-orphans
        why = foreign_names(store, config) if args.delete_orphans else aliases(indexed_hosts(store), config.volumes)
        if why:
            print(f"minikv repair: {why}", file=sys.stderr)
            return 2
        if not args.dry_run and (n := await resolve_stale(store, pool)):
            print(f"repair: resolved {n} key(s) left locked by a process that died", file=sys.stderr)
        progress = Progress("repair", total=store.count())
        stop = asyncio.Event()
        stop_on_signal(stop, progress)
        job = Repair(config, args, store, pool, progress)
        await each_record(store, job.key, args.concurrency, progress, stop)
        if not stop.is_set():
            progress.close()
            walk = Progress("repair orphans", total=256, bar_unit="dirs")
            walker = Walker(pool, config.volumes, args.concurrency)
            orphans = Orphans(store, pool, walk, delete=args.delete_orphans and not args.dry_run)
            await walker.walk(await walker.roots(), orphans.handle, walk.tick, stop)
            walk.close()
            progress.counts.update(walk.counts)
            for err in walker.errors:
                progress.add("failed")
                progress.problem(f"orphan search incomplete: {err}")
        leftovers = await move.drain()
        for reason in leftovers:
            progress.problem(f"an old copy could not be deleted ({reason})")
        progress.add("leftovers", len(leftovers))
        repaired = "to repair (dry run)" if args.dry_run else "repaired"
        progress.summary([("seen", "keys seen"), (("repaired"), repaired), ("failed", "failed"),
                          ("lost", "lost"), ("orphans", "orphan files"), ("orphans deleted", "orphans deleted"),
                          ("leftovers", "old copies not deleted"), ("busy", "busy")], always=4)
        c = progress.counts
        if c["orphans"] > c["orphans deleted"] and not args.delete_orphans:
            print("repair: orphan files were left in place; add -delete-orphans to delete them",
                  file=sys.stderr)
        if stop.is_set():
            return 130
        return 1 if c["failed"] or c["lost"] else 0
    finally:
        pool.close()
        store.close()


main = command_main("repair", repair)
