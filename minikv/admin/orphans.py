"""Orphan files: copies on the volumes that no record names (verify reports them, repair and gc
delete them with -delete-orphans).

They are what a crash or a volume that was down leaves behind: a delete that could not reach a
volume, a move killed between its switch and its clean-up, the copies of another size a rebuild
left out. Found by walking the volumes (admin/walk.py) and asking the index about each file.

Deleting one is done under the key's lock, like every other change: the record goes to PENDING
naming the orphan copies (PENDING(delete) with nothing before it for a key with no record,
PENDING(rebalance) keeping the record otherwise), the files are deleted, and the record is put
back. A PUT of the same key meanwhile gets 409 instead of having its new copy deleted, and a
crash in between is resolved by recovery, whose rules for those two records delete exactly the
orphans. The orphans of a LIVE key none of whose named copies answers with its size are kept:
they may be the value's last copies.
"""

from __future__ import annotations

import asyncio
import os

from minikv import replicas
from minikv.admin.common import show
from minikv.admin.move import named
from minikv.admin.progress import Progress
from minikv.admin.walk import Found
from minikv.http.client import Pool, VolumeError
from minikv.index.record import (
    LIVE,
    OP_DELETE,
    OP_REBALANCE,
    PENDING,
    decode_data,
    encode_pending,
    is_composite,
    now_ms,
)
from minikv.index.store import MAX_KEY, Store
from minikv.placement import host_of


class Orphans:
    """A walk handler: counts (and with `delete`, deletes) the orphan files of each batch. Only
    files older than `min_age_ms` (by their mtime on the volume) are touched."""

    def __init__(self, store: Store, pool: Pool, progress: Progress, delete: bool, min_age_ms: int = 0):
        self.store = store
        self.pool = pool
        self.progress = progress
        self.delete = delete
        self.cutoff = now_ms() - min_age_ms

    async def handle(self, group: dict[bytes, list[Found]]) -> None:
        for key, found in group.items():
            names = named(self.store.get(key))
            extra = [f.volume for f in found if f.volume not in names and f.mtime_ms <= self.cutoff]
            if extra:
                extra = await self.confirm(key, extra)
            if not extra:
                continue
            if self.delete and len(key) > MAX_KEY:
                # a key of the Go original (no limit) that no index of ours can hold: rebuild
                # left it out and keeps its files, the only place its value is
                self.progress.add("orphans", len(extra))
                self.progress.problem(f"{show(key)[:80]}...: {len(key)} bytes, longer than the index holds "
                                      f"({MAX_KEY}): its files are no record's, but not deleted")
                continue
            if self.delete:
                await self.drop(key, extra)
            else:
                self.progress.add("orphans", len(extra))
                for volume in extra:
                    self.progress.problem(f"{show(key)}: {volume}: orphan (no record names this copy)")

    async def confirm(self, key: bytes, volumes: list[str]) -> list[str]:
        """The copies that are still there and still unnamed (the listing is a moment old: a
        move may have finished and cleaned up since)."""
        still = []
        for volume in volumes:
            try:
                if await replicas.exists(self.pool, volume, key) is not None:
                    still.append(volume)
            except VolumeError as e:
                self.progress.problem(f"{show(key)}: {volume}: cannot check a possible orphan: {e}")
        names = named(self.store.get(key))
        return [v for v in still if v not in names]

    async def named_copy(self, key: bytes, raw: bytes) -> bool:
        """Does a copy the LIVE record names answer, with the record's size? When none does, the
        orphans may be all that is left of the value (a move killed before its switch, then the
        old volume lost or left out of -volumes): they are not deleted."""
        record = decode_data(raw)
        for volume in record.volumes:
            try:
                if await replicas.exists(self.pool, volume, key) == record.size:
                    return True
            except VolumeError:
                continue
        return False

    async def linked(self, key: bytes, volumes: list[str], names: set[str]) -> list[str]:
        """The orphan copies that may be a named copy's own file seen through a linked folder (a
        subvolume linked to another, as nginx and the walks follow links): those on a server that
        also holds a named copy with the same nginx ETag (mtime and size), or whose ETag cannot be
        read. Deleting one would delete the copy its record names."""
        out = []
        for volume in volumes:
            beside = [n for n in names if host_of(n) == host_of(volume)]
            if beside:
                tags = await asyncio.gather(*(self._etag(key, v) for v in [volume, *beside]))
                if tags[0] is None or tags[0] in tags[1:]:
                    out.append(volume)
        return out

    async def _etag(self, key: bytes, volume: str) -> bytes | None:
        host, path = replicas.locate(volume, key)
        try:
            resp = await self.pool.request(host, "HEAD", path)
        except VolumeError:
            return None
        return resp.headers.get(b"etag") if resp.status == 200 else None

    async def drop(self, key: bytes, volumes: list[str]) -> None:
        p = self.progress
        raw = self.store.get(key)
        volumes = [v for v in volumes if v not in named(raw)]
        if not volumes:
            return
        if raw is not None and raw[0] == PENDING:
            p.add("busy")
            return
        if raw is not None and raw[0] == LIVE and not is_composite(raw) and not await self.named_copy(key, raw):
            p.add("orphans", len(volumes))
            p.add("failed")
            p.problem(f"{show(key)}: orphans on {', '.join(volumes)} not deleted: no copy its record names answers "
                      "with the record's size, so they may be the last ones (see `minikv verify`)")
            return
        if raw is not None and (linked := await self.linked(key, volumes, named(raw))):
            p.add("orphans", len(linked))
            p.add("failed")
            p.problem(f"{show(key)}: orphans on {', '.join(linked)} not deleted: each is the same file as a copy "
                      "its record names on that server (a folder linked to another?), or could not be told apart")
            volumes = [v for v in volumes if v not in linked]
            if not volumes:
                return
        op = OP_DELETE if raw is None else OP_REBALANCE
        pending = encode_pending(op, os.getpid(), now_ms(), volumes, raw or b"")
        done, _ = self.store.cas(key, raw, pending)
        if not done:
            p.add("busy")  # changed meanwhile: the next run looks again
            return
        try:
            failed = await replicas.delete_all(self.pool, volumes, key)
        finally:
            self.store.cas(key, pending, raw)
        p.add("orphans", len(volumes))
        p.add("orphans deleted", len(volumes) - len(failed))
        for reason in failed:
            p.add("failed")
            p.problem(f"{show(key)}: orphan not deleted: {reason}")
