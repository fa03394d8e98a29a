"""The PostgreSQL index under writes, part two: the connections of a process (index/pg_conns.py)
in place of asyncpg's pool, and whole servers on one database under a PUT, GET, DELETE load
that a database restart cuts through."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from cluster import HOST, Cluster, open_dir
from test_pg import second_index, through_a_restart, wait_until
from test_pg_thrash import db  # noqa: F401 - the fixture: a new database with the schema

from minikv.index.lease import LEASE
from minikv.index.pg import PgStore, connect
from minikv.index.pg_conns import Conns


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


def test_a_lookup_costs_the_store_few_python_calls(db):  # noqa: F811
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


def test_connections_are_reused_bounded_and_dropped_when_broken(db, postgres):  # noqa: F811
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


def test_a_waiter_cancelled_after_its_wake_up_passes_its_turn_on(db):  # noqa: F811
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

    through_a_restart(pg, [threading.Thread(target=loop, args=(i,)) for i in range(8)], stop, before=1.5, down=1.0)
    assert not odd, odd[:5]
    assert kept and deleted, (len(kept), len(deleted), len(unsure))  # unsure: none, when the restart is quick
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


class FutureApp:
    """Answers each GET with a future the test completes by hand: /ok with a 200 naming the
    target, /bad with a 503, /gone by a cancellation (the worker stopping)."""

    def __init__(self, loop):
        self.loop = loop
        self.waiting: list[tuple[bytes, asyncio.Future]] = []

    def handle(self, req):
        fut = self.loop.create_future()
        self.waiting.append((req.url, fut))
        return fut

    def settle(self) -> None:
        from minikv.http.response import HTTPError, response

        for url, fut in self.waiting:
            if url == b"/bad":
                fut.set_exception(HTTPError(503, "the index database is unavailable"))
            elif url == b"/gone":
                fut.cancel()
            else:
                fut.set_result(response(200, [], url))
        self.waiting.clear()


@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_answers_given_as_futures_go_out_in_order_without_a_task(how):
    from test_protocol import FakeTransport, feed, responses

    from minikv.http.server import Connection, Limits

    loop = asyncio.new_event_loop()
    try:
        app = FutureApp(loop)
        conn = Connection(app, Limits(), loop)
        t = FakeTransport()
        conn.connection_made(t)
        feed(conn, b"GET /ok HTTP/1.1\r\n\r\nGET /bad HTTP/1.1\r\n\r\nGET /ok2 HTTP/1.1\r\n\r\n", how)
        for _ in range(3):  # each answered once the one before it is: pipelined, in order
            assert conn._task is None and len(app.waiting) == 1
            app.settle()
            loop.run_until_complete(asyncio.sleep(0))
        got = responses(t.out)
        assert [r.split(b" ", 2)[1] for r in got] == [b"200", b"503", b"200"], got
        assert got[0].endswith(b"/ok") and got[2].endswith(b"/ok2") and b"unavailable" in got[1]
        assert not t.closed
        feed(conn, b"GET /gone HTTP/1.1\r\n\r\n", how)
        app.settle()
        loop.run_until_complete(asyncio.sleep(0))
        assert t.closed  # no answer will come: the connection closes, nothing hangs
    finally:
        loop.close()


def test_a_read_on_postgresql_is_a_future_a_callback_completes(db):  # noqa: F811
    """GET and HEAD of a key: the answer is a future (no coroutine, so no task), completed when
    the lookup comes back: 302 for a stored key, 404 for a missing one, 503 with the reason
    when the database cannot be reached."""
    import uvloop

    from minikv.api.app_pg import PgApp
    from minikv.config import Config
    from minikv.health import Health
    from minikv.http.client import Pool
    from minikv.http.response import HTTPError
    from minikv.http.server import NO_BODY, Request
    from minikv.index.record import LIVE, OP_PUT, encode_data, encode_pending

    def get(app, method: bytes, key: bytes):
        return app.handle(Request(method, key, [], True, NO_BODY, None, False))

    async def body(url: str, live: bool):
        cfg = Config(volumes=["127.0.0.1:1"], db=url, replicas=1, subvolumes=1)
        pool = Pool()
        store = PgStore(url, "a:1")
        app = PgApp(cfg, store, pool, Health(pool, cfg.hosts))
        try:
            if live:
                pending = encode_pending(OP_PUT, 1, 1, ["127.0.0.1:1"], b"")
                assert (await store.cas(b"/here", None, pending))[0]
                assert (await store.cas(b"/here", pending, encode_data(LIVE, ["127.0.0.1:1"], 5, 1, b"")))[0]
            answers = [get(app, b"GET", b"/here"), get(app, b"HEAD", b"/here"), get(app, b"GET", b"/missing")]
            assert all(isinstance(a, asyncio.Future) for a in answers), answers
            return await asyncio.gather(*answers, return_exceptions=True)
        finally:
            pool.close()
            await store.close()

    here, head, missing = uvloop.run(body(db, True))
    assert here.startswith(b"HTTP/1.1 302 ") and b"Location: http://127.0.0.1:1/" in here, here
    assert head.startswith(b"HTTP/1.1 302 ") and missing.startswith(b"HTTP/1.1 404 "), (head, missing)
    from cluster import free_port

    down = uvloop.run(body(f"postgresql://nobody@{HOST}:{free_port()}/none", False))
    assert all(isinstance(e, HTTPError) and e.status == 503 and "unavailable" in str(e) for e in down), down
