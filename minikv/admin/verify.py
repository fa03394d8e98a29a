"""`minikv verify -volumes ... -db ...`: is every key's every copy where the index says, and right?

Changes nothing. Two passes:
1. every LIVE record: each replica it names is asked for (HEAD, or with -md5 read whole and
   hashed, streamed) and judged by admin/check.py: missing, wrong size, wrong md5, unreachable.
   Per key: under-replicated (fewer right copies than -replicas), lost (none), misplaced (not
   on the volumes placement names; `minikv rebalance` or `repair` moves it).
2. every file on the volumes of -volumes: orphans, copies no record names (admin/orphans.py).
Each problem is one line on stderr; the summary counts them. Exit code 0 when all is well, 1
when anything was found (then `minikv repair` fixes what can be fixed).
UNLINKED keys and keys with a write in flight are counted, not checked.
"""

from __future__ import annotations

import asyncio
import sys

from minikv.admin.check import KINDS, inspect, judge
from minikv.admin.common import (
    command_main,
    each_record,
    foreign_names,
    open_index,
    probe,
    show,
    stop_on_signal,
)
from minikv.admin.orphans import Orphans
from minikv.admin.progress import Progress
from minikv.admin.walk import Walker
from minikv.config import Config
from minikv.http.client import Pool
from minikv.index.record import PENDING, UNLINKED, decode_data
from minikv.index.store import Store
from minikv.placement import key2volume, needs_rebalance

FINDINGS = ("under-replicated", "lost", "misplaced", *KINDS, "orphans", "failed")


class Verify:
    def __init__(self, config: Config, store: Store, pool: Pool, progress: Progress, with_md5: bool):
        self.config = config
        self.store = store
        self.pool = pool
        self.progress = progress
        self.with_md5 = with_md5

    async def key(self, key: bytes, raw: bytes) -> None:
        p = self.progress
        p.add("seen")
        if raw[0] == PENDING:
            p.add("busy")
            return
        if raw[0] == UNLINKED:
            p.add("unlinked")
            return
        record = decode_data(raw)
        verdict = judge(record, await inspect(self.pool, key, record.volumes, self.with_md5))
        c = self.config
        misplaced = needs_rebalance(key2volume(key, c.volumes, c.replicas, c.subvolumes), record.volumes)
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
        if misplaced:
            p.add("misplaced")
            p.problem(f"{show(key)}: misplaced: on {','.join(record.volumes)}, placement says "
                      f"{','.join(key2volume(key, c.volumes, c.replicas, c.subvolumes))}")
        if not (verdict.problems or verdict.conflict or misplaced):
            p.add("ok")
        p.show(ok=p.counts["ok"], problems=p.lines)


async def verify(args, config: Config) -> int:
    store = open_index(config, "verify")
    if store is None:
        return 2
    pool = config.pool()
    try:
        for reason in (await probe(pool, config.volumes)).values():
            print(f"verify: {reason}; its copies count as unreachable", file=sys.stderr)
        if why := foreign_names(store, config):
            print(f"minikv verify: {why}", file=sys.stderr)
            return 2
        progress = Progress("verify", total=store.count())
        stop = asyncio.Event()
        stop_on_signal(stop, progress)
        job = Verify(config, store, pool, progress, args.md5)
        await each_record(store, job.key, args.concurrency, progress, stop)
        if not stop.is_set():
            progress.close()
            walk = Progress("verify orphans", total=256, bar_unit="dirs")
            walker = Walker(pool, config.volumes, args.concurrency)
            orphans = Orphans(store, pool, walk, delete=False)
            await walker.walk(await walker.roots(), orphans.handle, walk.tick, stop)
            walk.close()
            progress.counts.update(walk.counts)
            progress.lines += walk.lines
            for err in walker.errors:
                progress.add("failed")
                progress.problem(f"orphan search incomplete: {err}")
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
