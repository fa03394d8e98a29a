"""Rebuild's fast paths give what the plain ones gave: records made with placement computed once
per run (admin/records.py) are make_record's byte for byte; the LMDB batch that puts only where
a key is absent (Store.add_many) merges like merge_many; the PostgreSQL bulk load (COPY, then one
insert: admin/rebuild_pg.py) makes the same index as LMDB's, first time and with -force. Real
volumes, real PostgreSQL, rebuild as its own process."""

from __future__ import annotations

import argparse
import os
import random
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_admin import admin, put_direct, ready, write  # noqa: E402

from minikv.admin.rebuild import make_record  # noqa: E402
from minikv.admin.records import Placer  # noqa: E402
from minikv.admin.walk import Found  # noqa: E402
from minikv.config import Config  # noqa: E402
from minikv.index.pg_sync import SyncPgStore  # noqa: E402
from minikv.index.record import LIVE, decode_data, encode_data  # noqa: E402
from minikv.index.store import Store  # noqa: E402
from minikv.placement import key2volume  # noqa: E402


def test_placer_is_key2volume_and_make_record():
    rnd = random.Random(15)
    for n_vol, replicas, subvolumes in ((3, 3, 10), (5, 2, 1), (4, 1, 3), (6, 3, 256)):
        volumes = [f"127.0.0.1:{3000 + i}" for i in range(n_vol)]
        config = Config(volumes=volumes, db="unused", replicas=replicas, subvolumes=subvolumes)
        placer = Placer(config)
        for i in range(300):
            key = rnd.randbytes(rnd.randrange(1, 40)) if i % 3 else f"/k/{i}".encode()
            want = key2volume(key, volumes, replicas, subvolumes)
            assert placer.want(key) == want
            found = [Found(v, 100, 1_000 + j) for j, v in enumerate(want)]
            if i % 5 == 1:
                found.reverse()  # found in another order than placement's
            elif i % 5 == 2:
                found = found[1:] or found  # a copy missing
            elif i % 5 == 3:
                found.append(Found(volumes[-1] + "/sv00", 100, 5))  # a copy off its placement
            elif i % 5 == 4:
                found[0] = Found(found[0].volume, 99, 7)  # copies that differ in size
            assert placer.record(key, found) == make_record(key, found, config), (key, found)


def test_add_many_puts_new_keys_and_merges_the_others(tmp_path):
    store = Store(str(tmp_path / "db"))
    try:
        old = encode_data(LIVE, ["a"], 5, 1, bytes(16))
        store.merge_many([(b"/b/1", old)], lambda key, current, new: new)
        seen = []

        def merge(key, current, new):
            seen.append((key, current, new))
            return new + b"!"

        new = encode_data(LIVE, ["a", "b"], 5, 1, bytes(16))
        added = store.add_many(sorted([(b"/a/1", new), (b"/a/2", new), (b"/b/1", new), (b"/c/x", new)]), merge)
        assert added == 3
        assert seen == [(b"/b/1", old, new)]  # merge runs for the key already there, only
        assert store.get(b"/b/1") == new + b"!" and store.get(b"/a/2") == new
        assert store.top_folders(b"", 10) == [b"/a/", b"/b/", b"/c/"]  # ListBuckets sees the new folders
    finally:
        store.close()


def test_a_rebuild_into_a_new_index_writes_its_large_batches_a_slice_of_keys_at_a_time(tmp_path, monkeypatch):
    # into a new index the records of many folders are gathered and written FLUSH to a
    # transaction, each a slice of the sorted batch: every key once, in order, nothing lost
    import asyncio

    from minikv.admin import rebuild
    from minikv.admin.progress import Progress

    monkeypatch.setattr(rebuild, "FLUSH", 7)
    monkeypatch.setattr(rebuild, "FRESH_BATCH", 50)
    volumes = [f"127.0.0.1:{3000 + i}" for i in range(3)]
    config = Config(volumes=volumes, db=str(tmp_path / "db"), replicas=2, subvolumes=4)
    store = Store(config.db)
    slices = []
    add_many = store.add_many
    monkeypatch.setattr(store, "add_many", lambda items, merge: slices.append([k for k, _ in items]) or
                        add_many(items, merge))
    progress = Progress("rebuild", bar=False)
    job = rebuild.Rebuild(config, False, None, store, progress, fresh=True)
    placer = Placer(config)
    keys = [f"/fresh/{i}".encode() for i in range(333)]
    random.Random(4).shuffle(keys)
    want = {}
    try:
        for i in range(0, len(keys), 9):  # a folder's group of keys at a time, as the walk hands them
            group = {k: [Found(v, len(k), 1_000) for v in placer.want(k)] for k in keys[i:i + 9]}
            want.update({k: placer.record(k, found)[0] for k, found in group.items()})
            asyncio.run(job.handle(group))
        job.flush()
        assert dict(store.scan(b"")[0]) == want and progress.counts["written"] == len(keys)
    finally:
        store.close()
    assert all(len(keys) <= 7 for keys in slices) and len(slices) >= len(keys) // 7
    batches = []  # the slices of one batch follow each other in key order
    for got in slices:
        if batches and batches[-1][-1] < got[0]:
            batches[-1] += got
        else:
            batches.append(list(got))
    assert all(b == sorted(b) for b in batches) and sorted(k for b in batches for k in b) == sorted(keys)
    assert len(batches) < len(slices)  # a batch went in more than one transaction


def rebuild_with(monkeypatch, tmp_path: Path, run_parts, db: str, workers: int = 2, force: bool = False) -> int:
    """The rebuild command over three empty local folders, its processes stood in for by
    `run_parts` (which sees the parts it would have started)."""
    import asyncio

    from minikv.admin import rebuild

    monkeypatch.setattr(rebuild, "run_parts", run_parts)
    folders = [str(tmp_path / f"vol{i}") for i in range(3)]
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    config = Config(volumes=[f"127.0.0.1:{3000 + i}" for i in range(3)], db=db, replicas=2, subvolumes=1,
                    workers=workers)
    args = argparse.Namespace(positionals=folders, dry_run=False, force=force, given={"workers"}, md5=False,
                              concurrency=1)
    return asyncio.run(rebuild.rebuild(args, config))


def test_the_parts_first_batches_differ_so_that_they_write_in_turns(tmp_path, monkeypatch):
    # the parts walk at one pace: with batches of one size they wrote them at the same moments,
    # each waiting for LMDB's write lock while the other held it. Part i of n makes its first
    # batch (i + 1) / n of the others, so their writes fall between each other's
    import asyncio

    from minikv.admin import rebuild
    from minikv.admin.progress import Progress

    monkeypatch.setattr(rebuild, "FRESH_BATCH", 40)
    volumes = [f"127.0.0.1:{3000 + i}" for i in range(3)]
    config = Config(volumes=volumes, db=str(tmp_path / "db"), replicas=2, subvolumes=1)
    placer = Placer(config)
    store = Store(config.db)
    written = []
    add_many = store.add_many
    monkeypatch.setattr(store, "add_many", lambda items, merge: written.append(len(items)) or add_many(items, merge))
    try:
        for first, sizes in ((0.5, [20, 40, 40, 30]), (1.0, [40, 40, 40, 10])):
            written.clear()
            job = rebuild.Rebuild(config, False, None, store, Progress("rebuild", bar=False), fresh=True, first=first)
            for i in range(0, 130, 10):  # a folder of 10 keys at a time
                keys = [f"/t{first}/{j}".encode() for j in range(i, i + 10)]
                asyncio.run(job.handle({k: [Found(v, 3, 1_000) for v in placer.want(k)] for k in keys}))
            job.flush()
            assert written == sizes
        # long keys end batches by their bytes (FRESH_KEY_BYTES): the first one's limit is as short
        monkeypatch.setattr(rebuild, "FRESH_KEY_BYTES", 400)
        for first, sizes in ((0.5, [10, 20, 20, 20, 20, 20, 20, 0]), (1.0, [20, 20, 20, 20, 20, 20, 10])):
            written.clear()
            job = rebuild.Rebuild(config, False, None, store, Progress("rebuild", bar=False), fresh=True, first=first)
            for i in range(0, 130, 10):
                keys = [f"/long{first}/{j}".encode().ljust(20, b"k") for j in range(i, i + 10)]
                asyncio.run(job.handle({k: [Found(v, 3, 1_000) for v in placer.want(k)] for k in keys}))
            job.flush()
            assert written == [n for n in sizes if n]
    finally:
        store.close()

    # the command gives its parts 1/n, 2/n, ... 1 (its processes stood in for, not run)
    seen = []

    async def run_parts(run, name, parts, progress, stop):
        seen.extend(parts)
        return []

    assert rebuild_with(monkeypatch, tmp_path, run_parts, str(tmp_path / "new"), workers=4) == 0
    assert [p.first for p in seen] == [0.25, 0.5, 0.75, 1.0] and all(p.fresh for p in seen)
    assert [p.early for p in seen] == [224, 232, 240, 248]  # each writes its batch early, at its own folder


def test_a_part_writes_its_batch_before_each_folder_from_its_early_one_on(tmp_path, monkeypatch):
    # the parts end together, each with up to a batch to write, in turns at LMDB's lock: written
    # before a folder near the end (another for each part), only a few folders' keys are left
    import asyncio

    from minikv.admin import rebuild
    from minikv.admin.progress import Progress

    volumes = [f"127.0.0.1:{3000 + i}" for i in range(3)]
    config = Config(volumes=volumes, db=str(tmp_path / "db"), replicas=2, subvolumes=1)
    placer = Placer(config)
    store = Store(config.db)
    try:
        job = rebuild.Rebuild(config, False, None, store, Progress("rebuild", bar=False), fresh=True)
        counts = []
        for a in rebuild.written_early(iter([0, 3, 5, 6, 9, 12]), 6, job):  # a part's folders, as Claims gives them
            counts.append((a, store.count(), len(job.batch)))
            keys = [f"/early/{a}/{j}".encode() for j in range(5)]
            asyncio.run(job.handle({k: [Found(v, 3, 1_000) for v in placer.want(k)] for k in keys}))
        assert counts == [(0, 0, 0), (3, 0, 5), (5, 0, 10), (6, 15, 0), (9, 20, 0), (12, 25, 0)]
        job.flush()
        assert store.count() == 30
    finally:
        store.close()

    # and a part's walk takes its folders through it: from `early` on, a write before each
    flushes = []
    monkeypatch.setattr(rebuild.Rebuild, "flush", lambda self: flushes.append(1))
    dirs = {}
    for v in volumes:
        dirs[v] = str(tmp_path / v.replace(":", "_"))
        os.mkdir(dirs[v])
    for early, want in ((250, 6 + 1), (256, 1)):  # folders 250-255, and the last write at the end
        flushes.clear()
        part = rebuild.Part(config, dirs, None, False, 1, range(256), True, 1.0, early)
        assert asyncio.run(rebuild.run_part(part, Progress("rebuild", bar=False), asyncio.Event(), None)) == []
        assert len(flushes) == want


def test_a_rebuild_into_a_new_index_keeps_servers_off_it_until_it_ends(tmp_path, monkeypatch):
    # its batches reach the index up to FRESH_AFTER seconds after the walk found their keys: a
    # server on it meanwhile could see a key it deleted come back. The rebuild holds the servers'
    # lock on a new index (lock_db: a server waits, then refuses), not on one that exists

    from minikv.server import try_lock_db

    seen = []

    async def run_parts(run, name, parts, progress, stop):
        fd = try_lock_db(parts[0].db, "test")  # as a server starting on it would find it
        seen.append((fd is None, parts[0].fresh))
        if fd is not None:
            os.close(fd)
        return []

    def run(db: str, force: bool = False) -> int:
        return rebuild_with(monkeypatch, tmp_path, run_parts, db, force=force)

    db = str(tmp_path / "new")
    assert run(db) == 0 and seen.pop() == (True, True)  # held while it writes
    fd = try_lock_db(db, "test")
    assert fd is not None  # and let go at its end
    os.close(fd)
    assert run(db, force=True) == 0 and seen.pop() == (False, False)  # an index that exists: servers may run
    # a server already on a path that has no data.mdb yet (it is starting): the index is not new
    other = str(tmp_path / "starting")
    fd = try_lock_db(other, "test")
    try:
        assert run(other) == 0 and seen.pop() == (True, False)
    finally:
        os.close(fd)


def test_handlers_side_by_side_lose_no_record_when_one_flushes(tmp_path, monkeypatch):
    # with -md5 over HTTP the walk's workers run handle() side by side, each awaiting values'
    # md5s: one's flush() started a new batch while the others appended to the old one, which
    # nothing wrote (records missing, exit 0); and a long key ends a fresh batch early
    import asyncio

    from minikv.admin import rebuild
    from minikv.admin.progress import Progress

    monkeypatch.setattr(rebuild, "FLUSH", 5)
    volumes = [f"127.0.0.1:{3000 + i}" for i in range(3)]
    config = Config(volumes=volumes, db=str(tmp_path / "db"), replicas=2, subvolumes=1)
    placer = Placer(config)

    def group(tag: str, n: int, length: int = 0) -> dict:
        keys = [f"/{tag}/{i}".encode().ljust(length, b"k") for i in range(n)]
        return {k: [Found(v, 3, 1_000) for v in placer.want(k)] for k in keys}

    async def md5(key, found):
        await asyncio.sleep(0.001)  # a GET of the value, as md5_of makes
        return b"\1" * 16

    async def side_by_side(job):
        await asyncio.gather(*(job.handle(group(f"g{t}", 4)) for t in range(6)))
        job.flush()

    store = Store(config.db)
    try:
        progress = Progress("rebuild", bar=False)
        job = rebuild.Rebuild(config, True, None, store, progress)
        monkeypatch.setattr(job, "md5", md5)
        asyncio.run(side_by_side(job))
        assert store.count() == 24 and progress.counts["written"] == 24

        monkeypatch.setattr(rebuild, "FRESH_KEY_BYTES", 1000)
        job = rebuild.Rebuild(config, False, None, store, progress, fresh=True)
        asyncio.run(job.handle(group("long", 3, 400)))  # 1200 bytes of keys: written at once
        assert job.batch == [] and store.count() == 27
        asyncio.run(job.handle(group("short", 3)))
        assert len(job.batch) == 3  # short keys wait for more
    finally:
        store.close()


def lmdb_records(db: Path) -> dict[bytes, bytes]:
    store = Store(str(db), readonly=True)
    try:
        return dict(store.scan(b"")[0])
    finally:
        store.close()


def pg_records(url: str) -> dict[bytes, bytes]:
    store = SyncPgStore(url, "test")
    try:
        return dict(store.scan(b"")[0])
    finally:
        store.close()


def test_rebuild_into_postgresql_in_bulk_makes_lmdb_s_index(make_cluster, postgres):
    c = make_cluster(volumes=3, replicas=2)
    keys = {f"/bulk/{i}": os.urandom(3 + i % 11) for i in range(300)}
    write(c, keys)
    stray = key2volume(b"/bulk/7", c.names, 3, c.subvolumes)[2]  # a third copy, off placement
    put_direct(stray, "/bulk/7", keys["/bulk/7"])
    ready(c)
    c.index.stop()
    url = postgres.create_db("t" + uuid.uuid4().hex[:12])
    lmdb = c.root / "again"
    # an index that knows some keys already (one copy of two): -force merges in the other
    known = {}
    store = Store(str(c.root / "index"), readonly=True)
    try:
        for i in range(0, 300, 7):
            rec = decode_data(store.get(f"/bulk/{i}".encode()))
            known[f"/bulk/{i}".encode()] = encode_data(LIVE, rec.volumes[:1], rec.size, rec.mtime_ms, rec.md5)
    finally:
        store.close()
    pairs = sorted(known.items())
    store = Store(str(lmdb))
    try:
        store.merge_many(pairs, lambda key, current, new: new)
    finally:
        store.close()
    pg = SyncPgStore(url, "test")
    try:
        pg.merge_many(pairs, lambda key, current, new: new)
    finally:
        pg.close()

    for db in (str(lmdb), url):
        r = admin("rebuild", c, "-force", *[str(c.volume_dir(n)) for n in c.names], db=db)
        assert r.returncode == 0, r.stderr
        assert "300 keys found" in r.stderr and "300 records written" in r.stderr, r.stderr
    got = pg_records(url)
    assert got == lmdb_records(lmdb)
    assert len(decode_data(got[b"/bulk/7"]).volumes) == 3
    assert all(len(decode_data(got[k]).volumes) >= 2 for k in known)  # merged: the copies found too

    # and into empty indexes, over HTTP (its mtimes are nginx's, to the second)
    fresh, fresh_lmdb = postgres.create_db("t" + uuid.uuid4().hex[:12]), c.root / "fresh"
    for db in (fresh, fresh_lmdb):
        r = admin("rebuild", c, db=db)
        assert r.returncode == 0, r.stderr
    assert pg_records(fresh) == lmdb_records(fresh_lmdb)
    assert len(pg_records(fresh)) == 300
