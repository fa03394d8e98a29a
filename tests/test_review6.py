"""Review of last session's walk and rebuild into PostgreSQL: each test here failed on the code
reviewed, against real volumes and a real PostgreSQL (and one parser case)."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_admin import admin, key_with_slash, ready, write  # noqa: E402
from test_rebuild_fast import lmdb_records  # noqa: E402

from minikv.admin.rebuild_pg import add_many  # noqa: E402
from minikv.admin.walk import parse_mtime  # noqa: E402
from minikv.index.pg import connect  # noqa: E402
from minikv.index.pg_sync import SyncPgStore  # noqa: E402
from minikv.index.record import LIVE, NO_MD5, OP_PUT, PENDING, encode_data, encode_pending  # noqa: E402
from minikv.placement import key2path, key2path_bytes, key2volume  # noqa: E402


def test_a_foreign_name_that_is_not_utf8_costs_rebuild_no_folder(make_cluster):
    # a stray file and folder whose names are not UTF-8, beside a nested key (its folder makes
    # the listing go the careful JSON way): they are skipped as foreign, the keys all found
    c = make_cluster(volumes=1, replicas=1, subvolumes=1)
    nested = key_with_slash()
    keys = {nested: b"nested", "/plain": b"plain"}
    write(c, keys)
    ready(c)
    c.index.stop()
    vol = key2volume(nested.encode(), c.names, 1, 1)[0]
    folder = bytes(c.volume_dir(vol) / key2path(nested.encode())[1:6])
    with open(os.path.join(folder, b"\xff\xfe"), "wb") as f:
        f.write(b"stray")
    os.mkdir(os.path.join(folder, b"\xfe"))
    with open(os.path.join(folder, b"\xfe", b"x"), "wb") as f:
        f.write(b"stray")
    r = admin("rebuild", c, db=c.root / "again")
    assert r.returncode == 0, r.stderr
    assert "incomplete" not in r.stderr, r.stderr
    assert sorted(lmdb_records(c.root / "again")) == sorted(k.encode() for k in keys)


def test_rebuild_into_postgresql_takes_its_keys_in_key_order(postgres):
    # a writer that inserts keys in key order (a server's group of compare-and-sets, another
    # rebuild's batch) while a rebuild's batch holds the same keys: the batch, in the walk's
    # order, took them in another order, the two waited for each other and PostgreSQL ended
    # the rebuild's transaction (deadlock detected): the rebuild died
    pending = encode_pending(OP_PUT, 1, 1, ["v:1"], b"")
    insert = "INSERT INTO minikv_keys (k, rec, owner) VALUES ($1, $2, 'w') ON CONFLICT (k) DO NOTHING"
    outcome, records = race_a_batch(postgres, [], insert, pending)
    assert outcome == [0], outcome  # nothing added: the writer's locks are kept
    assert records == {LOW: pending, HIGH: pending}


def test_rebuild_into_postgresql_locks_the_records_it_merges_in_key_order(postgres):
    # the same with keys already there (rebuild -force): the batch row-locks the records it
    # merges in its own order (the plan here: its temporary table's); a writer locking them in
    # key order (another rebuild's merge) and the batch waited for each other: deadlock
    old = encode_data(LIVE, ["v:1"], 5, 1, NO_MD5)
    outcome, records = race_a_batch(postgres, [(HIGH, old), (LOW, old)], "SELECT rec FROM minikv_keys WHERE k = $1 "
                                    "FOR UPDATE")
    assert outcome == [0], outcome
    assert records == {LOW: b"l", HIGH: b"h"}


def test_an_mtime_out_of_range_is_0_not_a_crash():
    # an hour that overflows the date arithmetic (another server, a damaged answer): unknown
    # (0), as any odd mtime; it raised OverflowError, which ended the whole walk
    assert parse_mtime("Mon, 01 Jan 2024 99999999999:00:00 GMT") == 0


def inverted_pair() -> tuple[bytes, bytes]:
    """Two keys of one <aa>/<bb> folder whose order as keys is not their files' order (a
    listing's, by base64 name): a walk hands the later key first."""
    seen: dict[bytes, bytes] = {}
    for i in range(100_000):
        key = b"/dl%d" % i
        folder = key2path_bytes(key)[:7]
        other = seen.setdefault(folder, key)
        low, high = sorted((key, other))
        if base64.b64encode(low) > base64.b64encode(high):
            return low, high
    raise AssertionError("no such pair")


LOW, HIGH = inverted_pair()


def race_a_batch(postgres, there: list[tuple[bytes, bytes]], statement: str, *args) -> tuple[list, dict]:
    """A rebuild's batch of HIGH then LOW (the walk's order) into a new index holding `there`
    (in that order), while a writer runs `statement` on LOW, then, once the batch waits for it,
    on HIGH, and commits: the batch's outcome (keys added, or its error) and the records then."""
    store = SyncPgStore(postgres.create_db("t" + uuid.uuid4().hex[:12]), "rebuild")  # makes the schema
    for pair in there:
        store.merge_many([pair], lambda key, current, new: new)
    loop = asyncio.new_event_loop()
    conns: list = []
    outcome: list = []
    batch = threading.Thread(target=lambda: outcome.append(_add_many_or_error(store, [(HIGH, b"h"), (LOW, b"l")])))
    try:
        writer = loop.run_until_complete(connect(store.db))
        conns.append(writer)
        watcher = loop.run_until_complete(connect(store.db))
        conns.append(watcher)
        loop.run_until_complete(writer.execute("BEGIN"))
        loop.run_until_complete(writer.execute(statement, LOW, *args))
        batch.start()
        deadline = time.monotonic() + 60
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        while not loop.run_until_complete(watcher.fetchval(waiting)):  # the batch waits for our first key
            assert batch.is_alive(), outcome
            assert time.monotonic() < deadline, "the batch never waited for the writer"
            time.sleep(0.05)
        loop.run_until_complete(writer.execute(statement, HIGH, *args, timeout=60))
        loop.run_until_complete(writer.execute("COMMIT"))
        batch.join(60)
        return outcome, dict(store.scan(b"")[0])
    finally:
        if batch.ident is not None:
            batch.join(60)
        for conn in conns:
            loop.run_until_complete(conn.close())
        loop.close()
        store.close()


def _add_many_or_error(store, items):
    try:
        return add_many(store, items, lambda key, current, new: None if current[0] == PENDING else new)
    except Exception as e:  # noqa: BLE001 - the test shows it
        return e
