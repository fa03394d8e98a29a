"""Values the S3 way: overwrite allowed, empty values allowed, reads streamed from a replica.

The record is the lock, as in the plain API (see api/app.py), and the volumes' atomic rename is
the commit. Order of writes for a PUT (PutObject, UploadPart, CopyObject, CompleteMultipartUpload):

1. One streaming PUT per replica, opened before the body is read; the record is not touched.
   nginx spools each upload to a temp file and renames it over the old file only when the
   whole body has arrived, so until then every replica still holds the old value. We hold back
   the last chunk (or, without a length, the chunked terminator) until the body has been read
   completely and every check passed (length, Content-MD5, x-amz-content-sha256, checksums,
   chunk signatures): any failure before that point aborts the uploads, nginx drops them, and
   nothing has changed. Any number of writers of one key can be at this step at once, each
   holding a volume connection per replica: they count in the index's budget of files for
   uploads, shared with the plain API's PUTs (App.held_files), and past it get 503 SlowDown.
2. record -> PENDING(put, new volumes, previous record), once the body is complete. A PENDING
   record already there (another write or delete of the key committing) is waited for, up to
   LOCK_WAIT seconds, then taken: concurrent S3 writes of one key all succeed, one after the
   other, and the one whose body ends last wins, as in S3 (the plain API keeps its 409). The
   wait also ends (409, nothing changed) before the uploads have waited UPLOAD_IDLE seconds
   with nothing sent: nginx would drop them, and the commit would then fail on every volume.
   Commits go one at a time, because every value of a key lives in the same file on a volume:
   two renames over it at once could leave different values on different replicas. The lock is
   not taken earlier because a client may hold back the end of one write until another write
   of the same key has finished (Ceph's s3-tests do): a lock held for the whole body would make
   them wait on each other. Readers of the S3 API keep being served the previous value
   meanwhile (`readable`); the plain API answers 404 for a key while it commits.
3. Send the last bytes: each volume renames. All answered 2xx -> the new value's attributes
   (meta.py, keyed by the value's fingerprint) -> record LIVE -> 200; then the files on volumes
   the previous record named and the new one does not are deleted, and so are the previous
   value's attributes.
4. If some volumes gave no answer to the last bytes (a volume hung or died at the very end),
   we ask each what it holds: its file's size tells the new value from the old, and when both
   have the same size, its md5 (the file read back). If some hold the new value, we roll
   forward by copying it to the others; a volume that cannot take the copy is left out of the
   record, which names only the volumes that hold the new value (503: write again, or
   `minikv rebalance` completes the replicas). If none does, the previous record is put back,
   naming the volumes known to hold the old value (503, the new value was not stored). Either
   way the key keeps a whole value, the old or the new, and is never deleted for this.

A crash in step 1 changes nothing (nginx drops unfinished uploads). A crash in steps 2-4 leaves
PENDING(put), which recovery (index/recovery.py) resolves as step 4 does: a new key's files are
deleted and its record dropped; a replaced value is kept if no volume renamed, else the new
value is rolled forward. The key is never stuck, never a phantom, and never holds a mix of two
values; an acknowledged value is never deleted for a write that was not.

Parts of multipart uploads are values too, under internal keys (multipart.py), so all of this
applies to them.

An overwrite replaces the file at the same path: minikeyvalue's layout names a file after its
key only, and `rebuild` reads keys back from file names, so there is no path per version. A
plain-API 302 handed out before step 3 (with the old value's Content-Md5) and followed after it
therefore fetches the new value. An S3 GET, and the read of a copy's source, look at the record
again once a replica has answered (`kept`): a value changed meanwhile is read again under its new
record, so its headers are the bytes'. A download already under way keeps the file nginx opened,
so it is whole. The plain API's own PUT never overwrites (403), so clusters written only through
it never see this.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections.abc import AsyncIterator

import lmdb

from minikv import replicas
from minikv.api.digest import StreamingMd5
from minikv.http.client import VolumeError
from minikv.index import fence
from minikv.index.engine import settle
from minikv.index.record import (
    LIVE,
    MD5_AT,
    NO_MD5,
    OP_DELETE,
    OP_PUT,
    PENDING,
    UNLINKED,
    VOLUMES_AT,
    decode_data,
    decode_pending,
    encode_data,
    encode_pending,
    is_composite,
    now_ms,
    with_state,
)
from minikv.index.record import readable as kept_readable
from minikv.index.recovery import cas_or_later, retry_when_writable
from minikv.index.store import StoreError
from minikv.placement import epoch, host_of, key2volume
from minikv.s3 import composite
from minikv.s3.errors import S3Error

OK = (200, 201, 204)
LOCK_WAIT = 30.0  # seconds an S3 write or delete waits for the one in flight on its key
SETTLE_WAIT = 5.0  # seconds an S3 GET waits for an overwrite in flight to commit (`settled`)
# nginx drops an upload that sends it nothing for 60 s (client_body_timeout's default): a write
# whose uploads wait, their last bytes held back, gives up its wait for the key well before
UPLOAD_IDLE = 50.0



def readable(raw: bytes | None) -> bytes | None:
    """The LIVE record a reader should see: the record itself, or, while a PUT or REBALANCE
    replaces it, the one it replaces (its replicas stay complete until the switch)."""
    if raw is None:
        return None
    return raw if raw[0] == LIVE else kept_readable(raw)


async def read_chunk(body, stall: float) -> bytes:
    """The next chunk of a volume's answer, failing after `stall` seconds without one
    (VolumeError). Chunks already buffered are taken without a timer; a wait is watched by the
    pool's watchdog (wait_for would cost a task and a timer per chunk: thousands for a big
    value, a good part of an S3 GET's time). The wait is for the volume only: while we wait
    for a slow client instead, no timer runs."""
    conn = body._conn
    if body._chunks or body.done or conn is None:
        return await body.read()
    conn.watch(stall, f"sent nothing for {stall:g}s")
    try:
        return await body.read()
    finally:
        conn.unwatch()


def files_on(raw: bytes | None) -> list[str]:
    """The volumes holding a file under the key of record `raw` (none for a composite value)."""
    return [] if raw is None or is_composite(raw) else decode_data(raw).volumes


class Overwritten(Exception):
    """A value was overwritten between the read of its record and its volume's answer (`open`
    and `stream` with checked=True): its bytes may be the new value's, or gone; the reader (a
    GET, a copy) reads the record again."""


class Values:
    """Reading, writing and deleting values for the S3 front (one per worker)."""

    def __init__(self, config, store, pool, health):
        self.config = config
        self.store = store
        self.pool = pool
        self.health = health
        self.pid = os.getpid()
        self.epoch = epoch(config.volumes, config.replicas, config.subvolumes)
        self.meta = None  # the S3 meta store (meta.py), for object attributes; set by the S3 front
        # the plain API's App, whose count of volume connections held by uploads (held_files,
        # within max_held_files) S3 writes share; set by the S3 front
        self.uploads = None

    def placement(self, key: bytes) -> list[str]:
        c = self.config
        return key2volume(key, c.volumes, c.replicas, c.subvolumes)

    # -- reads --
    def _replica_order(self, volumes: list[str]) -> list[str]:
        """Healthy replicas in random order first, then the ones believed down."""
        shuffled = random.sample(volumes, len(volumes))
        if not self.health.down:
            return shuffled
        return ([v for v in shuffled if host_of(v) not in self.health.down]
                + [v for v in shuffled if host_of(v) in self.health.down])

    async def open(self, key: bytes, raw: bytes, headers=(), moved: bool = False, checked: bool = False):
        """Start a GET of the value of record `raw` from one replica: (conn, body) with status
        200 or 206. Tries each replica in turn, past any whose file is not the record's size
        (callers ask only for ranges inside the value). `checked`: Overwritten when the files
        are gone because another value took the key (the caller then reads the record again)."""
        reasons = []
        missing = 0
        data = decode_data(raw)
        for volume in self._replica_order(data.volumes):
            host, path = replicas.locate(volume, key)
            try:
                conn, body = await self.pool.download(host, path, headers)
            except VolumeError as e:
                self.health.mark_down(host, str(e))
                reasons.append(str(e))
                continue
            if conn.status in (200, 206):
                held = _whole_size(conn)
                if held == data.size or await self._overwritten(key, raw, held):
                    return conn, body
                # a damaged replica (cut short): the next one may be whole
                self.pool.discard(conn)
                reasons.append(f"volume {host} holds {held} bytes of a {data.size}-byte value (run verify)")
                continue
            self.pool.discard(conn)
            if conn.status == 416:  # our ranges lie within the record's size: this copy is short
                reasons.append(f"volume {host} holds less than the {data.size}-byte value (run verify)")
                continue
            reasons.append(f"volume {host} answered {conn.status} to GET")
            missing += conn.status == 404
        if missing and (current := readable(await settle(self.store.get(key)))) != raw:
            # the files went because the record changed after we read it (the plain API or
            # another worker): a key deleted meanwhile is missing, not the service broken
            if current is None:
                raise S3Error("NoSuchKey", "The specified key does not exist (it was deleted while being read).")
            if current[1:33] == raw[1:33] and not moved:  # same value (size, mtime, md5), moved: once more
                return await self.open(key, current, headers, moved=True, checked=checked)
            if checked:
                raise Overwritten(key)
            reasons.append("the object was replaced while being read: retry")
        raise S3Error("ServiceUnavailable", "no replica could be read: " + "; ".join(reasons))

    async def still(self, key: bytes, raw: bytes, conn, strict: bool = False) -> bool:
        """Is the file `conn` answers with (opened by open(): nginx reads the file it opened,
        whatever is renamed over it after) surely the value of record `raw`? A write renames its
        file in only under its lock, so it is while the key holds that value, or a DELETE's or
        a move's lock over it; not once an overwrite took the key (its file may be in already).
        `strict`: and were the value's attributes, read since `raw`, surely its own? Only while
        the key still holds `raw`: a committed overwrite drops them, and one of the same bytes
        (a re-PUT to fix a Content-Type) left a copy with no headers at all. A GET sends what it
        read at once; a copy stores it."""
        now = await settle(self.store.get(key))
        if now is None or _whole_size(conn) != decode_data(raw).size:
            return False
        if now[0] == PENDING:
            p = decode_pending(now)
            if p.op == OP_PUT and p.volumes:
                return (not strict or p.previous[1:33] == raw[1:33]) and _has_md5_of(conn, raw)
            now = p.previous
        # the same value (size, mtime, md5); else, with the answer in hand, the same bytes
        same = now[:1] == bytes((LIVE,)) and now[1:33] == raw[1:33]
        return same or (not strict and _has_md5_of(conn, raw))

    async def kept(self, key: bytes, raw: bytes, conn, strict: bool = False) -> bool:
        """`still`, with the volume's answer `conn` let go of (neither read nor kept) when not."""
        try:
            same = await self.still(key, raw, conn, strict)
        except BaseException:  # the index away
            self.pool.discard(conn)
            raise
        if not same:
            self.pool.discard(conn)
        return same

    async def settled(self, key: bytes) -> bytes | None:
        """The key's record once no overwrite is in flight (its file may be in, its record not
        yet: poll, as `unlocked`); SlowDown after SETTLE_WAIT seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_WAIT
        polls = 0
        while (raw := await settle(self.store.get(key))) is not None and raw[0] == PENDING \
                and raw[1:2] == OP_PUT and decode_pending(raw).volumes:
            if loop.time() >= deadline:
                raise S3Error("SlowDown", f"an overwrite of this key has been in flight for over {SETTLE_WAIT:g}s; "
                              "read it again later")
            # an overwrite's lock lasts its last bytes and its commit (a few ms): looked at
            # often at first, so that a key written without a pause still gets read between two
            polls += 1
            await asyncio.sleep(0.001 if polls <= 50 else 0.05)
        return raw

    async def _overwritten(self, key: bytes, raw: bytes, held: int | None) -> bool:
        """Is a file of another size than record `raw` says the value of an overwrite that has
        renamed its files in since (committed, or about to: its lock names its size; or committed
        and now under a DELETE's lock)? It is then what the key holds: streamed (a copy's
        source), or read again under its record (an S3 GET, which `still` sends back); otherwise
        the copy is damaged."""
        now = await settle(self.store.get(key))
        if now is None:
            return False
        current = readable(now)
        if current is None and now[0] == PENDING and now[1:2] == OP_DELETE:
            # committed since, and now being deleted: its files stay until the delete reaches them
            previous = decode_pending(now).previous
            current = previous if previous[:1] == bytes((LIVE,)) else None
        if current is not None and current != raw:  # committed since: that value's size
            return not is_composite(current) and decode_data(current).size == held
        if now[0] == PENDING and now[1:2] == OP_PUT:
            new = decode_pending(now).new
            return new is not None and new[0] == held
        return False

    async def stream(self, key: bytes, raw: bytes, headers=(), expect: int | None = None,
                     checked: bool = False) -> AsyncIterator[bytes]:
        """The value's bytes (or a range of them) from one replica, flow-controlled. `checked`:
        Overwritten, before any byte, unless they are surely record `raw`'s value with its
        attributes (`still`), which the client's conditions were checked against (a copy's
        source)."""
        conn, body = await self.open(key, raw, headers, checked=checked)
        if checked and not await self.kept(key, raw, conn, strict=True):
            raise Overwritten(key)
        size = 0
        try:
            while chunk := await read_chunk(body, self.pool.stall):
                size += len(chunk)
                yield chunk
        except asyncio.TimeoutError:
            raise S3Error("ServiceUnavailable", f"volume {conn.host} sent nothing for {self.pool.stall:g}s") from None
        except VolumeError as e:
            raise S3Error("ServiceUnavailable", str(e)) from None
        finally:
            self.pool.finish_download(conn)
        if expect is not None and size != expect:
            raise S3Error("InternalError", f"volume {conn.host} sent {size} bytes of a {expect}-byte value")

    # -- writes --
    async def unlocked(self, key: bytes, idle_until: float | None = None) -> bytes | None:
        """The key's record once no write or delete holds it (polled: the lock is in the index,
        shared by every worker); 409 OperationAborted after LOCK_WAIT seconds, or at
        `idle_until` (loop time), when the volumes would drop this write's waiting uploads."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOCK_WAIT
        delay = 0.002
        while (raw := await settle(self.store.get(key))) is not None and raw[0] == PENDING:
            if idle_until is not None and loop.time() >= idle_until:
                raise S3Error("OperationAborted", "another write or delete of this key is in flight, and this "
                              f"write's uploads to the volumes cannot wait longer (they would be dropped after "
                              f"{UPLOAD_IDLE:g}s with nothing sent); nothing was changed: try again")
            if loop.time() >= deadline:
                raise S3Error("OperationAborted", f"another write or delete of this key has been in flight for "
                              f"over {LOCK_WAIT:g}s; try again later")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return raw

    async def lock(self, key: bytes, volumes: list[str], idle_until: float | None = None,
                   new: tuple[int, bytes, int] | None = None) -> tuple[bytes, bytes | None]:
        """Take the key's record to PENDING(put) for `volumes`, after any write in flight (as
        `unlocked`): (pending, previous record). `new`: the value's (size, md5, mtime), kept in the
        record so that recovery can tell it on the volumes from the value it replaces."""
        while True:
            raw = await self.unlocked(key, idle_until)
            pending = encode_pending(OP_PUT, self.pid, now_ms(), volumes, raw or b"", new)
            try:
                done, _ = await settle(self.store.cas(key, raw, pending))
            except StoreError:
                # its answer lost (PostgreSQL): the lock may be ours, and must not stay
                retry_when_writable(lambda lock=pending, back=raw: self.store.cas(key, lock, back))
                raise
            if done:
                return pending, raw
            # another writer took it between our read and our CAS: queue behind it

    async def put(self, key: bytes, source: AsyncIterator[bytes], length: int | None,
                  attrs: bytes | None = None, check=None) -> bytes:
        """Store what `source` yields as the value of `key` (replacing any), following the
        order above, with the encoded attributes `attrs` (attrs.py); the new LIVE record.
        `source` raises at its end if a check fails; so does `check()` (a coroutine function),
        called once the key's lock is taken, before the commit."""
        if self.config.protect:  # refused before the body is read, if it can be told now
            self.protected(key, await settle(self.store.get(key)))
        volumes = self.placement(key)
        taken: list = []  # [pending, previous] once the key's lock is taken, at the commit point
        budget, counted = self.uploads, 0
        if budget is not None and budget.max_held_files:
            # a volume connection (an open file) per replica from the start of the body until the
            # commit, queueing for the key included: counted with the plain API's, so writers
            # that take their time cannot use up the files reads and the index need
            if budget.held_files + len(volumes) > budget.max_held_files:
                raise S3Error("SlowDown", f"the index is out of open files for uploads ({budget.held_files} "
                              f"held by uploads in flight, limit {budget.max_held_files}): try again; "
                              "nothing was changed")
            counted = len(volumes)
            budget.held_files += counted
        try:
            size, md5, volumes, degraded = await self._write(key, source, length, volumes, taken, check)
        except BaseException:
            if taken and await settle(self.store.get(key)) == taken[0]:  # undo unless _write resolved the record itself
                await self._restore(key, taken[0], taken[1], volumes)
            raise
        finally:
            if counted:
                budget.held_files -= counted
        pending, previous, mtime = taken
        # a record on fewer volumes than placement names is marked off its layout (epoch 0), so
        # that it reads as unbalanced and verify and rebalance look at it
        live = encode_data(LIVE, volumes, size, mtime, md5, 0 if degraded else self.epoch)
        try:
            if attrs and self.meta is not None:  # before the record: never a new value with old headers
                await settle(self.meta.put_attrs(key, live, attrs))
            done, _ = await settle(self.store.cas(key, pending, live))
        except (StoreError, lmdb.Error) as e:
            if previous is not None and previous[0] == LIVE and set(files_on(previous)) & set(volumes):
                # the new value replaced the previous one's files at the same paths: deleting it
                # would lose both. Its record is committed once the index can write (or by
                # recovery, should this process end first: the lock names the value)
                self._commit_later(key, pending, previous, live, volumes, attrs)
                raise S3Error("ServiceUnavailable", f"{e}; the new value is on the volumes in place of the "
                              "previous one, and becomes the key's once the index can write") from None
            raise S3Error("ServiceUnavailable", f"{e}; {await self._unstore(key, pending, previous, volumes)}") from None
        if not done:
            raise S3Error("InternalError", "lost the key's lock while writing (was the index recovered meanwhile?)")
        if previous is not None:
            await self.replaced(key, previous, live, volumes)
        if degraded:  # stored, but on fewer replicas than asked: the client must not take it as done
            err = S3Error("ServiceUnavailable", degraded)
            err.live = live  # the record committed all the same (multipart.complete's manifest is its own)
            raise err
        return live

    def protected(self, key: bytes, raw: bytes | None) -> None:
        """With -protect, an object's value is destroyed only by way of an unlink (DeleteObject
        unlinks): a write over a LIVE object is refused. Parts of uploads (internal keys) are not
        objects."""
        if key[:1] == b"/" and raw is not None and readable(raw) is not None:
            raise S3Error("AccessDenied", "the index runs with -protect: an object is not replaced; delete it "
                          "first (DeleteObject unlinks it), then write it again")

    async def replaced(self, key: bytes, previous: bytes, live: bytes, volumes: list[str]) -> None:
        """After the commit of `live` (files on `volumes`) over `previous`: drop what only the
        previous value used. One that cannot be deleted now is an orphan for `minikv gc`."""
        await self._forget(key, previous, live)
        if is_composite(previous):
            if not (is_composite(live) and live[VOLUMES_AT:] == previous[VOLUMES_AT:]):
                await composite.remove(self, previous)
            return
        stale = [v for v in decode_data(previous).volumes if v not in volumes]
        if stale:
            await replicas.delete_all(self.pool, stale, key)

    async def _forget(self, key: bytes, previous: bytes, live: bytes | None) -> None:
        """Drop the attributes of a replaced or deleted value (one left behind is never read)."""
        if self.meta is None or (live is not None and live[1:33] == previous[1:33]):
            return
        try:
            await settle(self.meta.drop_attrs(key, previous))
        except (lmdb.Error, StoreError):
            pass

    def _commit_later(self, key: bytes, pending: bytes, previous: bytes, live: bytes, volumes: list[str],
                      attrs: bytes | None) -> None:
        async def commit():
            try:
                if attrs and self.meta is not None:  # the object's headers first, as put does
                    await settle(self.meta.put_attrs(key, live, attrs))
                done, _ = await settle(self.store.cas(key, pending, live))
            except lmdb.Error as e:  # a full map: not yet
                raise StoreError(str(e)) from None
            if done:
                await self.replaced(key, previous, live, volumes)
        retry_when_writable(commit)

    async def _unstore(self, key: bytes, pending: bytes, previous: bytes | None, volumes: list[str]) -> str:
        """The value is on the volumes but its record cannot be made LIVE: do what recovery
        would after a crash (delete the new files, drop the record), and say what became of
        the key. Files of a replaced value on other volumes are orphans for `minikv gc`."""
        await replicas.delete_all(self.pool, volumes, key)
        await self._drop(key, pending)
        return ("the value was not stored" + (" and the one it replaced is gone" if previous else "")
                + "; the key can be written again once the index can")

    async def _drop(self, key: bytes, pending: bytes) -> str:
        """Drop the PENDING record of a key whose files are gone: "" when done, else why it
        could not be now; it is then dropped once the database takes writes again."""
        return await cas_or_later(self.store, key, pending, None)

    async def _restore(self, key: bytes, pending: bytes, previous: bytes | None, volumes: list[str]) -> None:
        """Nothing was committed on any volume: put the previous record back (or none)."""
        if previous is None:
            await replicas.delete_all(self.pool, volumes, key)
        await settle(self.store.cas(key, pending, previous))

    async def put_record(self, key: bytes, record: bytes, attrs: bytes | None = None,
                         deadline: float | None = None) -> None:
        """Make `record`, which names no file under `key` (a composite value), the key's
        record, with the encoded attributes `attrs`, after any write in flight; then drop what
        only the value it replaced used (a plain value's files with the key held again: a lock
        with no volumes whose previous record is `record`, which recovery puts back). Past
        `deadline` (loop time) nothing is changed."""
        pending, previous = await self.lock(key, [])
        try:
            if self.config.protect:
                self.protected(key, previous)
            if deadline is not None and asyncio.get_running_loop().time() > deadline:
                raise S3Error("ServiceUnavailable", "the index took too long to commit the object; nothing was "
                              "changed: send it again")
            if attrs and self.meta is not None:
                await settle(self.meta.put_attrs(key, record, attrs))
            done, _ = await settle(self.store.cas(key, pending, record))
        except S3Error:
            await settle(self.store.cas(key, pending, previous))
            raise
        except (StoreError, lmdb.Error) as e:
            await settle(self.store.cas(key, pending, previous))
            raise S3Error("ServiceUnavailable", f"{e}; nothing was changed") from None
        if not done:
            raise S3Error("InternalError", "lost the key's lock while writing (was the index recovered meanwhile?)")
        if previous is None:
            return
        if not (files := files_on(previous)):
            await self.replaced(key, previous, record, [])
            return
        await self._forget(key, previous, record)
        # A plain value's files are at the very paths the key's next write uses: deleted with
        # the key let go, they could be that write's, acknowledged meanwhile. So the key is held
        # again (readers get the object: the hold's previous record) while they are deleted;
        # if another write took it first, its files are there now and nothing is deleted.
        since = fence.epoch()
        held = encode_pending(OP_PUT, self.pid, now_ms(), [], record)
        try:
            holding, _ = await settle(self.store.cas(key, record, held))
        except StoreError:
            # its answer lost (PostgreSQL): the hold may be there, and must not stay; the
            # files are left to `minikv gc`, as orphans
            retry_when_writable(lambda: self.store.cas(key, held, record))
            return
        if not holding:
            return
        try:
            # a shared index's lease lost meanwhile (see delete): the hold may be undone and the
            # key written anew at these paths; the files are then left to `minikv gc`
            if not (fence.suspect(since) and await fence.refused(since, "the replaced files were kept")):
                await replicas.delete_all(self.pool, files, key)  # one left is an orphan for `minikv gc`
        finally:
            # recovery of a hold left by a crash does the same: it puts back the lock's previous record
            await cas_or_later(self.store, key, held, record)

    async def _write(self, key, source, length, volumes, taken: list, check=None) -> tuple[int, bytes, list[str], str]:
        if length == 0:
            # nothing to hold back in an empty PUT: check the whole (empty) body before sending it
            async for _ in source:
                raise S3Error("IncompleteBody", "the body is longer than the declared 0 bytes")
        limit = self.config.max_value_size
        if limit and length is not None and length > limit:
            raise S3Error("EntityTooLarge", f"value of {length} bytes is over the limit of {limit} (-max-value-size)")
        uploads = []
        md5 = StreamingMd5()
        loop = asyncio.get_running_loop()
        sent = loop.time()  # when the volumes last got bytes of this write (or their connection)
        try:
            opened = await asyncio.gather(
                *(self.pool.upload(host, path, length) for host, path in replicas.locate_all(volumes, key)), return_exceptions=True)
            uploads = [u for u in opened if not isinstance(u, BaseException)]
            for failure in opened:
                if isinstance(failure, BaseException):
                    raise failure
            size = 0
            held = b""
            async for chunk in source:
                if not chunk:
                    continue
                size += len(chunk)
                if limit and size > limit:
                    raise S3Error("EntityTooLarge", f"value is over the limit of {limit} bytes (-max-value-size)")
                if held:
                    for u in uploads:
                        u.write(held)
                    sent = loop.time()
                await md5.update(chunk)
                if held:
                    for u in uploads:
                        if u.paused:
                            await u.drain()
                held = chunk
            if length is not None and size != length:
                raise S3Error("IncompleteBody", f"got {size} bytes of the {length} declared")
            digest = await md5.digest()
            # the whole body is here and checked: only now queue for the key (a writer that held
            # the lock while its client sent the body could wait on a client that first waits
            # for another write of the key to finish: both would stall)
            since = fence.epoch()
            try:
                mtime = now_ms()  # the value's, chosen before its lock names it (recovery keeps it)
                taken += await self.lock(key, volumes, sent + UPLOAD_IDLE, (size, digest, mtime))
                taken.append(mtime)
            except StoreError as e:
                raise S3Error("ServiceUnavailable", f"{e}; nothing was changed: write again once the index "
                              "can") from None
            if self.config.protect:
                self.protected(key, taken[1])
            if check is not None:
                await check()
            if fence.suspect(since) and (why := await fence.refused(since)):  # a shared index's lease
                raise S3Error("ServiceUnavailable", f"{why}; nothing was changed")
            # a volume that closed an upload before its end was sent (it restarted, or gave up
            # waiting) has dropped it: nothing renames there, so commit nowhere. Sent anyway, the
            # end would fail on it in a way that cannot be told from a rename that failed
            dropped = [u.host for u in uploads if getattr(u, "conn", None) is not None and u.conn.closed]
            if dropped:
                raise S3Error("ServiceUnavailable", f"volume {dropped[0]} closed the upload before the value was "
                              "complete (did it restart?); nothing was changed: write again")
        except BaseException as e:
            for u in uploads:
                u.abort()  # nginx drops a partial upload: the old files stay as they were
            await md5.close()
            if isinstance(e, VolumeError):
                self.health.mark_down(e.host, str(e))
                raise S3Error("ServiceUnavailable", f"{e}; nothing was changed") from None
            raise
        pending, previous, _ = taken
        # the commit point: the last bytes make every volume rename its file into place
        if held:
            for u in uploads:
                u.write(held)
        results = await asyncio.gather(*(u.finish() for u in uploads), return_exceptions=True)
        state = {v: "new" if isinstance(r, int) and r in OK else "old" if isinstance(r, int) else "unknown"
                 for v, r in zip(volumes, results)}
        if all(s == "new" for s in state.values()):
            return size, digest, volumes, ""
        reasons = [str(r) if isinstance(r, BaseException) else f"volume {host_of(v)} answered {r} to PUT"
                   for v, r in zip(volumes, results) if state[v] != "new"]
        for v, r in zip(volumes, results):
            if isinstance(r, VolumeError):
                self.health.mark_down(host_of(v), str(r))
        for v in [v for v in volumes if state[v] == "unknown"]:
            state[v] = await self._settle(key, v, size, digest, previous)
        good = [v for v in volumes if state[v] == "new"]
        if not good:
            await self._keep_old(key, pending, previous, volumes, state, reasons)
        # some volumes hold the new value, others the old one or an unknown state: roll forward
        kept = list(good)
        for dst in [v for v in volumes if state[v] != "new"]:
            try:
                await self._copy(key, good, dst)
                kept.append(dst)
            except Exception as e:  # noqa: BLE001 - whatever failed, that volume is left out
                reasons.append(f"repair of {host_of(dst)} failed: {e}")
        if len(kept) < len(volumes):
            # never delete the key for this: the new value is whole where it is, and the record
            # names only those volumes (a REBALANCE or `minikv rebalance` copies it to the rest)
            kept = [v for v in volumes if v in kept]
            return size, digest, kept, ("; ".join(reasons) + f"; the new value is stored on {len(kept)} of "
                                        f"{len(volumes)} replicas only: write it again, or run minikv rebalance")
        return size, digest, volumes, ""

    async def _keep_old(self, key: bytes, pending: bytes, previous: bytes | None, volumes: list[str],
                        state: dict[str, str], reasons: list[str]) -> None:
        """No volume holds the new value: put the previous record back, naming only the volumes
        known to hold the old value (or, when none can be told, all it named: each file is a whole
        value either way), and raise. With no previous value, the key is gone as before."""
        if previous is None or all(s == "old" for s in state.values()):
            await self._restore(key, pending, previous, volumes)
            raise S3Error("ServiceUnavailable", "; ".join(reasons) + "; nothing was changed")
        old, files = decode_data(previous), files_on(previous)  # a composite's parts are not touched
        proven = [v for v in files if v not in volumes or state[v] == "old"]
        restored = previous if not proven or proven == files else \
            encode_data(LIVE, proven, old.size, old.mtime_ms, old.md5, 0)  # off its layout, as in put
        await settle(self.store.cas(key, pending, restored))
        raise S3Error("ServiceUnavailable", "; ".join(reasons) + "; the new value was not stored and the "
                      f"previous one is kept{'' if proven else ' (which value each volume holds could not be told)'}")

    async def _copy(self, key: bytes, sources: list[str], dst: str) -> None:
        """Copy the key's file to `dst` from the first of `sources` that can give it."""
        for i, src in enumerate(sources):
            try:
                await replicas.copy(self.pool, key, src, dst)
                return
            except VolumeError as e:
                if e.host == host_of(dst) or i == len(sources) - 1:
                    raise

    async def _settle(self, key: bytes, volume: str, size: int, digest: bytes, previous: bytes | None) -> str:
        """What a volume that gave no answer to the last step holds: "new", "old" (the previous
        value, or no file when there was none), else "unknown". Its file's size tells, and when
        the two values have the same size, its md5 (the file read back, streamed: a rare path)."""
        old = decode_data(previous) if previous is not None else None
        old_size, old_md5 = (old.size, old.md5) if volume in files_on(previous) else (None, None)
        try:
            found = await replicas.exists(self.pool, volume, key)
            if found == size and found == old_size:
                got = await replicas.md5_of(self.pool, volume, key)
                found_md5 = got[1] if got is not None else None
                if found_md5 == digest:
                    return "new"
                return "old" if found_md5 == old_md5 else "unknown"
        except VolumeError:
            return "unknown"
        if found == size:
            return "new"
        if found == old_size:
            return "old"
        return "unknown"

    # -- deletes --
    async def delete(self, key: bytes, protect: bool = False) -> bool:
        """Delete the key's value and record; False if there was none. With `protect`
        (-protect) a LIVE key is only unlinked, as the plain API would require first."""
        unlinking = None  # under -protect: the record this request tried to unlink
        while True:  # another request took the key between our read and our CAS: behind it, as a write
            raw = await self.unlocked(key)
            if raw is None:
                return False
            if unlinking is not None and raw == with_state(unlinking, UNLINKED):
                return True  # unlinked by another request meanwhile: what this one was to do
            if protect and raw[0] == LIVE:
                unlinking = raw
                done, _ = await settle(self.store.cas(key, raw, with_state(raw, UNLINKED)))
                if done:
                    return True
                continue
            volumes = files_on(raw)
            pending = encode_pending(OP_DELETE, self.pid, now_ms(), volumes, raw)
            since = fence.epoch()
            done, _ = await settle(self.store.cas(key, raw, pending))
            if done:
                break
        if fence.suspect(since) and (why := await fence.refused(since, "nothing was deleted")):
            # a shared index's lease (see App._delete_files): the lock may have been undone and
            # the key written anew at the paths these deletes would remove
            await cas_or_later(self.store, key, pending, raw)
            raise S3Error("ServiceUnavailable", why)
        if is_composite(raw):  # the manifest first: once it is gone a rebuild cannot bring the object back
            why = await composite.drop_manifest(self, raw)
            failed = [why] if why else []
        else:
            failed = await replicas.delete_all(self.pool, volumes, key)
        if failed:
            await settle(self.store.cas(key, pending, with_state(raw, UNLINKED)))
            raise S3Error("ServiceUnavailable", "; ".join(failed) + "; the key is now unlinked (unreadable): "
                          "delete it again later")
        if why := await self._drop(key, pending):
            raise S3Error("ServiceUnavailable", f"{why}; the object's files are deleted, and so will be its "
                          "record once the index can write again")
        await self._forget(key, raw, None)
        await composite.remove(self, raw)  # the parts; one left is an orphan for `minikv gc`
        return True


def _has_md5_of(conn, raw: bytes) -> bool:
    """Is the volume's answer a whole value, all of it received (a small one comes with its
    head), whose md5 is record `raw`'s? Then what is sent is what the headers say, whichever
    write put it there: a key rewritten without a pause is read without a retry."""
    md5 = raw[MD5_AT:MD5_AT + 16]
    body = conn.body
    return conn.status == 200 and body.done and md5 != NO_MD5 and hashlib.md5(b"".join(body._chunks)).digest() == md5


def _whole_size(conn) -> int | None:
    """The size of the whole file a volume's 200 or 206 answer is of (None: it does not say)."""
    if conn.status == 206:
        total = conn.headers.get(b"content-range", b"").rpartition(b"/")[2]
    else:
        total = conn.headers.get(b"content-length", b"")
    return int(total) if total.isdigit() and len(total) <= 18 else None
