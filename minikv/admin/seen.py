"""What verify's walk found of each key, kept for its second pass: a scratch LMDB beside the
index, key → the copies listed (volume, size), so memory does not grow with the number of keys.

The walk goes folder by folder (`<aa>/<bb>`: keys in the order of their md5), the index in
key order. Asking the index about each file as it is found reads its pages at random: at
1,000,000 keys, with admin/trim.py keeping the process's share of the map at 40 MB, a third
of a walk process's time went to those reads and to faulting the pages back in. So the walk asks
the index nothing. It writes what it found here (sorted a batch at a time), and the second
pass reads the index and these notes side by side, both in key order (Notes.merge): a record
and the copies of its key meet there, and so do the copies that no record names (orphans).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator

import lmdb

from minikv.admin.walk import Found
from minikv.index.engine import is_url
from minikv.index.store import paced

SEEN_BATCH = 4096  # keys per scratch LMDB transaction (its dirty pages: memory)
_ID = struct.Struct("<HI")  # a copy's volume: its host's place in -volumes, its subvolume (then its size, 8 bytes)
NO_SUB = 0xFFFFFFFF  # a host without subvolumes
BY_NAME = 0xFFFFFFFE  # a subvolume folder named otherwise than placement names them: its name follows
NAMED_MAX = 16_384  # records' volume lists remembered (about 10 MB at most, with long host names)
_CANONICAL = re.compile(r"sv[0-9A-F]{2,7}")


class Copies:
    """The bytes a key's copies are noted as, and back: each copy as its host's index in
    `volumes`, its subvolume number and its size, sorted, so that the copies a record names with
    its size encode to the same bytes as the listing that shows them (`expected`). A subvolume
    folder placement would not name (`sv005`) is kept by its name."""

    def __init__(self, volumes: list[str]):
        self.volumes = volumes
        self.hosts = {host: i for i, host in enumerate(volumes)}
        self._ids: dict[str, bytes | None] = {}  # volume name → its bytes (None: not on a host of -volumes)
        self._named: dict[bytes, tuple[list[str], list[bytes] | None]] = {}  # named()'s

    def _id(self, volume: str) -> bytes | None:
        got = self._ids.get(volume, b"")
        if got == b"":
            host, _, sub = volume.partition("/")
            i = self.hosts.get(host)
            if i is None:
                got = None
            elif not sub:
                got = _ID.pack(i, NO_SUB)
            elif _CANONICAL.fullmatch(sub) and sub == f"sv{int(sub[2:], 16):02X}":
                got = _ID.pack(i, int(sub[2:], 16))
            else:
                name = sub.encode()
                got = _ID.pack(i, BY_NAME) + bytes((len(name),)) + name
            self._ids[volume] = got
        return got

    def encode(self, found: list[Found]) -> bytes:
        """The listed copies of a key (Found of walk.py, on the hosts of -volumes)."""
        return b"".join(sorted(self._id(f.volume) + f.size.to_bytes(8, "little") for f in found))

    def expected(self, volumes: list[str], size: int) -> bytes | None:
        """What `encode` gives when exactly `volumes` hold a copy of `size` each; None when one
        of them is on no host of -volumes (never listed, so never noted)."""
        ids = self._sorted(volumes)
        return None if ids is None else self.sized(ids, size)

    @staticmethod
    def sized(ids: list[bytes], size: int) -> bytes:
        """`encode`'s bytes for copies of `size` on the volumes of `ids` (sorted, as `named`
        gives them). No id is a prefix of another (a name's length comes before it): sorted
        alone, they keep the order they have with their sizes after them."""
        tail = size.to_bytes(8, "little")
        return tail.join(ids) + tail

    def _sorted(self, volumes: list[str]) -> list[bytes] | None:
        ids = []
        for v in volumes:
            i = self._id(v)
            if i is None:
                return None
            ids.append(i)
        ids.sort()
        return ids

    def named(self, field: bytes) -> tuple[list[str], list[bytes] | None]:
        """A record's volumes field (b"host:port/sv01,...") as its volume names, and their ids
        sorted (None as in `expected`): verify asks this of every record. The first NAMED_MAX
        distinct fields are remembered: a small cluster's records name few (at 3 volumes of 10
        subvolumes, 6,000 lists), a big one's many more (720,000 at 10 volumes), which are then
        worked out each time, as before. ValueError for a damaged field."""
        got = self._named.get(field)
        if got is None:
            names = field.decode().split(",")
            got = (names, self._sorted(names))
            if len(self._named) < NAMED_MAX:
                self._named[field] = got
        return got

    def decode(self, value: bytes) -> list[Found]:
        """The copies back, with mtime 0 (verify's orphan search takes every age)."""
        out = []
        at = 0
        while at < len(value):
            host, sub = _ID.unpack_from(value, at)
            at += _ID.size
            name = self.volumes[host]
            if sub == BY_NAME:
                n = value[at]
                name += "/" + value[at + 1:at + 1 + n].decode()
                at += 1 + n
            elif sub != NO_SUB:
                name += f"/sv{sub:02X}"
            out.append(Found(name, int.from_bytes(value[at:at + 8], "little"), 0))
            at += 8
        return out


class Notes:
    """The scratch LMDB: made by the command (in the folder that holds -db: its disk has room for
    an index; the system's temp folder for a PostgreSQL index), written by each process of the
    walk (`Notes.attach`), read by the second pass (`merge`), removed by `close`."""

    def __init__(self, db: str, path: str = ""):
        if path:
            self.path, self.owner = path, False
        else:
            parent = None if is_url(db) else os.path.dirname(os.path.abspath(db))
            self.path, self.owner = tempfile.mkdtemp(prefix=".verify-", dir=parent), True
        # locked: the walk's processes write it at once
        self.env = lmdb.open(self.path, map_size=1 << 40, sync=False, metasync=False)
        self.batch: list[tuple[bytes, bytes]] = []

    @classmethod
    def attach(cls, path: str) -> Notes:
        return cls("", path)

    def add(self, key: bytes, copies: bytes) -> None:
        self.batch.append((key, copies))
        if len(self.batch) >= SEEN_BATCH:
            self.flush()

    def flush(self) -> None:
        # in key order: neighbouring puts share their pages, and the tree is walked in order
        self.batch.sort()
        with self.env.begin(write=True) as txn:
            for key, value in paced(self.batch):
                txn.put(key, value)
        self.batch = []

    def merge(self) -> Merge:
        return Merge(self.env)

    def close(self) -> None:
        self.env.close()
        if self.owner:
            shutil.rmtree(self.path, ignore_errors=True)


class Merge:
    """The notes in key order, taken as the index's records go by (`before`, then `take`): one
    read transaction for the whole second pass (nobody writes the notes by then)."""

    def __init__(self, env: lmdb.Environment):
        self.txn = env.begin()
        self.items: Iterator[tuple[bytes, bytes]] = self.txn.cursor().iternext()
        self.next = next(self.items, None)

    def before(self, key: bytes, out: list[tuple[bytes, bytes]], limit: int) -> bool:
        """Move the notes of keys before `key` (files of keys that have no record) to `out`
        while it holds fewer than `limit`; whether none is left before `key`."""
        nxt = self.next
        while nxt is not None and nxt[0] < key:
            if len(out) >= limit:
                self.next = nxt
                return False
            out.append(nxt)
            nxt = next(self.items, None)
        self.next = nxt
        return True

    def take(self, key: bytes) -> bytes | None:
        """The copies noted for `key`, the next key of the notes after `before` (None: none listed)."""
        nxt = self.next
        if nxt is not None and nxt[0] == key:
            self.next = next(self.items, None)
            return nxt[1]
        return None

    def rest(self, n: int) -> list[tuple[bytes, bytes]]:
        """Up to `n` of the notes left after the last record."""
        out = []
        while self.next is not None and len(out) < n:
            out.append(self.next)
            self.next = next(self.items, None)
        return out

    def close(self) -> None:
        self.txn.abort()
