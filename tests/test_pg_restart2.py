"""The PostgreSQL index through a database restart, killed backends and a row another
transaction holds: what can safely be retried is retried (reads; writes whose statement was
not applied, which the record read afterwards tells), so a restart of a second or two costs no
request an error, and one held row fails (or holds up) only the write of its own key."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from cluster import HOST, Cluster, open_dir
from test_pg import wait_until
from test_pg_thrash import db  # noqa: F401 - the fixture: a new database with the schema

from minikv.index.lease import LEASE
from minikv.index.pg import LOCK_WAIT, QUERY_TIMEOUT, WAIT


@pytest.fixture
def served(postgres):
    """One index server (one worker) on a new database of its own instance (a test restarts
    it), in front of one volume."""
    from pg import Postgres

    pg = Postgres().init().start()
    c = Cluster(open_dir(), volumes=1, replicas=1, workers=1, db=pg.create_db("t1"))
    try:
        yield c.start(), pg
    finally:
        c.stop()
        pg.remove()


class Load:
    """Threads looping PUT, GET, ?list and (every other key) DELETE of keys of their own; every
    answer that is not the one the key's state calls for is kept in `odd`."""

    def __init__(self, port: int, threads: int = 6):
        self.base = f"http://{HOST}:{port}"
        self.kept: dict[str, bytes] = {}
        self.deleted: list[str] = []
        self.odd: list[tuple] = []
        self.loops = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.loop, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)

    def check(self, key: str, what: str, r: requests.Response, want: int) -> bool:
        if r.status_code != want:
            self.odd.append((key, what, r.status_code, r.text[:200]))
        return r.status_code == want

    def loop(self, i: int) -> None:
        with requests.Session() as s:
            for n in range(5000):  # bounded: stopped well before
                if self.stop.is_set():
                    return
                key, value = f"/r/{i}/{n}", os.urandom(100)
                try:
                    if not self.check(key, "PUT", s.put(self.base + key, data=value, timeout=60), 201):
                        continue
                    self.check(key, "GET", s.get(self.base + key, allow_redirects=False, timeout=60), 302)
                    self.check(key, "LIST", s.get(f"{self.base}/r/{i}/?list&limit=5", timeout=60), 200)
                    if n % 2:
                        self.kept[key] = value
                    elif self.check(key, "DELETE", s.delete(self.base + key, timeout=60), 204):
                        self.deleted.append(key)
                except requests.RequestException as e:
                    self.odd.append((key, "error", str(e)))
                self.loops += 1

    def goes_on(self, loops: int = 30) -> None:
        """Until the threads made `loops` more loops."""
        start = self.loops
        wait_until(lambda: self.loops >= start + loops or self.stop.is_set(), 60, "the load going on")


def all_kept(c: Cluster, load: Load, pg) -> None:
    """Every acknowledged value not deleted reads back, every acknowledged DELETE is gone, and
    no record stays PENDING."""
    for key, value in load.kept.items():
        assert c.get(key).content == value, key
    for key in load.deleted:
        assert c.get(key, allow_redirects=False).status_code == 404, key
    wait_until(lambda: pg.psql("t1", "SELECT count(*) FROM minikv_keys WHERE owner IS NOT NULL").split() == ["0"],
               LEASE + 10, "no record PENDING")


def test_a_quick_database_restart_costs_no_request_an_error(served):
    c, pg = served
    with Load(c.port) as load:
        load.goes_on()
        took = time.monotonic()
        pg.stop()
        pg.start()
        took = time.monotonic() - took
        load.goes_on()
    assert load.kept and load.deleted
    if took < WAIT - 3:  # else the database was down too long for its requests to wait for it
        assert not load.odd, (took, len(load.odd), load.odd[:5])
    all_kept(c, load, pg)


def test_killed_backends_cost_no_request_an_error(served):
    """pg_terminate_backend of every connection of the index (an operator, a failover tool), three
    times under load: each dead connection is found dead only when used."""
    c, pg = served
    kill = ("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = 't1' "
            "AND pid <> pg_backend_pid()")
    with Load(c.port) as load:
        for _ in range(3):
            load.goes_on()
            assert int(pg.psql("t1", kill)) > 0
        load.goes_on()
    assert not load.odd, (len(load.odd), load.odd[:5])
    all_kept(c, load, pg)


def test_a_row_held_by_another_transaction_fails_only_its_own_key(served):
    """Two keys' rows held by another transaction (an admin's, another server's stalled one): a
    DELETE of the first waits; a DELETE of the second and PUTs of other keys, made meanwhile,
    go to the database as one group. The held row must fail only its own key's write: the old
    group waited for it until its timeout and failed every write of the group."""
    import asyncpg

    c, pg = served
    for key in ("/held/a", "/held/z"):
        assert c.put(key, b"v").status_code == 201

    async def body() -> tuple[list[int], int, float]:
        holder = await asyncpg.connect(c.db)
        watch = await asyncpg.connect(c.db)
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(8)
        waiting = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                   "AND datname = current_database()")
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.execute("SELECT 1 FROM minikv_keys WHERE k = ANY($1::bytea[]) FOR UPDATE",
                                 [b"/held/a", b"/held/z"])
            first = loop.run_in_executor(pool, lambda: requests.delete(c.url("/held/z"), timeout=60).status_code)
            for _ in range(200):  # until its statement waits for the row
                if await watch.fetchval(waiting):
                    break
                await asyncio.sleep(0.05)
            start = time.monotonic()
            held = loop.run_in_executor(pool, lambda: requests.delete(c.url("/held/a"), timeout=60).status_code)
            others = [loop.run_in_executor(pool, lambda k=k: requests.put(c.url(k), data=b"w", timeout=60).status_code)
                      for k in ("/free/1", "/free/2", "/free/3")]
            codes = list(await asyncio.gather(*others))
            took = time.monotonic() - start
            held_code = await held  # the row is still held: it waits for it, then fails alone
            await tx.rollback()
            await first
            return codes, held_code, took
        finally:
            pool.shutdown(wait=False)
            await holder.close()
            await watch.close()

    codes, held_code, took = asyncio.run(body())
    assert codes == [201, 201, 201], (codes, took)
    assert took < LOCK_WAIT * QUERY_TIMEOUT  # not held up until the held row's own write gives up
    assert held_code == 503
    assert c.get("/held/a", allow_redirects=False).status_code == 302  # not deleted, not locked
    assert c.delete("/held/a").status_code == 204
    wait_until(lambda: pg.psql("t1", "SELECT count(*) FROM minikv_keys WHERE owner IS NOT NULL").split() == ["0"],
               LEASE + 10, "no record PENDING")


@pytest.mark.parametrize("meanwhile, want", [
    ("nothing", (True, "new")),  # its statement was not applied: sent again
    ("applied", (True, "new")),  # applied, the answer lost: not sent again
    ("another", "unknown"),  # another change came between: whether ours was made cannot be told
])
def test_a_compare_and_set_whose_connection_broke_is_settled_from_the_record(db, meanwhile, want,  # noqa: F811
                                                                             monkeypatch):
    from minikv.index.pg import IndexUnavailable, PgStore, _down
    from minikv.index.pg_write import Writes
    from minikv.index.record import LIVE, OP_PUT, encode_data, encode_pending

    pending = encode_pending(OP_PUT, 1, 1, ["v:1"])
    live, other = encode_data(LIVE, ["v:1"], 1, 1, b""), encode_data(LIVE, ["v:2"], 2, 2, b"")
    sent = []
    real = Writes.cas

    async def body():
        store = PgStore(db, "a:1")
        try:
            assert await store.cas(b"/k", None, pending) == (True, pending)

            async def breaks_once(self, *change):
                sent.append(change)
                if len(sent) > 1:
                    return await real(self, *change)
                if meanwhile != "nothing":  # another connection: as if through this one, or another server
                    await store._run("execute", "UPDATE minikv_keys SET rec = $2 WHERE k = $1", b"/k",
                                     live if meanwhile == "applied" else other)
                raise _down(ConnectionResetError("cut"), maybe_done=True)

            monkeypatch.setattr(Writes, "cas", breaks_once)
            try:
                return await store.cas(b"/k", pending, live)
            except IndexUnavailable as e:
                assert e.maybe_done and "cut" in str(e)
                return "unknown"
        finally:
            await store.close()

    got = asyncio.run(body())
    assert got == (want if want == "unknown" else (True, live))
    assert len(sent) == (2 if meanwhile == "nothing" else 1)
