"""Undoing the writes a crash interrupted, so no key stays locked (409) and none is a phantom.

Every PENDING record names the volumes it was touching and the record it replaced:
- put: the value was never acknowledged; delete whatever reached the volumes, drop the record.
  Unless it replaced a value whose files lie under the same paths (an S3 overwrite): the
  volumes' renames may have put the new value in place of the old one already, and deleting it
  would delete the acknowledged old value too. Each volume is asked what it holds (the size,
  and the md5 when the sizes agree, told from the new value's that the record keeps): the
  value more of them hold is kept there (the old record back when none renamed);
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
import contextlib
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
    reowned,
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
    every process that is gone. Returns how many were resolved. Records this process claimed
    before and could not resolve nor give back (the index could not be written) come too: a
    server's supervisor, alive, would otherwise keep them locked until it stopped."""
    resolved = 0
    me = os.getpid()
    for key, raw in store.pending_records():
        p = decode_pending(raw)
        if owner is not None and p.owner not in (owner, me):
            continue
        if owner is None and owner_alive(p.owner, p.started_ms):
            continue
        # made ours first: the list is read once, and another process (an admin command, a
        # server starting) may have resolved this record since, and the key moved on: its files
        # are then another value's, and must not be deleted on the strength of this old list
        claimed = reowned(raw, os.getpid(), now_ms())
        done, _ = await settle(store.cas(key, raw, claimed))
        if not done:
            continue
        try:
            await resolve(pool, key, claimed, store.cas)
        except BaseException:
            # not resolved: the dead owner's again, for the next resolver (a live claimer, such
            # as a server's supervisor, would keep the key locked until it stopped)
            with contextlib.suppress(Exception):
                await settle(store.cas(key, claimed, raw))
            raise
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
        if p.op == OP_PUT and p.previous[:1] == bytes((UNLINKED,)) and not is_composite(p.previous):
            # a PUT over an UNLINKED value, at its very paths: that value stays where it still is
            old = decode_data(p.previous)
            state = dict(zip(p.volumes, await asyncio.gather(*(_holds(pool, v, key, old, p.new)
                                                                for v in p.volumes))))
            if any(s == "down" for s, _ in state.values()):  # not decided on a part of the picture
                await settle(cas(key, raw, p.previous))
                return
            delete, record = unlinked_after(p.previous, p.volumes, [v for v in p.volumes
                                                                    if state[v][0] in ("new", "none")])
            await replicas.delete_all(pool, delete, key)
            await settle(cas(key, raw, record))
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


def unlinked_after(previous: bytes, volumes: list[str], touched: list[str]) -> tuple[list[str], bytes | None]:
    """A PUT over the UNLINKED value `previous` failed. It wrote at that value's very paths on
    `volumes`, and on `touched` the value is gone (replaced by the PUT's bytes, or missing). The
    copies to delete, and the record to put back: the unlinked value on the volumes that still
    hold it, or None when none does (the record goes)."""
    old = decode_data(previous)
    kept = [v for v in old.volumes if v not in touched]
    delete = [v for v in volumes if v not in kept]
    if not kept:
        return delete, None
    if kept == old.volumes:
        return delete, previous
    return delete, encode_data(UNLINKED, kept, old.size, old.mtime_ms, old.md5, 0)


def abandoned(pending: bytes, volumes: list[str], touched) -> tuple[list[str], bytes | None]:
    """A PUT that held `pending` on `volumes` is given up (`touched`: those that took, or may
    have taken, its bytes): the copies to delete, and the record to put back in place of its
    lock (None: the record goes). Over an UNLINKED value that value stays where it still is
    (unlinked_after); otherwise every copy goes."""
    previous = decode_pending(pending).previous
    if previous[:1] == bytes((UNLINKED,)) and not is_composite(previous):
        return unlinked_after(previous, volumes, list(touched))
    return volumes, None


async def _holds(pool: Pool, volume: str, key: bytes, old: Data, new: tuple | None) -> tuple[str, int]:
    """What `volume` holds under `key` after a crashed overwrite of `old` by `new` (size, md5,
    mtime; None in a record of an older minikv): ("old"|"new"|"none"|"neither"|"down", its size).
    Sizes tell the two apart, and the md5 read back when they are the same. A file of neither
    value (truncated) is never taken for one. Without `new`, nginx renaming an upload into place
    only whole, a file that is not the old value is taken for the new one."""
    try:
        size = await replicas.exists(pool, volume, key)
    except VolumeError:
        return "down", -1
    if size is None:
        return "none", -1
    if new is not None and size == new[0] != old.size:
        return "new", size
    if new is not None and size == old.size != new[0]:
        return "old", size
    if size != old.size:  # nor the new value's size
        return ("neither" if new is not None else "new"), size
    try:  # the same size as the old value (and as the new one, if known): the content tells
        got = await replicas.md5_of(pool, volume, key)
    except VolumeError:
        return "down", size
    if got is None:
        return "none", -1
    if new is not None and got[1] == new[1]:
        return "new", size
    if old.md5 != NO_MD5 and got[1] == old.md5:
        return "old", size
    return ("new" if new is None and old.md5 != NO_MD5 else "neither"), size


async def _overwrite(pool: Pool, key: bytes, raw: bytes, p, cas) -> None:
    """Resolve a PUT that crashed while replacing the value of record `p.previous` at the same
    paths. The value more volumes hold whole is kept (the new one on a tie: its commit had
    begun), on those volumes, the record marked off its layout (epoch 0) so that verify and
    rebalance complete its replicas, and the other value's files are deleted. When a volume
    cannot be asked (down, as after a power loss), or none holds either value as far as can be
    told, nothing is decided on a part of the picture: the old record comes back as it was and
    nothing is deleted (a volume that renamed then holds a whole value its record does not
    describe, which verify reports). Nothing is copied here: recovery holds up the supervisor,
    and a value may be gigabytes."""
    old = decode_data(p.previous)
    state = dict(zip(p.volumes, await asyncio.gather(*(_holds(pool, v, key, old, p.new) for v in p.volumes))))
    new = [v for v in p.volumes if state[v][0] == "new"]
    # volumes of the old record the write did not touch still hold it
    olds = [v for v in old.volumes if v not in state or state[v][0] == "old"]
    if not new or any(s == "down" for s, _ in state.values()):
        await settle(cas(key, raw, p.previous))
        return
    if len(olds) > len(new):
        kept = p.previous if olds == old.volumes else encode_data(LIVE, olds, old.size, old.mtime_ms, old.md5, 0)
        done, _ = await settle(cas(key, raw, kept))
        if done:
            await replicas.delete_all(pool, new, key)
        return
    if p.new is not None:  # the value as its write would have recorded it: its S3 headers are found again
        size, md5, mtime = p.new
    else:  # a record of an older minikv: the md5 read back, if it can be
        size, md5, mtime = state[new[0]][1], NO_MD5, now_ms()
        for v in new:
            try:
                got = await replicas.md5_of(pool, v, key)
            except VolumeError:
                continue
            if got is not None and got[0] == size:
                md5 = got[1]
                break
    done, _ = await settle(cas(key, raw, encode_data(LIVE, new, size, mtime, md5, 0)))
    if done:
        await replicas.delete_all(pool, [v for v in dict.fromkeys([*p.volumes, *old.volumes]) if v not in new
                                         and state.get(v, ("old",))[0] == "old"], key)


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


async def cas_or_later(engine, key: bytes, expect: bytes, new: bytes | None) -> str:
    """Take `key`'s record from our lock `expect` to `new` now or, when the database cannot
    write now, once it can (retry_when_writable): "" when done now, else why not. For a lock
    that must not stay (a key held, a DELETE refused): a lock left behind is a key stuck in 409."""
    try:
        await settle(engine.cas(key, expect, new))
    except StoreError as e:
        retry_when_writable(lambda: engine.cas(key, expect, new))  # done, or someone resolved it already
        return str(e)
    return ""
