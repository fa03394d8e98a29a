"""`minikv copy-index FROM TO`: move an index between engines (an LMDB folder, a postgresql://
URL), record for record, into an empty index.

Records are copied as their bytes, so unlink marks, md5s, sizes, epochs and in-flight locks all
survive; so does S3's own data (uploads in progress, object attributes, buckets) between LMDB
and PostgreSQL. Locks (PENDING records) stay locks and are resolved as a crash's are: copied into
PostgreSQL they belong to an owner that holds no lease (`copied`), which the first server
running on it takes over (index/lease.py); copied into LMDB they keep their writer's pid, gone by
then, and the server's start resolves them (index/recovery.py).

No server may run on either index meanwhile: an LMDB side is locked as a server locks it; for a
PostgreSQL side, stop its servers first (the target must be empty, which a running server's
index rarely is). Reads and writes go PAGE records at a time: one LMDB transaction, one COPY.
"""

from __future__ import annotations

import asyncio
import os
import sys

from minikv.index.pg import PgStore, connect, create_schema, describe, is_url, start_error
from minikv.index.record import PENDING
from minikv.index.store import Store, StoreError, top_of

PAGE = 10_000
COPIED_OWNER = "copied"  # owner of PENDING records copied in: no server has it, so one takes them over


def say(msg: str) -> None:
    print(f"minikv copy-index: {msg}", file=sys.stderr, flush=True)


async def _pg_open(db: str, writing: bool) -> PgStore:
    conn = await connect(db)
    try:
        if writing:
            await create_schema(conn)
            if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM minikv_keys)"):
                raise SystemExit(f"minikv copy-index: {describe(db)} already holds keys: copy into an empty index")
    finally:
        await conn.close()
    return PgStore(db, COPIED_OWNER, pool_size=2)


def _lmdb_open(path: str, writing: bool) -> Store:
    from minikv.server import lock_db

    if not writing and not os.path.exists(os.path.join(path, "data.mdb")):
        raise SystemExit(f"minikv copy-index: no index at {path}")
    lock_db(path)  # held until we exit: no server runs on it meanwhile
    store = Store(path)
    if writing and store.count():
        raise SystemExit(f"minikv copy-index: {path} already holds keys: copy into an empty index")
    return store


async def _pages(source):
    pos = b""
    while True:
        if isinstance(source, Store):
            pairs, pos = source.scan(b"", pos, budget=PAGE)
        else:
            pairs, pos = await source.scan(b"", pos, budget=PAGE)
        if pairs:
            yield pairs
        if not pos:
            return


async def _write(target, pairs: list[tuple[bytes, bytes]]) -> None:
    if isinstance(target, Store):
        with target.env.begin(write=True) as txn:
            for key, raw in pairs:
                txn.put(key, raw, db=target.keys)
                if raw[0] == PENDING:
                    txn.put(key, b"", db=target.pending)
                if target.tops is not None and (top := top_of(key)) is not None:
                    txn.put(top, b"", db=target.tops)
        return
    rows = [(key, raw, COPIED_OWNER if raw[0] == PENDING else None) for key, raw in pairs]
    pool = await target._get_pool()
    async with pool.acquire() as conn:
        await conn.copy_records_to_table("minikv_keys", records=rows, columns=["k", "rec", "owner"])


async def copy(src: str, dst: str) -> int:
    source = await _pg_open(src, False) if is_url(src) else _lmdb_open(src, False)
    target = await _pg_open(dst, True) if is_url(dst) else _lmdb_open(dst, True)
    n = 0
    try:
        async for pairs in _pages(source):
            await _write(target, pairs)
            n += len(pairs)
        if (s3 := await _copy_s3(src, dst, source, target)) is not None:
            say(f"copied {s3} S3 entr{'y' if s3 == 1 else 'ies'} (uploads in progress, object attributes, buckets)")
    finally:
        for store in (source, target):
            if isinstance(store, Store):
                store.close()
            else:
                await store.close()
    return n


async def _copy_s3(src: str, dst: str, source, target) -> int | None:
    """S3's own data (s3/meta.py: an LMDB beside the index; s3/meta_pg.py: tables in the
    database) moves with the records, or objects would lose their headers and multipart ETags,
    and uploads in progress would be lost. None: nothing to copy."""
    from minikv.s3 import meta_pg
    from minikv.s3.meta import Meta

    if is_url(src) and not is_url(dst):
        meta = Meta(os.path.join(dst, "s3"))
        try:
            return await meta_pg.copy_to_lmdb(meta_pg.PgMeta(source), meta)
        finally:
            meta.close()
    if not is_url(src) and is_url(dst) and os.path.exists(os.path.join(src, "s3", "data.mdb")):
        meta = Meta(os.path.join(src, "s3"))
        try:
            return await meta_pg.copy_from_lmdb(meta, meta_pg.PgMeta(target))
        finally:
            meta.close()
    return None


def main(args) -> int:
    if len(args.positionals) != 2:
        say("usage: minikv copy-index FROM TO (each an LMDB folder or a postgresql:// URL)")
        return 2
    src, dst = args.positionals
    if src == dst:
        say("FROM and TO are the same index")
        return 2
    try:
        n = asyncio.run(copy(src, dst))
    except SystemExit:
        raise
    except StoreError as e:
        say(str(e))
        return 1
    except Exception as e:  # noqa: BLE001 - a database that cannot be used: one line
        db = dst if is_url(dst) else src
        say(start_error(db, e) if is_url(db) else f"{type(e).__name__}: {e}")
        return 1
    say(f"copied {n} record(s) from {describe(src)} to {describe(dst)}")
    return 0
