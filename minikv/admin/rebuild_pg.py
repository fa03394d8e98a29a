"""Rebuild into PostgreSQL in bulk: a batch of records goes in as one COPY and three statements,
not one statement (or one parameter array) per key.

In one transaction: the batch is copied (COPY, binary) into a temporary table, then inserted
into the index where its keys are absent (`ON CONFLICT DO NOTHING`: a key a server wrote or
locked meanwhile keeps its record). The keys that were there already with another record are
then read back, row-locked, merged in Python by the rebuild's merge() exactly as on LMDB, and
updated in one statement. On a fresh index the last step finds nothing: the work per key is the
database's own COPY and insert.

Faster still while no key of the batches is in the index yet (a fresh index, the usual case):
the batch is COPYed straight into the index, no temporary table and no second copy of the rows.
A key already there makes that COPY fail as a whole (its unique index), nothing of it stays,
and that batch and every later one of the process take the way above.
"""

from __future__ import annotations

from minikv.index.pg_sync import SET_RECORDS

TEMP = "minikv_rebuild_batch"


def add_many(store, items: list[tuple[bytes, bytes]], merge) -> int:
    """Store.add_many for a SyncPgStore (index/pg_sync.py); the number of keys added."""
    # in key order, as a server's group of compare-and-sets takes its keys: a writer taking the
    # same keys in another order (the walk's) waits for it while it waits: a deadlock, which
    # PostgreSQL ends by failing one of them (the rebuild died)
    return store._call(_add_many(store, sorted(items), merge))


async def _copy(store, items: list[tuple[bytes, bytes]]) -> bool:
    import asyncpg  # here: an LMDB rebuild's processes need not load it

    pool = await store.store._get_pool()
    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.copy_records_to_table("minikv_keys", records=items, columns=("k", "rec"))
        return True
    except asyncpg.UniqueViolationError:
        store.copy_straight = False  # a key is there already: merges from now on
        return False


async def _add_many(store, items: list[tuple[bytes, bytes]], merge) -> int:
    if store.copy_straight and await _copy(store, items):
        return len(items)
    pool = await store.store._get_pool()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(f"CREATE TEMP TABLE {TEMP} (k bytea, rec bytea) ON COMMIT DROP")
        await conn.copy_records_to_table(TEMP, records=items, columns=("k", "rec"))
        status = await conn.execute(f"INSERT INTO minikv_keys (k, rec) SELECT k, rec FROM {TEMP} "
                                    "ON CONFLICT (k) DO NOTHING")
        added = int(status.rsplit(" ", 1)[1])  # "INSERT 0 <n>"
        if added == len(items):
            return added
        # the keys already there: the ones just added hold exactly the batch's record. Locked in
        # key order whatever the join's plan (the rows are locked as the sort hands them out)
        rows = await conn.fetch(f"SELECT m.k, m.rec, b.rec FROM minikv_keys m JOIN {TEMP} b ON m.k = b.k "
                                "WHERE m.rec <> b.rec ORDER BY m.k FOR UPDATE OF m")
        changed = [(k, new) for k, current, value in rows if (new := merge(k, current, value)) is not None]
        if changed:
            await conn.execute(SET_RECORDS, [k for k, _ in changed], [r for _, r in changed])
        return added
