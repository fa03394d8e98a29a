"""Moving one key's replicas onto the volumes placement names now (REBALANCE, rebalance, repair).

The record is the lock, and every step is one compare-and-set on it, so that at every moment a
complete set of replicas is named by the record (or by the LIVE record a PENDING one keeps) and a
crash anywhere is undone by index/recovery.py with its one rule for PENDING(rebalance): "delete
the copies on `volumes` that `previous` does not name, put `previous` back".

    LIVE(old) ─caller─▶ PENDING(rebalance, new, prev=LIVE(old))   copy to new volumes
              ─────────▶ LIVE(new)                                switch, and in the same
              ─────────▶ PENDING(rebalance, stale, prev=LIVE(new)) transaction lock again;
                                                                  wait GRACE, delete stale copies
              ─────────▶ LIVE(new)

Why the second lock and the wait: a reader may have been redirected to an old copy just before
the switch and fetch it a moment later; deleting it at once would fail that read. During the
wait the key is readable from LIVE(new) (the API reads a PENDING(rebalance) record's previous
one) and the lock names the stale copies, so a crash during the wait still gets them deleted.
An UNLINKED key (offline rebalance) goes the same way, and is UNLINKED where this says LIVE.
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Callable

from minikv import replicas
from minikv.http.client import Pool, VolumeError
from minikv.index.engine import settle
from minikv.index.record import (
    NO_MD5,
    OP_REBALANCE,
    PENDING,
    decode_data,
    decode_pending,
    encode_data,
    encode_pending,
    now_ms,
)
from minikv.index.store import Store
from minikv.placement import host_of

GRACE = 1.0  # seconds between the switch and deleting the old copies

# The tasks retiring old copies in the background (detach=True); kept here so they are not collected.
_tails: set[asyncio.Task] = set()


class LostLock(Exception):
    """The key's record changed while we held it (someone ran recovery on it): nothing moved."""



def named(raw: bytes | None) -> set[str]:
    """Every volume a record names, in any state (a PENDING one: its volumes and previous ones)."""
    if raw is None:
        return set()
    if raw[0] == PENDING:
        p = decode_pending(raw)
        return set(p.volumes) | (named(p.previous) if p.previous else set())
    return set(decode_data(raw).volumes)


async def move_key(pool: Pool, store: Store, key: bytes, raw: bytes, volumes: list[str], pending: bytes,
                   is_up: Callable[[str], bool] = lambda host: True, epoch: int = 0, *,
                   good: list[str] | None = None, grace: float = GRACE, detach: bool = False) -> list[str]:
    """Move the key whose LIVE record was `raw` (now locked as `pending`) onto `volumes`, which
    are its placement under layout `epoch` (placement.epoch; 0: unknown).

    `good` are the replicas known to hold a right copy (default: all `raw` names); every volume
    of `volumes` not among them gets a copy from one of them. On failure the new copies are
    deleted, the record is `raw` again, and VolumeError (or LostLock) is raised. After the
    switch the old copies are retired: awaited, or in the background with `detach` (then the
    caller returns at once; `drain()` waits for them). Returns the deletions that failed."""
    old = decode_data(raw)
    have = old.volumes if good is None else good
    sources = [v for v in have if is_up(host_of(v))] or list(have)
    copied: list[str] = []
    try:
        for dst in volumes:
            if dst in have:
                continue
            if not sources:
                raise VolumeError(host_of(dst), "cannot get a copy: no replica of the key is good")
            for i, src in enumerate(sources):
                try:
                    await replicas.copy(pool, key, src, dst, old.size, old.md5 if old.md5 != NO_MD5 else None)
                    break
                except VolumeError as e:
                    if e.host == host_of(dst) or i == len(sources) - 1:
                        raise
            copied.append(dst)
    except BaseException:
        # a copy over a bad replica the record names stays: it is no worse than what was there
        await replicas.delete_all(pool, [v for v in copied if v not in old.volumes], key)
        await settle(store.cas(key, pending, raw))
        raise
    live = encode_data(old.state, volumes, old.size, old.mtime_ms, old.md5, epoch)  # an UNLINKED key stays so
    stale = [v for v in old.volumes if v not in volumes]
    relock = encode_pending(OP_REBALANCE, os.getpid(), now_ms(), stale, live) if stale else None
    # switch, and lock again in the same transaction, so the stale copies are always named
    ops = [(key, pending, live)] + ([(key, live, relock)] if relock is not None else [])
    (done, current), *rest = await cas_seq(store, ops)
    if not done:
        # recovery (an index starting up) undid our move meanwhile: remove the copies it missed
        keep = named(current) | set(old.volumes)
        await replicas.delete_all(pool, [v for v in copied if v not in keep], key)
        raise LostLock("the key's record was changed by another process during the move; run again")
    if relock is None:
        return []
    locked = rest[0][0]
    if not detach:
        return await retire(pool, store, key, live, relock if locked else None, stale, grace)
    retire_later(pool, store, key, live, relock if locked else None, stale, grace)
    return []


async def retire(pool: Pool, store: Store, key: bytes, live: bytes, relock: bytes | None, stale: list[str],
                 grace: float = GRACE) -> list[str]:
    """Delete the copies on `stale` of a key now LIVE as `live`, GRACE seconds from now, then
    put `live` back in place of its lock `relock` (see the module docstring). Returns the
    deletions that failed (orphans for gc)."""
    await asyncio.sleep(grace)
    if relock is None:
        # a DELETE or UNLINK got the key between the switch and the lock; its record does not
        # name the stale copies unless placement changed again, so they go unless it does
        stale = [v for v in stale if v not in named(await settle(store.get(key)))]
    failed = await replicas.delete_all(pool, stale, key)
    if relock is not None:
        await settle(store.cas(key, relock, live))
    return failed


RETIRE_BATCH = 64  # keys whose old copies are deleted together (their DELETEs in one pass)


class Retirements:
    """The background retirements of one pool and store, done in batches: one task waits for
    the GRACE of every key in turn, and the keys whose GRACE is over are retired RETIRE_BATCH
    at a time, their DELETEs sent at once (pipelined, several to a write) and their unlocks
    written in one transaction, instead of a task, a timer, a pass of DELETEs and a transaction
    for each key. Each key still waits its full GRACE, and is deleted, then unlocked, in that
    order, as retire() does."""

    def __init__(self, pool: Pool, store: Store, grace: float):
        self.pool = pool
        self.store = store
        self.grace = grace
        self.due: collections.deque[tuple[float, bytes, bytes, bytes | None, list[str]]] = collections.deque()
        self.task: asyncio.Task | None = None

    def add(self, key: bytes, live: bytes, relock: bytes | None, stale: list[str]) -> None:
        loop = asyncio.get_running_loop()
        self.due.append((loop.time() + self.grace, key, live, relock, stale))
        if self.task is None:
            self.task = loop.create_task(self.run())
            _tails.add(self.task)
            self.task.add_done_callback(_tails.discard)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.due:
                # one batch a turn of the loop, not awaited: batches in flight together go on
                # several connections, which a volume's nginx workers serve at once
                await asyncio.sleep(max(0.0, self.due[0][0] - loop.time()))
                now = loop.time()
                batch = []
                while self.due and self.due[0][0] <= now and len(batch) < RETIRE_BATCH:
                    batch.append(self.due.popleft()[1:])
                task = loop.create_task(self.retire(batch))
                _tails.add(task)
                task.add_done_callback(_tails.discard)
        finally:
            self.task = None
            if _retirements.get((id(self.pool), id(self.store), self.grace)) is self and not self.due:
                del _retirements[(id(self.pool), id(self.store), self.grace)]

    async def retire(self, batch: list[tuple[bytes, bytes, bytes | None, list[str]]]) -> None:
        try:
            _failed.extend(await retire_many(self.pool, self.store, batch))
        except Exception as e:  # noqa: BLE001 - the index could not be written: told by drain()
            _failed.extend([f"retiring old copies failed: {e!r}"] * len(batch))


# by (pool, store, grace); an entry holds its pool and store, so their ids are not reused meanwhile
_retirements: dict[tuple[int, int, float], Retirements] = {}
_failed: list[str] = []  # the deletions the batches could not do, for drain()


def retire_later(pool: Pool, store: Store, key: bytes, live: bytes, relock: bytes | None, stale: list[str],
                 grace: float = GRACE) -> None:
    """retire(...) in the background, batched with the other keys' (Retirements)."""
    ident = (id(pool), id(store), grace)
    batch = _retirements.get(ident)
    if batch is None:
        batch = _retirements[ident] = Retirements(pool, store, grace)
    batch.add(key, live, relock, stale)


async def retire_many(pool: Pool, store: Store, batch: list[tuple[bytes, bytes, bytes | None, list[str]]]
                      ) -> list[str]:
    """retire() of many keys `(key, live, relock, stale)` whose GRACE is over: every deletion at
    once, then every unlock in one transaction. The deletions that failed."""
    files = []
    for key, _, relock, stale in batch:
        if relock is None:  # as in retire(): the copies a newer record names stay
            stale = [v for v in stale if v not in named(await settle(store.get(key)))]
        files.append((stale, key))
    failed = await replicas.delete_each(pool, files)
    unlocks = [(key, relock, live) for key, live, relock, _ in batch if relock is not None]
    if unlocks:
        await cas_seq(store, unlocks)
    return failed


async def drain() -> list[str]:
    """Wait for every background retirement; the deletions that failed."""
    failed: list[str] = []
    seen: set[asyncio.Task] = set()
    # a finished task leaves _tails by a callback that runs a moment later: count it once
    while waiting := [t for t in _tails if t not in seen]:
        seen.update(waiting)
        for result in await asyncio.gather(*waiting, return_exceptions=True):
            if isinstance(result, BaseException):
                failed.append(f"retiring old copies failed: {result!r}")
    failed += _failed
    _failed.clear()
    return failed


async def try_move(pool: Pool, store: Store, key: bytes, raw: bytes, want: list[str], epoch: int = 0,
                   good: list[str] | None = None) -> tuple[bool, bytes | None]:
    """Lock the key's LIVE record `raw` and move it onto `want`, retiring the old copies in the
    background. (True, None) when moved; (False, the record now) when it changed meanwhile, to
    be looked at again. Raises VolumeError when the move failed: the key stays where it was."""
    pending = encode_pending(OP_REBALANCE, os.getpid(), now_ms(), want, raw)
    done, current = await settle(store.cas(key, raw, pending))  # admin/batch.py's: with others
    if not done:
        return False, current
    try:
        await move_key(pool, store, key, raw, want, pending, epoch=epoch, good=good, detach=True)
    except LostLock:
        return False, await settle(store.get(key))
    return True, None


async def cas_seq(store: Store, ops: list[tuple[bytes, bytes | None, bytes | None]]) -> list[tuple[bool, bytes | None]]:
    """Compare-and-sets in order, in one transaction where the engine can (LMDB's cas_many)."""
    if hasattr(store, "cas_many"):
        return await settle(store.cas_many(ops))
    return [await settle(store.cas(*op)) for op in ops]
