"""`minikv rebalance`: move every key onto the volumes its placement names now.

Run it after volumes were added to or removed from -volumes (and the index restarted with the
new list). Two ways, both safe while the index server keeps serving:

- offline, `-volumes ... -db ...`: this process walks the index itself and moves each key that
  is not where placement says with admin/move.py: lock the record (PENDING, owner: the pid of
  the process moving it),
  copy to the new volumes (streamed volume to volume, never whole in memory), switch the record,
  then, a moment later and still locked, delete the copies on volumes no longer named. A key
  some other write holds is retried, then reported. Keys being moved stay readable throughout;
  their DELETE/UNLINK/PUT get 409 for that moment, as with any write in flight. Past
  parts.SMALL records of an LMDB index the keys are shared out among -workers processes (default 2,
  admin/parts.py) by their crc32, each with -concurrency moves in flight: one process tops out
  at one core (its HTTP requests and transactions) while the volumes' nginx left the other
  half idle. A value small enough to be copied whole on shared connections (replicas.SMALL)
  counts as a quarter of a move: its requests and index writes ride in the batches of the
  others, and four times as many in flight made a move cost both us and nginx less (on tmpfs;
  BENCHMARKS.md). A process killed with the command (or alone) leaves its locked keys to the
  next run.
- online, `-server host:port`: pages through the running index's `GET /?list` and asks it to
  move each unbalanced key (`REBALANCE /key`), `-concurrency` at once. The server's own -volumes
  decide placement; -db and -volumes are not needed. (Keys that are not valid UTF-8 cannot be
  listed through the API: use the offline way for those.)

It starts by resolving the PENDING records of processes that died (a killed earlier rebalance),
so running it again after an interruption completes the work. UNLINKED keys are moved too
(offline; the online way sees only readable keys), and stay UNLINKED: a volume the layout no
longer names must not keep the only copies of a key that DELETE and `gc` would then never reach.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import NamedTuple
from urllib.parse import quote
from zlib import crc32

from minikv import replicas
from minikv.admin import move
from minikv.admin.batch import Batched
from minikv.admin.common import (
    aliases,
    all_up,
    command_main,
    counted_move,
    each_record,
    indexed_hosts,
    layout_change,
    open_index,
    resolve_stale,
    run,
    show,
    stop_on_signal,
)
from minikv.admin.parts import processes, run_parts
from minikv.admin.progress import Progress
from minikv.admin.records import Placer
from minikv.api.access import client_headers
from minikv.config import Config
from minikv.http.client import Pool, VolumeError
from minikv.index.engine import is_url
from minikv.index.record import PENDING, UNLINKED, VOLUMES_AT, decode_data, is_composite
from minikv.index.store import Store
from minikv.placement import needs_rebalance
from minikv.replicas import SMALL

SMALL_PER_MOVE = 4  # small values moved at once for each of -concurrency (streamed ones: one each)
BUSY_TRIES = 6  # a key another write holds is looked at again after 0.1, 0.2, ... 3.2 s
LIST_PAGE = 1000
REBALANCE_TIMEOUT = 3600.0  # the server copies the whole value before it answers


# ---------------------------------------------------------------- offline


class Offline:
    """The moves of one process: of every key, or (`share` = (i, n)) of the keys whose crc32
    is i modulo n, for one of n processes."""

    def __init__(self, config: Config, dry_run: bool, store: Store, pool: Pool, progress: Progress,
                 concurrency: int, share: tuple[int, int] = (0, 1)):
        self.config = config
        self.concurrency = concurrency * SMALL_PER_MOVE  # keys in flight (each_record's)
        # streamed copies hold a connection and buffers each: -concurrency of them at most
        self.streams = asyncio.Semaphore(concurrency)
        self.dry_run = dry_run
        self.store = Batched(store)  # the keys in flight lock, switch and unlock in shared transactions
        self.pool = pool
        self.progress = progress
        self.placer = Placer(config)  # placement, with what does not depend on the key worked out once
        self.epoch = self.placer.epoch
        self.share = share

    def quick(self, pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """One page of records, without an await: the keys already where placement wants them
        are counted here (no task, no queue: after adding one volume to many, most keys); the
        others are returned, for `key` to move."""
        i, n = self.share
        if n > 1:
            pairs = [pair for pair in pairs if crc32(pair[0]) % n == i]
        p = self.progress
        counts = p.counts
        counts["seen"] += len(pairs)
        want = self.placer.want
        rest = []
        for key, raw in pairs:
            if raw[0] != PENDING:
                # a LIVE or UNLINKED record ends with its volumes, joined by ",": compared as they are
                if raw[VOLUMES_AT:] != ",".join(want(key)).encode():
                    rest.append((key, raw))
            else:
                rest.append((key, raw))
        p.tick(len(pairs) - len(rest))
        return rest

    async def key(self, key: bytes, raw: bytes | None) -> None:
        """Move one key where placement wants it (its record was `raw` a moment ago)."""
        p = self.progress
        want = self.placer.want(key)
        for attempt in range(BUSY_TRIES):
            if raw is None:
                p.add("gone")  # deleted meanwhile
                return
            if raw[0] == PENDING:
                await asyncio.sleep(0.1 * 2 ** attempt)
                raw = self.store.get(key)
                continue
            record = None if is_composite(raw) else decode_data(raw)
            if record is None or not needs_rebalance(want, record.volumes):  # parts move as keys
                return
            if self.dry_run:
                p.add("moved")
                return
            if record.state == UNLINKED and not await self._has_copy(key, record.volumes):
                p.add("unlinked gone")  # nothing to move, and not a failure: gc drops the record
                return
            if 0 < record.size <= SMALL:  # copied whole (replicas.copy_small); an empty one is streamed
                settled, raw = await counted_move(p, self.pool, self.store, key, raw, want, self.epoch,
                                                  "moved", "not moved, it stays where it was")
            else:
                async with self.streams:
                    settled, raw = await counted_move(p, self.pool, self.store, key, raw, want, self.epoch,
                                                      "moved", "not moved, it stays where it was")
            if settled:
                return  # else it changed since we read it: look again
        p.add("failed")
        p.problem(f"{show(key)}: another write kept it busy; not moved (run rebalance again)")


    async def _has_copy(self, key: bytes, volumes: list[str]) -> bool:
        """Does any volume hold a copy of an UNLINKED key (or cannot tell)? Its files may all be
        gone (a DELETE whose answer was lost, a wiped volume): moving it would fail every run."""
        for volume in volumes:
            try:
                if await replicas.exists(self.pool, volume, key) is not None:
                    return True
            except VolumeError:
                return True  # cannot tell: the move says what went wrong
        return False


async def offline(args, config: Config) -> int:
    store = open_index(config, "rebalance")
    if store is None:
        return 2
    pool = config.pool()
    try:
        if not await all_up(pool, config, "rebalance",
                            "keys are moved onto every volume of -volumes, so all must be up: "
                            "start them, or leave the dead ones out of -volumes (their copies are then read "
                            "from the other replicas)"):
            return 1
        if why := aliases(indexed_hosts(store), config.volumes):
            print(f"minikv rebalance: {why}", file=sys.stderr)
            return 2
        if said := layout_change(store, config):
            print(f"minikv rebalance: {said}", file=sys.stderr)
        if not args.dry_run and (n := await resolve_stale(store, pool)):
            print(f"rebalance: resolved {n} key(s) left locked by a process that died", file=sys.stderr)
        total = store.count()
        progress = Progress("rebalance", total=total)
        stop = asyncio.Event()
        stop_on_signal(stop, progress)
        # LMDB only: each process of a PostgreSQL index would hold a bridge and a lease of its own
        procs = 1 if is_url(config.db) else processes(args, config, total, most=64)
        parts = [Part(config, args.dry_run, args.concurrency, (i, procs)) for i in range(procs)]
        if procs == 1:
            await moves(Offline(config, args.dry_run, store, pool, progress, args.concurrency), progress, stop)
        else:
            for error in await run_parts(run_part, "rebalance", parts, progress, stop, shown=None):
                progress.add("failed")
                progress.problem(f"{error}: the keys of its share that it had not moved stay where they "
                                 "were (run rebalance again)")
        moved = "to move (dry run)" if args.dry_run else "moved"
        progress.summary([("seen", "keys seen"), ("moved", moved), ("failed", "failed"),
                          ("unlinked gone", "unlinked keys with no copy left (gc drops them)"),
                          ("leftovers", "old copies not deleted")])
        if stop.is_set():
            return 130
        return 1 if progress.counts["failed"] else 0
    finally:
        pool.close()
        store.close()


class Part(NamedTuple):
    """What one process of a rebalance moves (admin/parts.py): the keys of its `share`."""
    config: Config
    dry_run: bool
    concurrency: int
    share: tuple[int, int]


async def moves(job: Offline, progress: Progress, stop: asyncio.Event) -> None:
    """Every move of `job`, then the old copies' deletions still waiting their second."""
    await each_record(job.store, job.key, job.concurrency, progress, stop, job.quick)
    leftovers = await move.drain()
    for reason in leftovers:
        progress.problem(f"an old copy could not be deleted ({reason}); `minikv repair "
                         "-delete-orphans` removes it later")
    progress.add("leftovers", len(leftovers))


async def run_part(part: Part, progress: Progress, stop: asyncio.Event, pool: Pool) -> list[str]:
    """One process's share of the moves (admin/parts.py runs it): one event loop moves at most
    a core's worth (the HTTP requests, the index's transactions), and the volumes' nginx had
    the other core half idle."""
    store = Store(part.config.db, sync=part.config.fsync)
    try:
        await moves(Offline(part.config, part.dry_run, store, pool, progress, part.concurrency, part.share),
                    progress, stop)
    finally:
        store.close()
    return []


# ---------------------------------------------------------------- online


def key_path(key: str) -> str:
    return quote(key.encode(), safe="/:@!$&'()*+,;=")


def start_param(key: str) -> str:
    # the index decodes the query once, as a form: `start` is then the key's own bytes
    return quote(key.encode(), safe="")


class Online:
    def __init__(self, server: str, args, pool: Pool, progress: Progress):
        self.server = server
        self.dry_run = args.dry_run
        self.pool = pool
        self.progress = progress
        self.headers = client_headers(args)  # the index may need credentials (api/access.py)

    async def pages(self, limit: int = LIST_PAGE):
        """Every key the index lists, page by page."""
        start = ""
        while True:
            path = f"/?list&limit={limit}" + (f"&start={start_param(start)}" if start else "")
            resp = await self.pool.request(self.server, "GET", path, headers=self.headers, timeout=60.0)
            if resp.status == 401:
                raise VolumeError(self.server, "asks for credentials: set MINIKV_S3_ACCESS_KEY and "
                                               "MINIKV_S3_SECRET_KEY (the index's S3 credentials)")
            if resp.status != 200:
                raise VolumeError(self.server, f"answered {resp.status} to GET {path}: {resp.body[:200]!r}")
            page = json.loads(resp.body)
            yield page["keys"]
            start = page.get("next", "")
            if not start:
                return

    async def count(self) -> int:
        return sum([len(keys) async for keys in self.pages(10_000)])

    async def key(self, key: str) -> None:
        p = self.progress
        p.add("seen")
        path = key_path(key)
        for attempt in range(BUSY_TRIES):
            resp = await self.pool.request(self.server, "HEAD", path, headers=self.headers)
            balance = resp.headers.get(b"key-balance")
            if resp.status == 200:  # an S3 multipart object: where its parts lie is the server's to see
                balance = b"unbalanced"
            elif resp.status != 302 or balance is None:
                p.add("gone")  # deleted or unlinked meanwhile (or answered by -fallback)
                return
            if balance == b"balanced":
                return
            if self.dry_run:
                p.add("moved")
                return
            resp = await self.pool.request(self.server, "REBALANCE", path, headers=self.headers,
                                           timeout=REBALANCE_TIMEOUT)
            if resp.status == 204:
                p.add("moved")
                p.show(moved=p.counts["moved"], failed=p.counts["failed"])
                return
            if resp.status == 404:
                p.add("gone")
                return
            if resp.status != 409:
                p.add("failed")
                p.problem(f"{key}: the index answered {resp.status}: {resp.body.decode('utf-8', 'replace')[:300]}")
                return
            await asyncio.sleep(0.1 * 2 ** attempt)  # another write holds the key
        p.add("failed")
        p.problem(f"{key}: another write kept it busy; not moved (run rebalance again)")


async def online(args) -> int:
    server = args.server.removeprefix("http://").rstrip("/")
    pool = Pool(max(args.voltimeout, 5.0))
    try:
        job = Online(server, args, pool, Progress("rebalance"))
        try:
            total = await job.count()
        except (VolumeError, ValueError, KeyError) as e:
            print(f"minikv rebalance: cannot list the keys of the index at {server}: {e}. Is "
                  "`minikv server` running there?", file=sys.stderr)
            return 1
        progress = job.progress = Progress("rebalance", total=total)
        stop = asyncio.Event()
        stop_on_signal(stop, progress)
        queue: asyncio.Queue = asyncio.Queue(args.concurrency * 4)

        async def produce() -> None:
            try:
                async for keys in job.pages():
                    for key in keys:
                        if stop.is_set():
                            return
                        await queue.put(key)
            except (VolumeError, ValueError, KeyError) as e:
                progress.add("failed")
                progress.problem(f"listing the keys stopped: {e}")
            finally:
                for _ in range(args.concurrency):
                    await queue.put(None)

        async def consume() -> None:
            while (key := await queue.get()) is not None:
                try:
                    await job.key(key)
                except VolumeError as e:
                    progress.add("failed")
                    progress.problem(f"{key}: {e}")
                progress.tick()

        await asyncio.gather(produce(), *(consume() for _ in range(args.concurrency)))
        moved = "to move (dry run)" if args.dry_run else "moved"
        progress.summary([("seen", "keys seen"), ("moved", moved), ("failed", "failed"),
                          ("gone", "gone meanwhile")])
        if stop.is_set():
            return 130
        return 1 if progress.counts["failed"] else 0
    finally:
        pool.close()


_offline_main = command_main("rebalance", offline)


def main(args) -> int:
    if args.server:
        return run(lambda: online(args))
    return _offline_main(args)
