"""Facts read when someone asks (a scrape, the page, a probe), never on the request path: the
index's size, its writes in flight, whether it takes writes, and the server's processes.

Each costs the same whatever the index holds: LMDB keeps entry counts, the PENDING records have
their own table, and of those at most PENDING_SCAN are looked at for the oldest.
"""

from __future__ import annotations

import os
import time

import lmdb

from minikv.index.record import PENDING, decode_pending

PENDING_SCAN = 1000
PROBE_KEY = b"\0minikv-ready"  # no key holds a NUL (the API refuses them): never a record
MIN_FREE = 64 << 10  # bytes: less, and the index's next page splits may find no room
WRITABLE_TTL = 1.0  # seconds a write check is reused: probes cannot make the index write more


def index_facts(store) -> dict:
    now_ms = time.time() * 1000
    oldest = None
    with store.env.begin(db=store.keys) as txn:
        keys = txn.stat(store.keys)["entries"]
        pending = txn.stat(store.pending)["entries"]
        cursor = txn.cursor(db=store.pending)
        for i, (key, _) in enumerate(cursor):
            if i >= PENDING_SCAN:
                break
            raw = txn.get(key)
            if raw is not None and raw[0] == PENDING:
                started = decode_pending(raw).started_ms
                oldest = started if oldest is None else min(oldest, started)
    try:
        size = os.stat(os.path.join(store.path, "data.mdb")).st_size
    except OSError:
        size = 0
    try:
        free = disk_free(store.path)
    except OSError:
        free = None
    return {"keys": keys, "pending": pending, "db_bytes": size, "disk_free": free,
            "oldest_pending_seconds": None if oldest is None else max(0.0, (now_ms - oldest) / 1000)}


def disk_free(path: str) -> int:
    """Bytes the server may still write on the disk holding `path` (root may use the reserve)."""
    st = os.statvfs(path)
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


class WriteCheck:
    """Can the index be written? Its disk must have room to grow (LMDB takes new pages for most
    writes) and one write transaction (a record put and dropped in it, so nothing changes) must
    commit: a small commit alone can still fit in pages LMDB freed while real writes fail. At
    most once per WRITABLE_TTL."""

    def __init__(self, store):
        self.store = store
        self.at = 0.0
        self.reason: str | None = None

    def __call__(self) -> str | None:
        """None when the index takes writes, else why not."""
        path = self.store.path
        try:
            free = disk_free(path)  # one system call: asked every time, so every worker agrees at once
        except OSError as e:
            return f"the disk holding the index database {path} cannot be read ({e.strerror})"
        if free < MIN_FREE:
            return f"the disk holding the index database {path} is full ({free} bytes free): free some space"
        now = time.monotonic()
        if now - self.at > WRITABLE_TTL:
            self.at = now
            try:
                with self.store.env.begin(write=True, db=self.store.pending) as txn:
                    txn.put(PROBE_KEY, b"")
                    txn.delete(PROBE_KEY)
                self.reason = None
            except lmdb.Error as e:
                self.reason = f"the index database {path} cannot be written ({e}): is its disk full?"
        return self.reason


def process_facts(pids: list[int]) -> dict:
    """CPU seconds, resident memory and open files of these processes, summed."""
    tick = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    cpu = rss = fds = 0.0
    counted = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / tick
            rss += int(fields[21]) * page
            fds += len(os.listdir(f"/proc/{pid}/fd"))
            counted += 1
        except (OSError, ValueError, IndexError):
            continue
    return {"cpu_seconds": cpu, "rss_bytes": rss, "open_fds": fds, "processes": counted}
