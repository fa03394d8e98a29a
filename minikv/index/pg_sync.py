"""The PostgreSQL index behind the synchronous Store interface, for the admin commands (verify,
repair, rebalance, gc): their code calls the index between awaits as it calls LMDB, and here each
call waits for its statement on an event loop of its own, in a helper thread. A call blocks the
command's loop for one round trip; the volumes' requests stay concurrent.

A command that changes keys locks them as a server does, so it is an owner as a server is: it
holds a lease of its own (`<command>@<host>:<pid>`), renewed from the helper thread; if it dies,
a server takes its locks over. Its start resolves the locks of owners whose lease expired
(index/lease.take_over), as the LMDB commands resolve those of dead processes.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import threading

from minikv.index import lease
from minikv.index.pg import PgStore, connect, create_schema

# the admin commands' batch update of records they hold locked (FOR UPDATE). `k = ANY($1)` finds
# the rows by the primary key whatever the table's size when the kept plan was made (as
# pg_write.GROUP_CAS): a plan of a new index's empty table joined to a sequential scan
SET_RECORDS = ("UPDATE minikv_keys SET rec = u.rec FROM unnest($1::bytea[], $2::bytea[]) AS u(k, rec) "
               "WHERE minikv_keys.k = ANY($1::bytea[]) AND minikv_keys.k = u.k")


class SyncPgStore:
    def __init__(self, db: str, command: str):
        self.db = db
        self.owner = f"{command}@{socket.gethostname()}:{os.getpid()}"
        self.store = PgStore(db, self.owner, pool_size=2)
        self.path = self.store.path
        self.token = secrets.token_hex(8)
        self.copy_straight = True  # rebuild: batches COPYed into the index until a key is there (rebuild_pg.py)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="minikv-pg", daemon=True)
        self._thread.start()
        self._renewing = None
        try:
            self._call(self._start())
        except BaseException:
            self._stop_loop()
            raise

    async def _start(self) -> None:
        conn = await connect(self.db)
        try:
            await create_schema(conn)
        finally:
            await conn.close()
        await lease.renew(self.store, self.token)  # claims the row: the id is new
        self._renewing = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(lease.RENEW_EVERY)
            try:
                await lease.renew(self.store, self.token)
            except Exception:  # noqa: BLE001 - down a moment: the next renewal may get through
                pass

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def get(self, key: bytes) -> bytes | None:
        return self._call(self.store.get(key))

    def cas(self, key: bytes, expect: bytes | None, new: bytes | None) -> tuple[bool, bytes | None]:
        return self._call(self.store.cas(key, expect, new))

    def scan(self, prefix: bytes, start: bytes = b"", limit: int = 0, keep=None, budget: int = 0):
        return self._call(self.store.scan(prefix, start, limit, keep, budget))

    def count(self) -> int:
        return self._call(self.store.count())

    def merge_many(self, items: list[tuple[bytes, bytes]], merge) -> None:
        """For rebuild, as Store.merge_many: a batch in one transaction of three statements (its
        records read and row-locked, the new keys inserted, the changed ones updated); a key a
        server locked meanwhile keeps its lock (the insert skips it)."""
        self._call(self._merge_many(items, merge))

    async def _merge_many(self, items, merge) -> None:
        pool = await self.store._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch("SELECT k, rec FROM minikv_keys WHERE k = ANY($1::bytea[]) ORDER BY k FOR UPDATE",
                                    list({k for k, _ in items}))
            had = {r[0]: r[1] for r in rows}
            now = dict(had)
            changed: dict[bytes, bytes] = {}
            for key, value in items:
                new = merge(key, now.get(key), value)
                if new is not None:
                    now[key] = changed[key] = new
            added = [k for k in changed if k not in had]
            if added:
                await conn.execute("INSERT INTO minikv_keys (k, rec) SELECT * FROM unnest($1::bytea[], $2::bytea[]) "
                                   "ON CONFLICT (k) DO NOTHING", added, [changed[k] for k in added])
            kept = [k for k in changed if k in had]
            if kept:
                await conn.execute(SET_RECORDS, kept, [changed[k] for k in kept])

    def pending_records(self) -> list[tuple[bytes, bytes]]:
        """The PENDING records of owners that hold no live lease (what a takeover would resolve)."""
        rows = self._call(self.store._run(
            "fetch", "SELECT k, rec FROM minikv_keys WHERE owner IS NOT NULL AND split_part(owner, '#', 1) "
            "NOT IN (SELECT id FROM minikv_leases WHERE expires >= now())"))
        return [(r[0], r[1]) for r in rows]

    async def take_over(self, pool) -> int:
        """On the caller's loop (its volume pool lives there): resolve the locks of owners whose
        lease expired."""
        store = PgStore(self.db, self.owner, pool_size=1)
        try:
            return await lease.take_over(store, pool)
        finally:
            await store.close()

    def reader_check(self) -> int:
        return 0

    def close(self) -> None:
        try:
            if self._renewing is not None:
                self._loop.call_soon_threadsafe(self._renewing.cancel)
            self._call(self._release())
        finally:
            self._stop_loop()

    async def _release(self) -> None:
        try:
            await self.store._run("execute", "DELETE FROM minikv_leases WHERE id = $1 AND "
                                  "(token = $2 OR token LIKE $2 || '#%')", self.owner, self.token)
        finally:
            await self.store.close()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
