"""The index on PostgreSQL (tests/pg.py starts one): start-up errors, the database going away,
several index servers on one database, a server killed in the middle of a write."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from cluster import HOST, Cluster, Proc, free_port, open_dir, wait_closed, wait_port
from pg import PASSWORD

from minikv.index.lease import LEASE, RENEW_EVERY


def fresh() -> str:
    return "/pg/" + uuid.uuid4().hex


def start_upload(port: int, key: str, length: int, sent: bytes) -> socket.socket:
    """A PUT that announces `length` bytes and sends only `sent` of them (so far)."""
    s = socket.create_connection((HOST, port))
    s.sendall(f"PUT {key} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode() + sent)
    return s


def wait_until(check, timeout: float, what: str) -> float:
    """Seconds it took `check()` to hold."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout}s")


def wait_locked(postgres, db: str, key: str) -> None:
    """Until the key's record is a lock (PENDING): a PUT sent to find out could, if it came
    first, take the key itself."""
    name = db.rsplit("/", 1)[1]
    sql = f"SELECT count(*) FROM minikv_keys WHERE k = '\\x{key.encode().hex()}'::bytea AND owner IS NOT NULL"
    wait_until(lambda: postgres.psql(name, sql).split() == ["1"], 10, f"{key} locked")


def second_index(c: Cluster, workers: int = 2) -> Proc:
    """Another index server of cluster `c`, on its own port, on the same database."""
    port = free_port()
    args = list(c.index.args)
    args[args.index("-port") + 1] = str(port)
    args[args.index("-workers") + 1] = str(workers)
    return Proc(args, port, c.root / f"index-{port}.log")


@pytest.fixture
def pair(postgres):
    """Two index servers on one new database, in front of the same three volumes."""
    root = open_dir()
    c = Cluster(root, db=postgres.create_db("t" + uuid.uuid4().hex[:12]))
    other = second_index(c)
    try:
        c.start()
        other.start()
        yield c, other
    finally:
        other.stop()
        c.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)


def url(port: int, key: str) -> str:
    return f"http://{HOST}:{port}{key}"


def run_server(db: str, port: int, env: dict | None = None) -> subprocess.CompletedProcess:
    """`minikv server` as a user would start it; it is expected to stop at once."""
    return subprocess.run(
        [sys.executable, "-m", "minikv", "server", "-port", str(port), "-volumes", f"{HOST}:1",
         "-replicas", "1", "-db", db], capture_output=True, text=True, timeout=60, env=env)


def test_start_errors_say_what_is_wrong_in_one_line(postgres):
    cases = {
        postgres.url(password="wrong"): "password",
        postgres.url(db="no_such_db"): "does not exist",
        f"postgresql://minikv@{HOST}:{free_port()}/x": "cannot reach",
    }
    for db, says in cases.items():
        r = run_server(db, free_port())
        assert r.returncode != 0, r.stderr
        lines = [line for line in r.stderr.strip().splitlines() if "PGPASSWORD" not in line]
        assert len(lines) == 1 and says in lines[0], r.stderr
        assert "Traceback" not in r.stderr and "wrong" not in lines[0]  # nor the password


def test_libpq_environment_fills_in_what_the_url_leaves_out(postgres, monkeypatch):
    bare = postgres.create_db("t" + uuid.uuid4().hex[:12]).replace("minikv:test-password@", "")
    assert run_server(bare, free_port()).returncode != 0  # no user, no password: refused
    root = open_dir()
    c = Cluster(root, volumes=1, replicas=1, db=bare)
    monkeypatch.setenv("PGUSER", "minikv")  # the server started below inherits them
    monkeypatch.setenv("PGPASSWORD", "test-password")
    try:
        c.start()
        key = fresh()
        assert c.put(key, b"v").status_code == 201
        assert c.get(key).content == b"v"
    finally:
        c.stop()


def test_schema_is_versioned_and_a_later_one_refused(postgres):
    db = postgres.create_db("t" + uuid.uuid4().hex[:12])
    name = db.rsplit("/", 1)[1]
    root = open_dir()
    c = Cluster(root, volumes=1, replicas=1, db=db).start()
    try:
        key = fresh()
        assert c.put(key, b"v").status_code == 201
        assert postgres.psql(name, "SELECT version FROM minikv_schema").split() == ["1"]
        assert postgres.psql(name, "SELECT count(*) FROM minikv_keys").split() == ["1"]
    finally:
        c.stop()
    postgres.psql(name, "UPDATE minikv_schema SET version = 99")
    r = run_server(db, free_port())
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 2 and "PGPASSWORD" in lines[0] and "later minikv" in lines[1], lines


def test_two_servers_one_lock_exactly_one_put_wins(pair):
    c, other = pair
    key = fresh()
    ports = [c.port, other.port] * 4

    def put(i: int) -> int:
        return requests.put(url(ports[i], key), data=os.urandom(1 << 20)).status_code

    with ThreadPoolExecutor(8) as ex:
        codes = list(ex.map(put, range(8)))
    assert codes.count(201) == 1, codes
    assert set(codes) <= {201, 403, 409}, codes


def test_a_key_written_through_one_server_is_served_by_the_other(pair):
    c, other = pair
    key = fresh()
    assert requests.put(url(c.port, key), data=b"shared").status_code == 201
    assert requests.get(url(other.port, key)).content == b"shared"
    prefix = key.rsplit("/", 1)[0] + "/"
    assert key in requests.get(url(other.port, prefix) + "?list").json()["keys"]
    assert requests.request("UNLINK", url(other.port, key)).status_code == 204
    assert requests.get(url(c.port, key)).status_code == 404
    assert key in requests.get(url(c.port, prefix) + "?unlinked").json()["keys"]
    assert requests.delete(url(other.port, key)).status_code == 204
    assert requests.get(url(c.port, key)).status_code == 404
    assert key not in requests.get(url(c.port, prefix) + "?unlinked").json()["keys"]


def test_kill9_of_a_server_mid_upload_is_undone_by_the_other_within_the_lease(pair, postgres):
    c, other = pair
    key = fresh()
    s = start_upload(c.port, key, 10 << 20, os.urandom(1 << 20))
    wait_locked(postgres, c.db, key)
    assert requests.put(url(other.port, key), data=b"x").status_code == 409
    c.index.send(signal.SIGKILL)
    c.index.proc.wait(5)
    s.close()
    took = wait_until(lambda: requests.put(url(other.port, key), data=b"after").status_code == 201,
                      LEASE + 3 * RENEW_EVERY + 5, "the key writable again")
    assert took <= LEASE + 3 * RENEW_EVERY + 2
    assert requests.get(url(other.port, key)).content == b"after"
    assert "undid 1 write" in other.log.read_text()


def test_a_restarted_server_undoes_its_own_writes_in_flight(postgres):
    root = open_dir()
    c = Cluster(root, db=postgres.create_db("t" + uuid.uuid4().hex[:12])).start()
    try:
        key = fresh()
        s = start_upload(c.port, key, 10 << 20, os.urandom(1 << 20))
        wait_locked(postgres, c.db, key)
        assert c.put(key, b"x").status_code == 409
        c.index.stop(signal.SIGKILL)
        s.close()
        wait_closed(c.port)
        c.index = c._index(2, [])
        # it waits for its previous run's lease to stop being renewed (two renewal periods)
        c.index.start(wait=False)
        wait_port(c.port, c.index.proc, timeout=4 * RENEW_EVERY + 20)
        assert c.put(key, b"after").status_code == 201  # resolved before the port opened
        assert "undid 1 write" in c.index.log.read_text()
    finally:
        c.stop()


def test_database_down_is_503_never_404_and_comes_back_by_itself(postgres):
    # an instance of this test's own: stopping the shared one would fail the other tests
    from pg import Postgres

    pg = Postgres().init().start()
    root = open_dir()
    c = Cluster(root, db=pg.create_db("t1")).start()
    try:
        present, missing = fresh(), fresh()
        assert c.put(present, b"v").status_code == 201
        pg.stop()
        for key in (present, missing):
            r = c.get(key, allow_redirects=False)
            assert r.status_code == 503 and "index database is unavailable" in r.text, r.text
        r = c.put(fresh(), b"v")
        assert r.status_code == 503 and "unavailable" in r.text, r.text
        assert c.delete(present).status_code == 503
        assert c.get(present[:4] + "?list").status_code == 503
        pg.start()
        wait_until(lambda: c.get(present, allow_redirects=False).status_code == 302, 20, "reads again")
        assert c.get(missing, allow_redirects=False).status_code == 404
        assert c.put(missing, b"w").status_code == 201
        assert c.get(missing).content == b"w"
    finally:
        c.stop()
        pg.remove()


def test_a_database_restart_costs_no_read_an_error(postgres):
    from pg import Postgres

    pg = Postgres().init().start()
    root = open_dir()
    c = Cluster(root, volumes=1, replicas=1, workers=1, db=pg.create_db("t1")).start()
    try:
        key = fresh()
        assert c.put(key, b"v").status_code == 201
        assert c.get(key, allow_redirects=False).status_code == 302  # the worker's pool holds a connection
        pg.stop()
        pg.start()
        # that connection is dead now: the read goes on over a new one
        assert c.get(key, allow_redirects=False).status_code == 302
        assert c.get(fresh(), allow_redirects=False).status_code == 404
    finally:
        c.stop()
        pg.remove()


def through_a_restart(pg, threads, stop, before: float, down: float, after: float = 2.0) -> None:
    """Start `threads` (a load), stop the database `before` seconds later and start it again
    `down` seconds after that; `after` seconds later set `stop` and join the threads."""
    try:
        for t in threads:
            t.start()
        time.sleep(before)
        pg.stop()
        time.sleep(down)
        pg.start()
        time.sleep(after)
    finally:
        stop.set()
        for t in threads:
            t.join(60)


def test_writers_on_two_servers_through_a_database_restart_lose_nothing(postgres):
    """8 writers over two servers; the database stops and starts under them: every answer is
    a 201 or a 5xx, every acknowledged value reads back, and no key stays locked."""
    import threading

    from pg import Postgres

    pg = Postgres().init().start()
    root = open_dir()
    c = Cluster(root, db=pg.create_db("t1")).start()
    other = second_index(c).start()
    acked: dict[str, bytes] = {}
    failed: list[str] = []
    odd: list[tuple[str, int, str]] = []
    stop = threading.Event()

    def writer(i: int) -> None:
        port = (c.port, other.port)[i % 2]
        session = requests.Session()
        for n in range(400):  # bounded: the test stops them well before
            if stop.is_set():
                return
            key, value = f"/load/{i}/{n}", os.urandom(2000)
            try:
                r = session.put(url(port, key), data=value, timeout=20)
            except requests.RequestException:
                failed.append(key)
                continue
            if r.status_code == 201:
                acked[key] = value
            elif r.status_code >= 500:
                failed.append(key)
            else:
                odd.append((key, r.status_code, r.text))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    try:
        through_a_restart(pg, threads, stop, before=1.0, down=2.0)
        assert not odd, odd[:5]
        assert acked, (len(acked), len(failed))  # a quick restart may fail none (index/pg.py WAIT)
        for key, value in acked.items():
            assert requests.get(url(other.port, key)).content == value, key
        for key in failed:  # none locked (409) or half-written: each can be written now
            try:
                wait_until(lambda k=key: requests.put(url(c.port, k), data=b"again").status_code == 201,
                           LEASE, f"{key} writable")
            except AssertionError:
                r = requests.put(url(c.port, key), data=b"again")
                raise AssertionError(f"{key}: {r.status_code} {r.text}; record "
                                     f"{pg.psql('t1', 'SELECT rec, owner FROM minikv_keys WHERE k = ' + repr(key).replace(chr(34), chr(39)) + '::bytea')}"
                                     f"\n{c.index.log.read_text()[-3000:]}\n{other.log.read_text()[-3000:]}") from None
    finally:
        stop.set()
        other.stop()
        c.stop()
        pg.remove()


def test_a_dead_workers_writes_are_undone_by_its_supervisor(postgres):
    root = open_dir()
    c = Cluster(root, workers=1, db=postgres.create_db("t" + uuid.uuid4().hex[:12])).start()
    try:
        key = fresh()
        s = start_upload(c.port, key, 10 << 20, os.urandom(1 << 20))
        wait_locked(postgres, c.db, key)
        assert c.put(key, b"x").status_code == 409
        worker = int(subprocess.run(["pgrep", "-P", str(c.index.proc.pid)], capture_output=True,
                                    text=True).stdout.split()[0])
        os.kill(worker, signal.SIGKILL)
        s.close()

        def put_again() -> bool:
            try:  # a new connection each time: the old one was the dead worker's
                return requests.put(c.url(key), data=b"after").status_code == 201
            except requests.ConnectionError:
                return False

        wait_until(put_again, 15, "the key writable again")
        assert f"undid 1 write(s) left in flight by worker {worker}" in c.index.log.read_text()
    finally:
        c.stop()


def test_a_pending_record_changes_only_for_its_owner(postgres):
    """The fence of a takeover: once another server made a record its own, its first owner's
    compare-and-set fails, whatever it still had in flight."""
    import asyncio

    from minikv.index.pg import PgStore, connect, create_schema
    from minikv.index.record import LIVE, OP_PUT, encode_data, encode_pending

    db = postgres.create_db("t" + uuid.uuid4().hex[:12])

    async def run() -> None:
        conn = await connect(db)
        await create_schema(conn)
        await conn.close()
        a, b = PgStore(db, "a:1"), PgStore(db, "b:1")
        try:
            pending = encode_pending(OP_PUT, 1, 1, ["v:1"])
            live = encode_data(LIVE, ["v:1"], 1, 1, b"")
            assert await a.cas(b"/k", None, pending) == (True, pending)
            assert (await b.cas(b"/k", pending, live))[0] is False  # not b's lock
            assert (await b.cas(b"/k", pending, None))[0] is False
            await b._run("execute", "UPDATE minikv_keys SET owner = 'b:1' WHERE owner = 'a:1'")
            assert (await a.cas(b"/k", pending, live))[0] is False  # taken over: a is fenced off
            assert await b.cas(b"/k", pending, None) == (True, None)
        finally:
            await a.close()
            await b.close()

    asyncio.run(run())


def test_prefix_ranges_and_urls():
    from minikv.index.pg import describe, is_url, prefix_end

    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"/a\xff\xff") == b"/b"
    assert prefix_end(b"\xff") is None and prefix_end(b"") is None
    assert is_url("postgresql://h/d") and is_url("postgres://h/d") and not is_url("/srv/postgresql://x")
    assert describe("postgresql://u:secret@h:5/d") == "postgresql://u:***@h:5/d"
    assert describe("postgresql://u@h/d") == "postgresql://u@h/d"
    from minikv.index.pg import password_warning

    assert "PGPASSWORD" in password_warning("postgresql://u:secret@h/d")
    assert password_warning("postgresql://u@h/d") == "" and password_warning("/srv/index") == ""


def copy_index(src: str, dst: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minikv", "copy-index", src, dst],
                          capture_output=True, text=True, timeout=120)


def test_copy_index_lmdb_to_postgresql_and_back_keeps_marks_md5s_and_locks(postgres):
    root = open_dir()
    c = Cluster(root, db=str(root / "index")).start()
    try:
        live, unlinked, locked = fresh(), fresh(), fresh()
        assert c.put(live, b"live value").status_code == 201
        md5 = c.get(live, allow_redirects=False).headers["Content-Md5"]
        assert c.put(unlinked, b"gone").status_code == 201
        assert c.request("UNLINK", unlinked).status_code == 204
        s = start_upload(c.port, locked, 10 << 20, os.urandom(1 << 20))
        # a DELETE finds the lock (409) or nothing (404); a PUT sent to find out could take the key itself
        wait_until(lambda: c.delete(locked).status_code == 409, 10, "the lock")
        c.index.stop(signal.SIGKILL)  # the lock stays in the LMDB index
        s.close()
        wait_closed(c.port)

        db = postgres.create_db("t" + uuid.uuid4().hex[:12])
        r = copy_index(c.db, db)
        assert r.returncode == 0 and "copied 3 record(s)" in r.stderr, r.stderr
        assert "test-password" not in r.stderr
        r = copy_index(c.db, db)
        assert r.returncode != 0 and "already holds keys" in r.stderr, r.stderr

        c.db = db
        c.index = c._index(2, [])
        c.index.start()
        r = c.get(live, allow_redirects=False)
        assert r.status_code == 302 and r.headers["Content-Md5"] == md5
        assert c.get(live).content == b"live value"
        assert unlinked in c.get("/pg/?unlinked").json()["keys"]
        assert c.get(unlinked).status_code == 404
        # the copied lock has no server: the first one running takes it over and undoes it
        wait_until(lambda: c.put(locked, b"after").status_code == 201, 3 * RENEW_EVERY + 5, "the copied lock undone")
        c.index.stop()

        back = str(root / "index-back")
        r = copy_index(db, back)
        assert r.returncode == 0 and "copied 3 record(s)" in r.stderr, r.stderr
        c.db = back
        c.index = c._index(2, [])
        c.index.start()
        assert c.get(live, allow_redirects=False).headers["Content-Md5"] == md5
        assert c.get(locked).content == b"after"
        assert unlinked in c.get("/pg/?unlinked").json()["keys"]
    finally:
        c.stop()


def test_verify_reads_a_postgresql_index(postgres):
    from minikv.placement import key2path, key2volume

    root = open_dir()
    c = Cluster(root, volumes=3, replicas=2, subvolumes=4, db=postgres.create_db("t" + uuid.uuid4().hex[:12]))
    c.start()
    try:
        keys = [f"/pg/v{i}" for i in range(10)]
        for key in keys:
            assert c.put(key, os.urandom(100)).status_code == 201

        def verify() -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "minikv", "verify", "-volumes", ",".join(c.names),
                                   "-db", c.db, "-replicas", "2", "-subvolumes", "4"],
                                  capture_output=True, text=True, timeout=60)

        r = verify()
        assert r.returncode == 0, r.stderr
        gone = key2volume(keys[3].encode(), c.names, 2, 4)[0]
        (c.volume_dir(gone) / key2path(keys[3].encode())[1:]).unlink()
        r = verify()
        assert r.returncode == 1 and f"{keys[3]}: {gone}: missing" in r.stderr, r.stderr
        assert "test-password" not in r.stderr
    finally:
        c.stop()


def admin(c: Cluster, command: str, *flags: str, volumes: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minikv", command, "-volumes", ",".join(volumes or c.names),
                           "-db", c.db, "-replicas", str(c.replicas), "-subvolumes", str(c.subvolumes), *flags],
                          capture_output=True, text=True, timeout=120)


def test_repair_gc_and_rebalance_on_a_postgresql_index(postgres):
    from minikv.placement import key2path, key2volume

    root = open_dir()
    c = Cluster(root, volumes=4, replicas=2, subvolumes=4, db=postgres.create_db("t" + uuid.uuid4().hex[:12]))
    c.start()
    try:
        keys = {f"/pg/a{i}": os.urandom(100 + i) for i in range(12)}
        for key, value in keys.items():
            assert c.put(key, value).status_code == 201
        # repair: a lost replica is copied again
        damaged = "/pg/a3"
        lost = key2volume(damaged.encode(), c.names, 2, 4)[0]
        (c.volume_dir(lost) / key2path(damaged.encode())[1:]).unlink()
        assert admin(c, "verify").returncode == 1
        r = admin(c, "repair")
        assert r.returncode == 0, r.stderr
        assert (c.volume_dir(lost) / key2path(damaged.encode())[1:]).exists()
        # gc: an unlinked key's files and record go
        doomed = "/pg/a5"
        assert c.request("UNLINK", doomed).status_code == 204
        r = admin(c, "gc", "-age", "0s")
        assert r.returncode == 0, r.stderr
        assert doomed not in c.get("/pg/?unlinked").json()["keys"]
        assert not any((c.volume_dir(v) / key2path(doomed.encode())[1:]).exists()
                       for v in key2volume(doomed.encode(), c.names, 2, 4))
        del keys[doomed]
        # rebalance offline: the index runs on three of the four volumes, keys move to them
        three = c.names[:3]
        c.index.stop()
        c.index = c._index(2, [])
        c.index.args[c.index.args.index("-volumes") + 1] = ",".join(three)
        r = admin(c, "rebalance", volumes=three)
        assert r.returncode == 0, r.stderr
        c.index.start()
        for key, value in keys.items():
            assert c.get(key).content == value, key
            assert c.get(key, allow_redirects=False).headers["Key-Balance"] == "balanced", key
        assert admin(c, "verify", volumes=three).returncode == 0
        assert postgres.psql(c.db.rsplit("/", 1)[1], "SELECT count(*) FROM minikv_leases WHERE id LIKE 'r%'") \
            .split() == ["0"]  # the commands' leases are gone with them
    finally:
        c.stop()


def test_rebuild_into_a_postgresql_index(postgres):
    root = open_dir()
    c = Cluster(root, volumes=3, replicas=2, subvolumes=4, db=str(root / "index")).start()
    try:
        keys = {f"/pg/r{i}": os.urandom(200 + i) for i in range(30)}
        for key, value in keys.items():
            assert c.put(key, value).status_code == 201
        c.index.stop()
        c.db = postgres.create_db("t" + uuid.uuid4().hex[:12])
        r = admin(c, "rebuild", "-md5")
        assert r.returncode == 0, r.stderr
        r = admin(c, "rebuild")
        assert r.returncode == 2 and "already holds 30 records" in r.stderr, r.stderr
        assert PASSWORD in c.db and PASSWORD not in r.stderr  # the URL as describe() shows it
        c.index = c._index(2, [])
        c.index.start()
        for key, value in keys.items():
            assert c.get(key).content == value, key
        assert sorted(c.get("/pg/?list").json()["keys"]) == sorted(keys)
        assert admin(c, "verify", "-md5").returncode == 0
    finally:
        c.stop()


def test_a_worker_that_dies_while_the_database_is_down_leaves_no_lock():
    """Its supervisor cannot undo its writes then; the server's other workers do, once the
    database is back."""
    from pg import Postgres

    from minikv.index.lease import ORPHAN_AGE

    pg = Postgres().init().start()
    root = open_dir()
    c = Cluster(root, workers=1, db=pg.create_db("t1")).start()
    try:
        key = fresh()
        s = start_upload(c.port, key, 10 << 20, os.urandom(1 << 20))
        wait_locked(pg, c.db, key)
        pg.stop()
        worker = int(subprocess.run(["pgrep", "-P", str(c.index.proc.pid)], capture_output=True,
                                    text=True).stdout.split()[0])
        os.kill(worker, signal.SIGKILL)
        s.close()
        wait_until(lambda: "could not undo the writes of worker" in c.index.log.read_text(), 20, "the failed undo")
        pg.start()

        def put_again() -> bool:
            try:
                return requests.put(c.url(key), data=b"after").status_code == 201
            except requests.ConnectionError:
                return False

        wait_until(put_again, ORPHAN_AGE + 3 * RENEW_EVERY + 10, "the key writable again")
        assert "died while the database was out of reach" in c.index.log.read_text()
    finally:
        c.stop()
        pg.remove()
