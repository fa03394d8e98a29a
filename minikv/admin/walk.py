"""Reading back which files the volumes hold, through nginx's JSON directory listings.

A volume holds `[/svXX]/<aa>/<bb>/<base64 name>` (placement.key2path; a base64 name with `/` in
it is a nested directory), written by minikv or by the Go minikeyvalue alike. Anything else at
the top (nginx's `body_temp` upload spool, stray folders) is skipped, and so is every name that
does not decode back to its own path.

A key's file has the same `<aa>/<bb>` on every volume, so the walk goes prefix by prefix across
all volumes at once: for each `<aa>` it lists that folder on every (sub)volume, then each `<bb>`
found, a batch of them at a time (BATCH), and hands the caller every file of the batch's
`<aa>/<bb>` folders from all volumes together. One key's replicas thus arrive in one group, and
memory holds one batch of listings per worker, never the whole cluster's listing.
"""

from __future__ import annotations

import asyncio
import binascii
import email.utils
import json
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import NamedTuple
from urllib.parse import quote

from minikv.admin import lister
from minikv.admin.lister import Lister
from minikv.http.client import Pool, VolumeError
from minikv.placement import key2path_bytes, path2key

# `sv%02X` (placement.py, as the Go original): three hex digits and more past -subvolumes 256
SUBVOLUME = re.compile(r"sv[0-9A-F]{2,8}")
HEX2 = re.compile(r"[0-9a-f]{2}")
# nginx's `autoindex_format json`, a file a line: `{ "name":"...", "type":"file", "mtime":"...", "size":N }`
_FILE_ENTRY = rb'\{ "name":"([^"\\]+)", "type":"file", "mtime":"([^"]*)", "size":(\d{1,18}) \}'
_FILE = re.compile(_FILE_ENTRY)
_BB = re.compile(rb'\{ "name":"([0-9a-f]{2})", "type":"directory", "mtime":"[^"]*" \}')  # an <aa>'s <bb>
_ENTRY_START = b'{ "name":'  # cannot occur inside a name: JSON escapes its `"`
_ENDS = (b"\n]", b"\n]\n", b"\n]\r\n")
_PLAIN = re.compile(r"[A-Za-z0-9/+=._-]*")  # a path that needs no quoting in a URL
LIST_TIMEOUT = 30.0  # a listing of a big folder takes a while to build
ATTEMPTS = 3
# The `<aa>/<bb>` listings go out in batches of up to BATCH (lister.py: one write per volume), with
# up to BATCHES batches in flight per process: at 100,000 keys, 40% less CPU of ours and 8% less of
# nginx's than one `<bb>` at a time with 64 in flight. A listing holds a file or two: a batch is
# some 300 KB of answers at most.
BATCH = 1024
BATCHES = 4
# Folders listed below one `<aa>/<bb>` folder of a (sub)volume at most. Its nested folders are
# base64 names holding `/`, a few even at a billion keys; but nginx follows symbolic links, and
# two links to `.` made the tree 2^40 listings deep (until the kernel's ELOOP): endless.
NESTED = 4096


class _Skipped(VolumeError):
    """A listing not asked: its volume failed one for good earlier in the walk (said once)."""


class Found(NamedTuple):
    """One file on a volume: `volume` is `host:port` or `host:port/svXX`, as records name it."""

    volume: str
    size: int
    mtime_ms: int


class Root(NamedTuple):
    host: str
    prefix: str  # "" or "/svXX"

    @property
    def volume(self) -> str:
        return self.host + self.prefix


_MTIMES: dict = {}  # nginx gives mtimes to the second: many files share one


def add_copies(group: dict[bytes, list[Found]], names: dict[str, bytes | None], volume: str,
               files, prefix: str = "") -> int:
    """Add the files `(name, size, mtime_ms)` of one folder of `volume` to `group` by key; the
    number of names that are no key (foreign files). `names` caches decoded names across the
    volumes of a folder: a key's copies share a name, decoded once."""
    skipped = 0
    for name, size, mtime_ms in files:
        key = names.get(name, b"")
        if key == b"":
            key = names[name] = path2key(prefix + name)
        if key is None:
            skipped += 1
            continue
        group.setdefault(key, []).append(Found(volume, size, mtime_ms))
    return skipped


def plain_entries(body: bytes) -> list[tuple[bytes, bytes, bytes]] | None:
    """(name, mtime, size) of each file of a listing in nginx's exact JSON layout whose entries
    are all files with names needing no unescaping (a minikeyvalue `<aa>/<bb>` folder, nearly
    always); None for anything else, which json.loads then reads. A regular expression instead
    of the JSON parser and a dict per entry: the walk's Python per listing. Every entry matched
    (none is a folder or has an escaped name) is what the count of entry starts tells."""
    if not body.startswith(b"[") or not body.endswith(_ENDS):
        return None
    found = _FILE.findall(body)
    if len(found) != body.count(_ENTRY_START) or not (found or body.strip(b"[]\r\n") == b""):
        return None
    return found


def plain_bbs(body: bytes) -> list[str] | None:
    """The `<bb>` folders of a listing of an `<aa>` folder in nginx's exact JSON layout that
    holds nothing else (nearly always); None for anything else, which json.loads then reads: a
    regular expression instead of a dict for each of its up to 256 entries."""
    if not body.startswith(b"[") or not body.endswith(_ENDS):
        return None
    found = _BB.findall(body)
    if len(found) != body.count(_ENTRY_START) or not (found or body.strip(b"[]\r\n") == b""):
        return None
    return [bb.decode() for bb in found]


def add_plain(group: dict[bytes, list[Found]], names: dict[bytes, bytes | None], volume: str,
              folder: bytes, found: list[tuple[bytes, bytes, bytes]]) -> int:
    """add_copies for the entries of a plain listing of `folder` (b"/aa/bb/"), straight from
    their bytes: no str per name, and the name checked against its key's path as bytes."""
    skipped = 0
    for name, mtime, size in found:
        key = names.get(name, b"")
        if key == b"":
            try:
                key = binascii.a2b_base64(name)  # lenient: the path check below rejects any other spelling
            except binascii.Error:
                key = None
            if key is not None and (not key or key2path_bytes(key) != folder + name):
                key = None
            names[name] = key
        if key is None:
            skipped += 1
            continue
        ms = _MTIMES.get(mtime)
        if ms is None:
            ms = parse_mtime(mtime.decode("latin-1"))  # never raises: an odd mtime is 0, as parse_mtime's
            _MTIMES[mtime] = ms
        copies = group.get(key)
        if copies is None:
            group[key] = [Found(volume, int(size), ms)]
        else:
            copies.append(Found(volume, int(size), ms))
    return skipped


def _is_entry(e) -> bool:
    """Is `e` an entry as nginx lists one (what the walk reads of it has the right types)?"""
    if not (isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("type"), str)):
        return False
    if e["type"] != "file":
        return True
    size = e.get("size")
    return type(size) is int and 0 <= size < 1 << 63 and isinstance(e.get("mtime", ""), str)


def parse_mtime(text: str) -> int:
    ms = _MTIMES.get(text)
    if ms is None:
        try:
            ms = int(email.utils.parsedate_to_datetime(text).timestamp() * 1000)
        except (TypeError, ValueError, OverflowError):  # an hour past any date, say
            ms = 0
        if len(_MTIMES) > 10_000:
            _MTIMES.clear()
        _MTIMES[text] = ms
    return ms


class Walker:
    """Walks the volumes `hosts`: its listings in batches (walk), up to `concurrency` batches in
    flight (BATCHES at most), and up to `concurrency` of the careful way's listings."""

    def __init__(self, pool: Pool, hosts: list[str], concurrency: int):
        self.pool = pool
        self.hosts = hosts
        self.concurrency = concurrency
        self.requests = asyncio.Semaphore(concurrency)
        self.lister = Lister(pool)
        self.errors: list[str] = []  # listings that failed for good: the walk is incomplete
        # volumes that could not give a listing in ATTEMPTS tries (down, or answering too slowly
        # for LIST_TOTAL): the rest of their folders are left out of this walk, not waited for
        # one after the other
        self.broken: dict[str, str] = {}

    async def listing(self, host: str, path: str) -> list[dict]:
        """The entries of one folder (`path` ends in `/`); [] when it is gone."""
        url = path if _PLAIN.fullmatch(path) else quote(path, errors="surrogateescape")
        for attempt in range(ATTEMPTS):
            if host in self.broken:
                raise _Skipped(host, self.broken[host])
            try:
                async with self.requests:
                    # pipelined: the listings of one pass share a connection and a write per volume
                    resp = await asyncio.wait_for(self.pool.request(
                        host, "GET", url, timeout=max(self.pool.timeout, LIST_TIMEOUT), pipelined=True), lister.LIST_TOTAL)
            except (VolumeError, asyncio.TimeoutError) as e:
                if attempt == ATTEMPTS - 1:
                    if not isinstance(e, VolumeError):
                        e = VolumeError(host, f"took more than {lister.LIST_TOTAL:g}s to list {path}")
                    self.broken.setdefault(host, f"left out of this walk after: {e}")
                    raise e from None
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if resp.status == 404:
                return []  # deleted since its parent was listed
            if resp.status != 200:
                raise VolumeError(host, f"answered {resp.status} to a listing of {path}")
            if not resp.headers.get(b"content-type", b"").startswith(b"application/json"):
                # nginx's `index` serves a folder's index.html in place of its listing: the
                # folder would look empty, and a volume's top hid its every key
                raise VolumeError(host, f"sent a file, not a listing, for {path} (an index.html in that folder?)")
            try:
                # a name that is not UTF-8 (a stray file) is kept as surrogates, which no key's
                # name has: skipped as foreign, not an error that costs the folder's other files
                entries = json.loads(resp.body.decode("utf-8", "surrogateescape"))
            except ValueError:
                raise VolumeError(host, f"sent a listing of {path} that is not JSON: is it a minikv "
                                        "volume (nginx with `autoindex_format json`)?") from None
            if not isinstance(entries, list) or not all(map(_is_entry, entries)):
                raise VolumeError(host, f"sent a listing of {path} that is not nginx's (a list of entries, each "
                                        "with a name and a type, and a file's size and mtime): is it a minikv volume?")
            return entries
        raise AssertionError("unreachable")

    async def roots(self) -> list[Root]:
        """Where each volume keeps files: its subvolume folders, and its top level when that holds
        `<aa>` folders too (a volume written without subvolumes, or with both over time). One whose
        top cannot be listed is an error (the walk is incomplete), not the end of the command."""
        found: list[Root] = []
        tops = await asyncio.gather(*(self._listing_or_error(Root(h, ""), "/") for h in self.hosts))
        for host, entries in zip(self.hosts, tops):
            dirs = [e.get("name", "") for e in entries if e.get("type") == "directory"]
            found += [Root(host, "/" + d) for d in sorted(dirs) if SUBVOLUME.fullmatch(d)]
            if any(HEX2.fullmatch(d) for d in dirs):
                found.append(Root(host, ""))
        return found

    async def files(self, root: Root, path: str) -> list[tuple[str, int, int]]:
        """(path below the root, size, mtime_ms) of every file below folder `path` (a base64 name
        holding `/` is a folder chain), listing at most NESTED folders below it. A stack, not
        recursion: a Go key's chain can be over a thousand folders deep (RecursionError)."""
        out: list[tuple[str, int, int]] = []
        folders = [path]
        listed = 0
        while folders:
            folder = folders.pop()
            for e in await self.listing(root.host, root.prefix + folder):
                name = e.get("name", "")
                if not name or "/" in name or name in (".", ".."):
                    continue
                if e.get("type") == "directory":
                    listed += 1
                    if listed <= NESTED:
                        folders.append(folder + name + "/")
                    elif listed == NESTED + 1:
                        self.errors.append(f"volume {root.host}: more than {NESTED} folders below {root.prefix}"
                                           f"{path}, the rest left unwalked: a symbolic link to a folder above?")
                elif e.get("type") == "file":
                    out.append((folder + name, int(e.get("size", 0)), parse_mtime(e.get("mtime", ""))))
        return out

    async def walk(self, roots: list[Root], handle: Callable[[dict[bytes, list[Found]]], Awaitable[None]],
                   done: Callable[[], None], stop: asyncio.Event | None = None, aas: Iterable[int] = range(256)) -> int:
        """Call handle({key: [Found, ...]}) once per batch of `<aa>/<bb>` folders of one `<aa>`
        (BATCH listings; up to BATCHES batches, at most `concurrency`, in flight), and done()
        after each `<aa>` of `aas` (all 256 by default; the parts of a command in several
        processes take them from one parts.Claims). Returns how many files were skipped as not
        minikeyvalue's (names that do not decode)."""
        # taken one at a time as a worker is free: `aas` may be shared with other processes (Claims)
        claims = iter(aas)
        skipped = 0

        async def one_batch(batch: list[tuple[Root, str]]) -> None:
            nonlocal skipped
            group: dict[bytes, list[Found]] = {}
            n = await self._bb_group(batch, group)
            skipped += n  # not `skipped += await ...`: that reads skipped before the others add to it
            if group:
                await handle(group)

        async def worker() -> None:
            while not (stop is not None and stop.is_set()):
                a = next(claims, None)
                if a is None:
                    break
                aa = f"{a:02x}"
                bbs: dict[str, list[Root]] = {}
                for root, names in zip(roots, await self._bbs(roots, aa)):
                    for bb in names:
                        bbs.setdefault(bb, []).append(root)
                batch: list[tuple[Root, str]] = []  # a `<bb>`'s roots go in one batch
                for bb in sorted(bbs):
                    path = f"/{aa}/{bb}/"
                    batch += [(r, path) for r in bbs[bb]]
                    if len(batch) >= BATCH:
                        await one_batch(batch)
                        batch = []
                if batch:
                    await one_batch(batch)
                done()

        try:
            await asyncio.gather(*(worker() for _ in range(max(1, min(BATCHES, self.concurrency)))))
        finally:
            self.lister.close()
        return skipped

    async def _bb_group(self, batch: list[tuple[Root, str]], group: dict[bytes, list[Found]]) -> int:
        """Add the files of the folders of `batch` ((root, "/aa/bb/"), a `<bb>`'s roots next to
        each other) to `group` by key; the names skipped. The listings are asked at once (one
        Lister.many) and read by plain_entries. A listing that failed, or that needs more (a
        nested folder, an escaped name), goes the careful way: files(), retried."""
        batch = [(r, path) for r, path in batch if r.host not in self.broken]
        answers = await self.lister.many([(r.host, r.prefix + path) for r, path in batch],
                                         max(self.pool.timeout, LIST_TIMEOUT))
        skipped = 0
        last, folder, names = "", b"", {}
        for (root, path), resp in zip(batch, answers):
            if path is not last:  # a name is a key only in its own folder: decoded once per folder
                last, folder, names = path, path.encode(), {}
            found = None
            if resp is not None:
                if resp[0] == 404:
                    continue  # deleted since its parent was listed
                found = plain_entries(resp[1]) if resp[0] == 200 else None
            if found is None:
                skipped += add_copies(group, names, root.volume, await self._files_or_error(root, path))
            else:
                skipped += add_plain(group, names, root.volume, folder, found)
        return skipped

    async def _listing_or_error(self, root: Root, path: str) -> list[dict]:
        try:
            return await self.listing(root.host, root.prefix + path)
        except _Skipped:
            return []
        except VolumeError as e:
            self.errors.append(self._failed(root, path, e))
            return []

    def _failed(self, root: Root, path: str, e: VolumeError) -> str:
        left = "; its other folders are left out of this walk" if root.host in self.broken else ""
        return f"{e} (listing {root.prefix}{path}){left}"

    async def _bbs(self, roots: list[Root], aa: str) -> list[list[str]]:
        """The `<bb>` folder names of `<aa>` on each root: asked in one batch, read by plain_bbs;
        what that leaves goes the careful way (_bbs_or_error)."""
        asked = [r for r in roots if r.host not in self.broken]
        answers = dict(zip(asked, await self.lister.many([(r.host, f"{r.prefix}/{aa}/") for r in asked],
                                                         max(self.pool.timeout, LIST_TIMEOUT))))
        out = []
        for root in roots:
            resp = answers.get(root)
            names = None
            if resp is not None:
                names = [] if resp[0] == 404 else plain_bbs(resp[1]) if resp[0] == 200 else None
            out.append(await self._bbs_or_error(root, f"/{aa}/") if names is None else names)
        return out

    async def _bbs_or_error(self, root: Root, path: str) -> list[str]:
        """The `<bb>` folder names of one `<aa>` folder: only the names are kept, since every
        worker holds those of all roots at once (the listings' entries as dicts would be ~200 MB
        at 64 workers and 1M keys)."""
        return [name for e in await self._listing_or_error(root, path)
                if e.get("type") == "directory" and HEX2.fullmatch(name := e.get("name", ""))]

    async def _files_or_error(self, root: Root, path: str) -> list[tuple[str, int, int]]:
        try:
            return await self.files(root, path)
        except _Skipped:
            return []
        except VolumeError as e:
            self.errors.append(self._failed(root, path, e))
            return []
