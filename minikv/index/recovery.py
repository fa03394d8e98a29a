"""Undoing the writes a crash interrupted, so no key stays locked (409) and none is a phantom.

Every PENDING record names the volumes it was touching and the record it replaced:
- put: the value was never acknowledged; delete whatever reached the volumes, drop the record.
  Unless it replaced a value whose files lie under the same paths (an S3 overwrite): the
  volumes' renames may have put the new value in place of the old one already, and deleting it
  would delete the acknowledged old value too. Each volume is asked what it holds (the size,
  and the md5 when the sizes agree): if none holds the new value the old record is put back,
  else the new value is rolled forward (copied to the rest, recorded where it is);
- delete: finish it; if a replica cannot be deleted now, leave the key UNLINKED (DELETE again);
- rebalance: delete the new copies, put the old record back (its replicas were never touched).
A composite value (an S3 multipart object: its bytes are other keys' files, none under its own
key) that a write was replacing is put back (nothing of it was touched before the commit); one
that a delete was removing becomes UNLINKED (its parts are deleted by DELETE again or `gc`).

Whose records: a worker's when the supervisor saw it die; at start-up, those of every process
that is gone. A record whose owner still runs belongs to a live admin command (only one server
can hold a database: server.py locks it), and is left alone.
"""

from __future__ import annotations

import asyncio
import os

from minikv import replicas
from minikv.http.client import Pool, VolumeError
from minikv.index.engine import settle
from minikv.index.record import (
    LIVE,
    NO_MD5,
    OP_DELETE,
    OP_PUT,
    OP_REBALANCE,
    UNLINKED,
    Data,
    decode_data,
    decode_pending,
    encode_data,
    is_composite,
    now_ms,
    with_state,
)
from minikv.index.store import Store, StoreError

RETRY_EVERY = 1.0  # seconds between tries to drop a record the database would not take
_retries: set[asyncio.Task] = set()  # kept here so they are not collected


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def owner_alive(pid: int, started_ms: int) -> bool:
    """Does the process that wrote a PENDING record at `started_ms` still run? Its pid must be
    alive and have started before the record: a pid reused later is another process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    boot = _boot_time()
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):  # a zombie no one reaped yet: dead all the same
            return False
        ticks = int(fields[19])  # field 22: when the process started
    except (OSError, ValueError, IndexError):
        return True
    if boot is None:
        return True
    return boot + ticks / os.sysconf("SC_CLK_TCK") <= started_ms / 1000 + 1


async def recover(store: Store, pool: Pool, owner: int | None = None) -> int:
    """Resolve the PENDING records of `owner` (a worker pid that died), or when None those of
    every process that is gone. Returns how many were resolved."""
    resolved = 0
    for key, raw in store.pending_records():
        p = decode_pending(raw)
        if owner is not None and p.owner != owner:
            continue
        if owner is None and owner_alive(p.owner, p.started_ms):
            continue
        await resolve(pool, key, raw, store.cas)
        resolved += 1
    return resolved


async def resolve(pool: Pool, key: bytes, raw: bytes, cas) -> None:
    """Undo (or finish) the write that the PENDING record `raw` of `key` stands for; `cas` is
    the engine's compare-and-set (a coroutine function on PostgreSQL)."""
    p = decode_pending(raw)
    if p.op == OP_REBALANCE and p.previous:
        old = decode_data(p.previous).volumes
        await replicas.delete_all(pool, [v for v in p.volumes if v not in old], key)
        await settle(cas(key, raw, p.previous))
    else:
        if p.op == OP_PUT and p.volumes and p.previous[:1] == bytes((LIVE,)) and not is_composite(p.previous):
            await _overwrite(pool, key, raw, p, cas)
            return
        failed = await replicas.delete_all(pool, p.volumes, key)
        if p.op == OP_DELETE and is_composite(p.previous):
            await settle(cas(key, raw, with_state(p.previous, UNLINKED)))
        elif p.op == OP_PUT and p.previous and (is_composite(p.previous) or not p.volumes):
            # the previous value was not touched: its files and the new ones are not under the same paths
            await settle(cas(key, raw, p.previous))
        elif failed and p.op == OP_DELETE and p.previous:
            await settle(cas(key, raw, with_state(p.previous, UNLINKED)))
        else:
            await settle(cas(key, raw, None))  # what could not be deleted is an orphan for `gc`


async def _holds(pool: Pool, volume: str, key: bytes, old: Data) -> tuple[str, int | None]:
    """What `volume` holds under `key` after a crashed overwrite of `old`: ("old"|"new"|"none"|
    "unknown", its size). nginx renames an upload into place only when it is whole, so a file
    that is not the old value is the new one."""
    try:
        size = await replicas.exists(pool, volume, key)
        if size is None:
            return "none", None
        if size != old.size:
            return "new", size
        if old.md5 == NO_MD5:
            return "unknown", size  # the same size and nothing to compare with: either is whole
        got = await replicas.md5_of(pool, volume, key)
    except VolumeError:
        return "unknown", None
    if got is None:
        return "none", None
    return ("old" if got[1] == old.md5 else "new"), size


async def _overwrite(pool: Pool, key: bytes, raw: bytes, p, cas) -> None:
    """Resolve a PUT that crashed while replacing the value of record `p.previous` at the same paths."""
    old = decode_data(p.previous)
    asked = list(dict.fromkeys([*p.volumes, *old.volumes]))
    state = dict(zip(asked, await asyncio.gather(*(_holds(pool, v, key, old) for v in asked))))
    new = [v for v in p.volumes if state[v][0] == "new"]
    if not new:  # no volume renamed: the old value is whole wherever it was
        await settle(cas(key, raw, p.previous))
        return
    size = state[new[0]][1]
    got = await replicas.md5_of(pool, new[0], key)
    md5 = got[1] if got is not None and got[0] == size else NO_MD5
    kept = list(new)
    for dst in [v for v in p.volumes if v not in new]:
        for src in new:
            try:
                await replicas.copy(pool, key, src, dst, size)
                kept.append(dst)
                break
            except VolumeError:
                continue
    # epoch 0: off its layout, so that verify and rebalance look at it (it may lack replicas)
    live = encode_data(LIVE, [v for v in p.volumes if v in kept], size, now_ms(), md5, 0)
    done, _ = await settle(cas(key, raw, live))
    if done:  # the old value's files on volumes the new record does not name are stale copies
        await replicas.delete_all(pool, [v for v in old.volumes if v not in kept], key)


def retry_when_writable(change) -> None:
    """Call `change()` (an engine call, or a coroutine function) again every RETRY_EVERY
    seconds until the database takes it, in the background: a StoreError (a full disk, a
    database away) means "not yet"; anything it returns means done, or moot."""

    async def retry() -> None:
        while True:
            await asyncio.sleep(RETRY_EVERY)
            try:
                await settle(change())
                return
            except StoreError:
                continue

    task = asyncio.get_running_loop().create_task(retry())
    _retries.add(task)
    task.add_done_callback(_retries.discard)


def drop_when_writable(store: Store, key: bytes, pending: bytes) -> None:
    """Drop the PENDING record `pending` of `key`, whose files are already gone (a PUT undone,
    a DELETE done), as soon as the database takes a write again: a full disk then leaves the
    key locked for as long as it stays full, not until the next restart."""
    retry_when_writable(lambda: store.cas(key, pending, None))  # done, or someone resolved it already
