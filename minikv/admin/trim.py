"""Keep an admin command's resident memory its own: drop this process's hold on the LMDB pages
it has read.

A command that goes through every record (rebuild, rebalance, verify, gc) touches every page of
the index, and each page it touched stays mapped into the process: at 1,000,000 keys that
counted some 200 MB in its RSS beside 17-26 MB of its own memory, and at a billion keys it
would show the whole file. Those pages are the kernel's page cache, reclaimable, but a mapped
page is reclaimed later than one nobody maps, and an operator reads RSS. So whenever the
process's file-backed resident pages pass those it had at the start (its libraries) by LIMIT
(looked at 50 times a second: a walk reads 150 MB a second here, and each page a random read
faults in comes with up to 16 cached neighbours; long write transactions look every 256 puts as
well), the mappings of LMDB data files are given MADV_DONTNEED: the pages stay in the page
cache (a later read maps them again without going to the disk), and only the process's claim
on them goes. Safe for LMDB: its map
is shared and file-backed, so nothing it holds is lost (writes go through the file, and a dirty
page stays dirty in the cache), and a reader just faults the page back in. `minikv gc` over
1,000,000 records: peak RSS 273 MB without this, 118 MB with it (19 MB of it its own).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading

from minikv.index import store

EVERY = 0.02  # seconds between looks at the resident set (a look reads /proc/self/statm: ~10 us)
LIMIT = 40 << 20  # LMDB's resident bytes that make a trim (what a look may find past it is the margin)
_PAGE = os.sysconf("SC_PAGE_SIZE")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def lmdb_maps(maps: str) -> list[tuple[int, int]]:
    """(start, end) of every mapping of an LMDB data file in the text of /proc/PID/maps."""
    found = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith("/data.mdb"):
            start, end = fields[0].split("-")
            found.append((int(start, 16), int(end, 16)))
    return found


def trim() -> int:
    """Let go of the mapped pages of every LMDB file this process has open; the bytes of
    mappings trimmed."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return 0  # not Linux: nothing to do
    done = 0
    for start, end in lmdb_maps(maps):
        if _libc.madvise(start, end - start, mmap.MADV_DONTNEED) == 0:
            done += end - start
    return done


def shared_bytes() -> int:
    """This process's resident pages that are shared (file-backed ones, LMDB's map among them)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[2]) * _PAGE


def keep_trimmed(every: float = EVERY, limit: int = LIMIT) -> threading.Event | None:
    """In a daemon thread, until the returned event is set: trim whenever the shared resident
    bytes pass `limit`, looking every `every` seconds; and look within long write transactions
    too (index/store.py now_and_then). None where there is no /proc."""
    try:
        # what is shared before any index page is read (the interpreter and its libraries): not
        # ours to trim, and counted against `limit` it made a trim of the whole map every 0.1 s
        base = shared_bytes()
    except OSError:
        return None
    stop = threading.Event()

    def look() -> None:
        try:
            if not stop.is_set() and shared_bytes() - base > limit:
                trim()
        except OSError:  # no file to read /proc with, say: the work goes on untrimmed
            pass

    store.now_and_then = look

    def run() -> None:
        while not stop.wait(every):
            look()

    threading.Thread(target=run, name="lmdb-trim", daemon=True).start()
    return stop
