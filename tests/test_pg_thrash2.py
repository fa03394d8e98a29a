"""The PostgreSQL index under writes, part two: the connections of a process (index/pg_conns.py)
in place of asyncpg's pool, and whole servers on one database under a PUT, GET, DELETE load
that a database restart cuts through."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from cluster import HOST, Cluster, open_dir
from test_pg import second_index, wait_until

from minikv.index.lease import LEASE
from minikv.index.pg import PgStore, connect, create_schema
from minikv.index.pg_conns import Conns


@pytest.fixture
def db(postgres) -> str:
    url = postgres.create_db("t" + uuid.uuid4().hex[:12])

    async def schema() -> None:
        conn = await connect(url)
        try:
            await create_schema(conn)
        finally:
            await conn.close()

    asyncio.run(schema())
    return url


def calls_of(loop, coro_fn) -> int:
    """Python function calls (and calls of builtins) made while `coro_fn()` runs on `loop`, the
    event loop's callbacks included: the interpreter's work, not the clock's."""
    async def run() -> int:
        n = 0

        def count(frame, event, arg) -> None:
            nonlocal n
            if event in ("call", "c_call"):
                n += 1

        sys.setprofile(count)
        try:
            await coro_fn()
        finally:
            sys.setprofile(None)
        return n

    return loop.run_until_complete(run())


def test_a_lookup_costs_the_store_few_python_calls(db):
    """A statement takes a connection of the process's own list and gives it back: asyncpg's
    pool made 126 calls of a lookup here (its proxy, timeout and shielded release: 90 µs of
    CPU, more than the statement); the list makes a third of that."""
    import uvloop

    loop = uvloop.new_event_loop()  # the workers' loop (asyncio's own would count its Python too)
    asyncio.set_event_loop(loop)
    store = PgStore(db, "a:1")
    try:
        for _ in range(3):  # the connection opened, the statement prepared
            loop.run_until_complete(store.get(b"/x"))
        n = calls_of(loop, lambda: store.get(b"/x"))
        assert n <= 60, n
    finally:
        loop.run_until_complete(store.close())
        loop.close()
        asyncio.set_event_loop(None)


def test_connections_are_reused_bounded_and_dropped_when_broken(db, postgres):
    async def body() -> None:
        conns = Conns(lambda: connect(db), 2)

        async def sleep_on_one() -> int:
            async with conns.acquire() as conn:
                return await conn.fetchval("SELECT pg_backend_pid() FROM pg_sleep(0.2)")

        pids = await asyncio.gather(*(sleep_on_one() for _ in range(5)))
        assert len(set(pids)) == 2 and conns.count == 2 and len(conns.idle) == 2  # the 3 others waited

        # one of them killed while idle (the database restarted, say): never handed out again
        async with conns.acquire() as conn:
            killed = await conn.fetchval("SELECT pg_backend_pid()")
        assert postgres.psql(db.rsplit("/", 1)[1], f"SELECT pg_terminate_backend({killed})").strip() == "t"
        for _ in range(50):
            if conns.idle[-1][0].is_closed():
                break
            await asyncio.sleep(0.05)
        async with conns.acquire() as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") != killed
        assert conns.count == 1  # the other one; the killed one's place is free

        # given back inside a transaction: closed, not reused with its transaction open
        conn = await conns.take()
        await conn.execute("BEGIN")
        conns.give(conn)
        assert conn.is_closed() and conns.count == 0 and conn not in [c for c, _ in conns.idle]
        await conns.close()

    asyncio.run(body())


def test_a_waiter_cancelled_after_its_wake_up_passes_its_turn_on(db):
    async def body() -> None:
        conns = Conns(lambda: connect(db), 1)
        held = await conns.take()
        first = asyncio.ensure_future(conns.take())
        second = asyncio.ensure_future(conns.take())
        await asyncio.sleep(0.05)  # both wait
        conns.give(held)  # wakes the first...
        first.cancel()  # ...which is cancelled before it runs: the second must get the connection
        got = await asyncio.wait_for(second, 5)
        assert got is held
        conns.give(got)
        await conns.close()

    asyncio.run(body())


@pytest.fixture
def pair_of_servers(postgres):
    """Two index servers with their default workers, on one new database of their own
    instance (a test may restart it), in front of three volumes."""
    from pg import Postgres

    pg = Postgres().init().start()
    root = open_dir()
    c = Cluster(root, db=pg.create_db("t1"))
    other = second_index(c)
    try:
        c.start()
        other.start()
        yield c, other, pg
    finally:
        other.stop()
        c.stop()
        pg.remove()


def test_concurrent_puts_of_one_key_across_two_servers_one_201(pair_of_servers):
    c, other, _ = pair_of_servers
    ports = [c.port, other.port]
    for round_ in range(5):
        key = f"/one/{uuid.uuid4().hex}"

        def put(i: int, key: str = key) -> int:
            return requests.put(f"http://{HOST}:{ports[i % 2]}{key}", data=b"v" * 1000, timeout=30).status_code

        with ThreadPoolExecutor(16) as ex:
            codes = list(ex.map(put, range(16)))
        assert codes.count(201) == 1 and set(codes) <= {201, 403, 409}, (round_, codes)


def test_thrash_through_a_database_restart_loses_nothing_and_leaves_no_lock(pair_of_servers):
    """PUT, GET, DELETE loops over two servers; the database restarts under them. Every answer
    is what the key's state allows or a 503; every acknowledged PUT not deleted reads back,
    every acknowledged DELETE is gone, and once the lease has run out no record is PENDING."""
    c, other, pg = pair_of_servers
    kept: dict[str, bytes] = {}  # acknowledged, never deleted
    deleted: list[str] = []
    unsure: list[str] = []  # a 503 to the PUT or the DELETE
    odd: list[tuple] = []
    stop = threading.Event()

    def loop(i: int) -> None:
        port = (c.port, other.port)[i % 2]
        base = f"http://{HOST}:{port}"
        with requests.Session() as s:
            for n in range(300):  # bounded: stopped well before
                if stop.is_set():
                    return
                key, value = f"/thrash/{i}/{n}", os.urandom(1000)
                try:
                    put = s.put(base + key, data=value, timeout=20).status_code
                    if put == 503:
                        unsure.append(key)
                    if put != 201:
                        if put != 503:
                            odd.append((key, "PUT", put))
                        continue
                    get = s.get(base + key, allow_redirects=False, timeout=20).status_code
                    if get not in (302, 503):
                        odd.append((key, "GET", get))
                    if n % 2:
                        kept[key] = value
                        continue
                    delete = s.delete(base + key, timeout=20).status_code
                except requests.RequestException as e:
                    odd.append((key, "error", str(e)))
                    continue
                if delete == 204:
                    deleted.append(key)
                elif delete == 503:
                    unsure.append(key)
                else:
                    odd.append((key, "DELETE", delete))

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.5)
        pg.stop()
        time.sleep(1.0)
        pg.start()
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not odd, odd[:5]
    assert kept and deleted and unsure, (len(kept), len(deleted), len(unsure))
    for key, value in kept.items():
        assert requests.get(f"http://{HOST}:{other.port}{key}", timeout=10).content == value, key
    for key in deleted:
        assert requests.get(f"http://{HOST}:{c.port}{key}", timeout=10).status_code == 404, key
    wait_until(lambda: pg.psql("t1", "SELECT count(*) FROM minikv_keys WHERE owner IS NOT NULL").split() == ["0"],
               LEASE + 10, "no record PENDING")
    for key in unsure:  # whatever state each was left in, it can be written or deleted now
        r = requests.delete(f"http://{HOST}:{c.port}{key}", timeout=10)
        assert r.status_code in (204, 404), (key, r.status_code, r.text)
        assert requests.put(f"http://{HOST}:{other.port}{key}", data=b"again", timeout=10).status_code == 201
