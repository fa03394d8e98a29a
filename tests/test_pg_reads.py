"""The read path on a PostgreSQL index: lookups made at about the same time by one worker's
requests go to the database as one query (index/pg_batch.py), and each request still gets its
own records, or the database's failure. A real PostgreSQL (tests/pg.py), a real PgStore."""

from __future__ import annotations

import asyncio
import uuid

from cluster import HOST, free_port

from minikv.index.pg import PgStore
from minikv.index.pg_batch import MAX_BATCH, Lookups
from minikv.index.record import LIVE, encode_data
from minikv.index.store import StoreError


class Counted(PgStore):
    """The real store, counting the queries its lookups send."""

    queries = 0

    async def get_many(self, keys):
        self.queries += 1
        return await super().get_many(keys)


def test_concurrent_lookups_share_one_query_and_each_gets_its_own(postgres):
    db = postgres.create_db("t" + uuid.uuid4().hex[:12])

    async def run():
        store = Counted(db, "test:1")
        try:
            from minikv.index.pg import connect, create_schema

            present = [f"/r/{i}".encode() for i in range(0, 300, 2)]
            conn = await connect(db)
            await create_schema(conn)
            # records as rebuild writes them (a LIVE record is never made from nothing by the API)
            await conn.executemany("INSERT INTO minikv_keys (k, rec) VALUES ($1, $2)",
                                   [(k, encode_data(LIVE, ["v:1"], 1, 0, b"")) for k in present])
            await conn.close()
            lookups = Lookups(store)
            asks = [[f"/r/{i}".encode()] for i in range(300)] + [[b"/r/1", b"/r/2", b"/r/4"]]
            store.queries = 0
            found = await asyncio.gather(*(lookups.get_many(keys) for keys in asks))
            return present, asks, found, store.queries
        finally:
            await store.close()

    present, asks, found, queries = asyncio.run(run())
    for keys, got in zip(asks, found):
        assert sorted(got) == sorted(k for k in keys if k in present), keys
    assert all(raw[0] == LIVE for got in found for raw in got.values())
    # 301 asks in one pass of the loop: a query per MAX_BATCH keys, not one per ask
    assert queries <= -(-303 // MAX_BATCH) + 1, queries


def test_a_lookup_alone_waits_for_nothing_but_one_turn_of_the_loop(postgres):
    db = postgres.create_db("t" + uuid.uuid4().hex[:12])

    async def run():
        from minikv.index.pg import connect, create_schema

        conn = await connect(db)
        await create_schema(conn)
        await conn.close()
        store = Counted(db, "test:1")
        try:
            lookups = Lookups(store)
            got = [await lookups.get_many([f"/alone/{i}".encode()]) for i in range(5)]
            return got, store.queries
        finally:
            await store.close()

    got, queries = asyncio.run(run())
    assert got == [{}] * 5 and queries == 5


def test_every_asker_gets_the_failure_of_a_database_that_is_down():
    db = f"postgresql://nobody@{HOST}:{free_port()}/none"  # nothing listens there

    async def run():
        store = PgStore(db, "test:1")
        try:
            lookups = Lookups(store)
            return await asyncio.gather(*(lookups.get_many([f"/k{i}".encode()]) for i in range(10)),
                                        return_exceptions=True)
        finally:
            await store.close()

    results = asyncio.run(run())
    assert len(results) == 10 and all(isinstance(r, StoreError) for r in results), results
    assert all("unavailable" in str(r) for r in results)

