"""admin/parts.py: a walk's part processes let go of the LMDB pages they read, as the command's
own process does (admin/trim.py): rebuild's parts write the index themselves, and at 1,000,000
keys their mapped pages made a peak RSS of 334 MB."""

import asyncio
import time
from typing import NamedTuple

import lmdb

from minikv.admin.parts import run_parts
from minikv.admin.progress import Progress
from minikv.admin.trim import LIMIT
from minikv.config import Config

VALUE = b"v" * 4000  # one page a record


class Part(NamedTuple):
    config: Config
    db: str


def _rss_file() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no RssFile in /proc/self/status")


async def read_everything(part: Part, progress, stop, pool) -> list[str]:
    """A part that maps every page of the index (40 MB more than the trim limit), then waits
    (up to 10 s) for its file-backed RSS to come back under that limit past what it was before
    (its libraries: the trim counts from there); says what it started at, read and came to."""
    start = _rss_file()
    env = lmdb.open(part.db, readonly=True, lock=False, readahead=False)
    try:
        with env.begin() as txn:
            assert sum(1 for _, v in txn.cursor() if v == VALUE) > 0
        read = _rss_file()
        deadline = time.monotonic() + 10
        while _rss_file() - start > LIMIT and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return [f"{start} {read} {_rss_file()}"]
    finally:
        env.close()


def test_each_part_process_trims_the_index_pages_it_maps(tmp_path):
    db = str(tmp_path / "index")
    env = lmdb.open(db, map_size=1 << 30)
    with env.begin(write=True) as txn:
        for i in range((LIMIT + (40 << 20)) // 4096):  # 40 MB past the limit
            txn.put(b"%08d" % i, VALUE)
    env.close()
    parts = [Part(Config(volumes=[], db=db), db)]
    out = asyncio.run(run_parts(read_everything, "test", parts, Progress("test", bar=False), asyncio.Event()))
    assert len(out) == 1, out
    # the trim fires past LIMIT over the part's own file-backed pages at its start: measured
    # against LIMIT alone, a last trim during the read that left 35 MB of index pages over 13
    # of libraries failed the test (47 MB, never trimmed again: under the trim's own limit)
    start, read, after = map(int, out[0].split())
    assert after - start <= LIMIT, (start, read, after)
