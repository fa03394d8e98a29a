"""admin/trim.py: an admin command lets go of the LMDB pages it has read, and reads on after."""

import lmdb

from minikv.admin.trim import lmdb_maps, trim


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_lmdb_maps_finds_only_lmdb_data_files():
    text = ("7f00a0000000-7f00b0000000 r--s 00000000 fd:01 42 /srv/index/data.mdb\n"
            "7f00c0000000-7f00c0001000 rw-s 00000000 fd:01 43 /srv/index/lock.mdb\n"
            "55d0c0000000-55d0c0100000 r-xp 00000000 fd:01 44 /usr/bin/python3.11\n"
            "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n")
    assert lmdb_maps(text) == [(0x7F00A0000000, 0x7F00B0000000)]


def test_trim_drops_the_pages_read_and_the_data_reads_the_same(tmp_path):
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 30, readahead=False)
    value = b"v" * 4000  # one page a record: 64 MB of pages
    with env.begin(write=True) as txn:
        for i in range(16384):
            txn.put(b"%08d" % i, value)
    before = _rss_file_kb()
    with env.begin() as txn:
        assert all(v == value for _, v in txn.cursor())  # every page mapped in
    read = _rss_file_kb()
    assert read - before > 48 << 10, (before, read)
    assert trim() >= 64 << 20
    trimmed = _rss_file_kb()
    assert read - trimmed > 48 << 10, (read, trimmed)
    with env.begin() as txn:  # faulted back in from the page cache, the same bytes
        assert txn.get(b"%08d" % 16383) == value and sum(1 for _ in txn.cursor()) == 16384
    with env.begin(write=True) as txn:  # and writes go on
        txn.put(b"after", b"x")
    with env.begin() as txn:
        assert txn.get(b"after") == b"x"
    env.close()


def test_a_write_transaction_of_scattered_keys_trims_as_it_goes(tmp_path):
    """Within one batch of rebuild's (4,096 scattered keys) the puts fault in pages all over the
    map, faster than the trimming thread looks: the batch itself looks every PACE puts."""
    import random

    from minikv.admin import trim as trim_module
    from minikv.index import store as store_module

    db = store_module.Store(str(tmp_path / "index"))
    keys = list(range(200_000))
    random.Random(1).shuffle(keys)
    value = b"L" + b"x" * 150
    for i in range(0, 150_000, 10_000):
        db.add_many(sorted((b"/k/%010d" % k, value) for k in keys[i:i + 10_000]), lambda k, c, n: n)
    trim()
    # what else the process maps (libraries; a test run's other files: 52 MB in CI) is the base,
    # which keep_trimmed reads as it starts: the limit is of what is mapped beyond it
    base = trim_module.shared_bytes()
    limit = 8 << 20
    stop = trim_module.keep_trimmed(every=3600, limit=limit)  # the thread never looks: the batch must
    seen = []
    hook = store_module.now_and_then

    def watched() -> None:
        seen.append(trim_module.shared_bytes())
        hook()

    store_module.now_and_then = watched
    try:
        trim()
        db.add_many(sorted((b"/k/%010d" % k, value) for k in keys[150_000:]), lambda k, c, n: n)
        assert len(seen) >= 50_000 // store_module.PACE, len(seen)
        # what 256 puts map in between (fault-around: up to 16 pages each) on top of the limit
        assert max(seen) < base + limit + (24 << 20), ([s >> 20 for s in seen], base >> 20)
    finally:
        stop.set()
        store_module.now_and_then = None
        db.close()


def test_lookups_one_by_one_look_every_pace_records():
    """A walk's lookups (verify reads each key its listings found, scattered over the map) count
    towards the same look as a write transaction's puts."""
    from minikv.index import store as store_module

    calls = []
    store_module.now_and_then = lambda: calls.append(1)
    try:
        for _ in range(10):  # ten small groups of lookups
            for _ in store_module.paced(range(store_module.PACE // 4)):
                pass
        assert len(calls) == 2
    finally:
        store_module.now_and_then = None
