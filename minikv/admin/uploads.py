"""gc's part for S3: abandoned multipart uploads and parts whose upload is gone.

S3 keeps the parts of an upload nobody completes or aborts until a lifecycle rule
(AbortIncompleteMultipartUpload) removes them; here `minikv gc` is that rule, with one age for
every bucket: uploads started more than -uploads-older-than ago (7 days by default, as the
rule people usually set) are aborted as AbortMultipartUpload would (s3/multipart.py: every
part deleted like any S3 value, then the upload; an upload whose parts cannot all be deleted
now stays, for the next run). Then parts whose upload no longer exists (a crash between the two
steps of an abort) are deleted, but not those of a completed upload: its manifest says an object
is made of them.

Like the rest of gc this runs beside a live server: on LMDB it opens the S3 meta store
(`<db>/s3`) as the server does (LMDB takes many processes); on PostgreSQL it uses the same
tables through the command's own connection. An index that never served S3 has nothing here.
"""

from __future__ import annotations

import inspect
import os

from minikv.admin.common import PAGE, show
from minikv.admin.progress import Progress
from minikv.health import Health
from minikv.index.store import StoreError
from minikv.s3.errors import S3Error
from minikv.s3.multipart import PART_PREFIX, abort_upload, stale_uploads
from minikv.s3.values import Values


class _SyncMeta:
    """PgMeta's coroutines run on the synchronous PostgreSQL store's loop (index/pg_sync.py),
    answered as plain values: the S3 code takes either (index/engine.settle)."""

    def __init__(self, store):
        from minikv.s3.meta_pg import PgMeta

        self._store = store
        self._meta = PgMeta(store.store)

    def __getattr__(self, name: str):
        method = getattr(self._meta, name)

        def call(*args):
            answer = method(*args)
            return self._store._call(answer) if inspect.iscoroutine(answer) else answer

        return call


def open_meta(config, store):
    """The S3 meta store of the index, or None when it has never served S3 (LMDB)."""
    if hasattr(store, "_call"):  # PostgreSQL (SyncPgStore)
        return _SyncMeta(store)
    path = os.path.join(config.db, "s3")
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return None
    from minikv.s3.meta import Meta

    return Meta(path, sync=config.fsync)


class _Front:
    """What abort_upload needs of the S3 front: the index, the meta store and the values."""

    def __init__(self, config, store, pool, meta):
        self.store = store
        self.meta = meta
        self.values = Values(config, store, pool, Health(pool, config.volumes))
        self.values.meta = meta


async def clean_uploads(config, store, pool, age: float, dry_run: bool, progress: Progress) -> None:
    """Abort the uploads older than `age` seconds, then delete the orphan parts."""
    meta = open_meta(config, store)
    if meta is None:
        return
    try:
        s3 = _Front(config, store, pool, meta)
        for upload_id, key, _created in stale_uploads(meta, age):
            if dry_run:
                progress.add("uploads aborted")
                continue
            try:
                progress.add("parts deleted", await abort_upload(s3, upload_id))
            except (S3Error, StoreError) as e:
                progress.add("failed")
                progress.problem(f"upload {upload_id} of {show(key)}: not aborted: {e}")
                continue
            progress.add("uploads aborted")
        await _orphan_parts(s3, dry_run, progress)
    finally:
        meta.close()


async def _orphan_parts(s3: _Front, dry_run: bool, progress: Progress) -> None:
    """Delete the parts whose upload is gone and that no completed object is made of (its upload
    has no manifest), a page of part records at a time."""
    start = b""
    known: dict[str, bool] = {}  # upload id -> exists, for the parts of one upload in a row
    while True:
        pairs, start = s3.store.scan(PART_PREFIX, start, PAGE)
        for key, _ in pairs:
            upload_id = key[len(PART_PREFIX):len(PART_PREFIX) + 32].decode("latin-1")
            if upload_id not in known:
                # in progress, or completed: its manifest (number 0, the first of its keys) says an
                # object is made of its parts (s3/composite.py), which Complete left in place
                known = {upload_id: s3.meta.upload(upload_id) is not None
                         or s3.store.get(key[:-5] + b"00000") is not None}
            if known[upload_id]:
                continue
            if dry_run:
                progress.add("orphan parts")
                continue
            try:
                deleted = await s3.values.delete(key)
            except (S3Error, StoreError) as e:
                progress.add("failed")
                progress.problem(f"orphan part {show(key)}: not deleted: {e}")
                continue
            progress.add("orphan parts", deleted)
        if not start:
            return
