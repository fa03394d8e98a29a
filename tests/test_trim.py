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
