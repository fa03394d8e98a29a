"""Reading back which files the volumes hold, through nginx's JSON directory listings.

A volume holds `[/svXX]/<aa>/<bb>/<base64 name>` (placement.key2path; a base64 name with `/` in
it is a nested directory), written by minikv or by the Go minikeyvalue alike. Anything else at
the top (nginx's `body_temp` upload spool, stray folders) is skipped, and so is every name that
does not decode back to its own path.

A key's file has the same `<aa>/<bb>` on every volume, so the walk goes prefix by prefix across
all volumes at once: for each `<aa>` it lists that folder on every (sub)volume, then each `<bb>`
found, and hands the caller every file of that `<aa>/<bb>` from all volumes together. One key's
replicas thus arrive in one batch, and memory holds one `<aa>/<bb>` folder per worker, never the
whole cluster's listing.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
from collections.abc import Awaitable, Callable
from typing import NamedTuple
from urllib.parse import quote

from minikv.http.client import Pool, Response, VolumeError
from minikv.placement import path2key

SUBVOLUME = re.compile(r"sv[0-9A-F]{2}")
HEX2 = re.compile(r"[0-9a-f]{2}")
# nginx's `autoindex_format json`, a file a line: `{ "name":"...", "type":"file", "mtime":"...", "size":N }`
_FILE_ENTRY = rb'\{ "name":"([^"\\]+)", "type":"file", "mtime":"([^"]*)", "size":(\d+) \}'
_FILE = re.compile(_FILE_ENTRY)
_LISTING = re.compile(rb"\[\r?\n(?:(?:" + _FILE_ENTRY + rb",\r?\n)*" + _FILE_ENTRY + rb"\r?\n)?\]\r?\n?")
_PLAIN = re.compile(r"[A-Za-z0-9/+=._-]*")  # a path that needs no quoting in a URL
LIST_TIMEOUT = 30.0  # a listing of a big folder takes a while to build
ATTEMPTS = 3


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


_MTIMES: dict[str, int] = {}  # nginx gives mtimes to the second: many files share one


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


def plain_files(body: bytes, path: str) -> list[tuple[str, int, int]] | None:
    """(path + name, size, mtime_ms) of each file of a listing in nginx's exact JSON layout
    whose entries are all files with names needing no unescaping (a minikeyvalue `<aa>/<bb>`
    folder, nearly always); None for anything else, which json.loads then reads. Two regular
    expressions instead of the JSON parser and a dict per entry: the walk's Python per listing."""
    if not _LISTING.fullmatch(body):
        return None
    try:
        return [(path + name.decode(), int(size), parse_mtime(mtime.decode())) for name, mtime, size in
                _FILE.findall(body)]
    except UnicodeDecodeError:
        return None


def parse_mtime(text: str) -> int:
    ms = _MTIMES.get(text)
    if ms is None:
        try:
            ms = int(email.utils.parsedate_to_datetime(text).timestamp() * 1000)
        except (TypeError, ValueError):
            ms = 0
        if len(_MTIMES) > 10_000:
            _MTIMES.clear()
        _MTIMES[text] = ms
    return ms


class Walker:
    """Walks the volumes `hosts` with at most `concurrency` listings in flight."""

    def __init__(self, pool: Pool, hosts: list[str], concurrency: int):
        self.pool = pool
        self.hosts = hosts
        self.concurrency = concurrency
        self.requests = asyncio.Semaphore(concurrency)
        self.errors: list[str] = []  # listings that failed for good: the walk is incomplete

    async def listing(self, host: str, path: str) -> list[dict]:
        """The entries of one folder (`path` ends in `/`); [] when it is gone."""
        url = path if _PLAIN.fullmatch(path) else quote(path)
        for attempt in range(ATTEMPTS):
            try:
                async with self.requests:
                    # pipelined: the listings of one pass share a connection and a write per volume
                    resp = await self.pool.request(host, "GET", url, timeout=max(self.pool.timeout, LIST_TIMEOUT),
                                                   pipelined=True)
            except VolumeError:
                if attempt == ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if resp.status == 404:
                return []  # deleted since its parent was listed
            if resp.status != 200:
                raise VolumeError(host, f"answered {resp.status} to a listing of {path}")
            try:
                entries = json.loads(resp.body)
            except ValueError:
                raise VolumeError(host, f"sent a listing of {path} that is not JSON: is it a minikv "
                                        "volume (nginx with `autoindex_format json`)?") from None
            return entries if isinstance(entries, list) else []
        raise AssertionError("unreachable")

    async def roots(self) -> list[Root]:
        """Where each volume keeps files: its subvolume folders, and its top level when that holds
        `<aa>` folders too (a volume written without subvolumes, or with both over time)."""
        found: list[Root] = []
        for host, entries in zip(self.hosts, await asyncio.gather(*(self.listing(h, "/") for h in self.hosts))):
            dirs = [e.get("name", "") for e in entries if e.get("type") == "directory"]
            found += [Root(host, "/" + d) for d in sorted(dirs) if SUBVOLUME.fullmatch(d)]
            if any(HEX2.fullmatch(d) for d in dirs):
                found.append(Root(host, ""))
        return found

    async def files(self, root: Root, path: str) -> list[tuple[str, int, int]]:
        """(path below the root, size, mtime_ms) of every file below folder `path`, recursively
        (a base64 name holding `/` is a folder chain)."""
        out: list[tuple[str, int, int]] = []
        for e in await self.listing(root.host, root.prefix + path):
            name = e.get("name", "")
            if not name or "/" in name or name in (".", ".."):
                continue
            if e.get("type") == "directory":
                out += await self.files(root, path + name + "/")
            elif e.get("type") == "file":
                out.append((path + name, int(e.get("size", 0)), parse_mtime(e.get("mtime", ""))))
        return out

    async def walk(self, roots: list[Root], handle: Callable[[dict[bytes, list[Found]]], Awaitable[None]],
                   done: Callable[[], None], stop: asyncio.Event | None = None, aas: range | list = range(256)) -> int:
        """Call handle({key: [Found, ...]}) once per `<aa>/<bb>` folder that exists anywhere,
        with `concurrency` folders at once, and done() after each `<aa>` of `aas` (all 256 by
        default; a rebuild in several processes gives each a share). Returns how many files
        were skipped as not minikeyvalue's (names that do not decode)."""
        queue: asyncio.Queue = asyncio.Queue()
        for aa in aas:
            queue.put_nowait(f"{aa:02x}")
        skipped = 0

        async def one_bb(aa: str, bb: str, where: list[Root]) -> None:
            nonlocal skipped
            group: dict[bytes, list[Found]] = {}
            keys: dict[str, bytes | None] = {}  # a key's copies share a name: decoded once
            for root, files in zip(where, await self._bb_files(where, f"/{aa}/{bb}/")):
                skipped += add_copies(group, keys, root.volume, files)
            if group:
                await handle(group)

        async def worker() -> None:
            while not queue.empty() and not (stop is not None and stop.is_set()):
                aa = queue.get_nowait()
                bbs: dict[str, list[Root]] = {}
                listings = await asyncio.gather(*(self._bbs_or_error(r, f"/{aa}/") for r in roots))
                for root, names in zip(roots, listings):
                    for bb in names:
                        bbs.setdefault(bb, []).append(root)
                for bb in sorted(bbs):
                    await one_bb(aa, bb, bbs[bb])
                done()

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return skipped

    async def _bb_files(self, where: list[Root], path: str) -> list[list[tuple[str, int, int]]]:
        """The files of one `<aa>/<bb>` folder on each root of `where`: the listings asked at once
        (one request_many, no task each; each worker of the walk has one such batch in flight, so
        the semaphore is not needed) and read by plain_files. A listing that failed, or that
        needs more (a nested folder, an escaped name), goes the careful way: files(), retried."""
        timeout = max(self.pool.timeout, LIST_TIMEOUT)
        answers = await self.pool.request_many([(r.host, "GET", r.prefix + path) for r in where],
                                                timeout=timeout, pipelined=True)
        out = []
        for root, resp in zip(where, answers):
            files = None
            if isinstance(resp, Response):
                files = [] if resp.status == 404 else plain_files(resp.body, path) if resp.status == 200 else None
            out.append(await self._files_or_error(root, path) if files is None else files)
        return out

    async def _listing_or_error(self, root: Root, path: str) -> list[dict]:
        try:
            return await self.listing(root.host, root.prefix + path)
        except VolumeError as e:
            self.errors.append(f"{e} (listing {root.prefix}{path})")
            return []

    async def _bbs_or_error(self, root: Root, path: str) -> list[str]:
        """The `<bb>` folder names of one `<aa>` folder: only the names are kept, since every
        worker holds those of all roots at once (the listings' entries as dicts would be ~200 MB
        at 64 workers and 1M keys)."""
        return [name for e in await self._listing_or_error(root, path)
                if e.get("type") == "directory" and HEX2.fullmatch(name := e.get("name", ""))]

    async def _files_or_error(self, root: Root, path: str) -> list[tuple[str, int, int]]:
        try:
            return await self.files(root, path)
        except VolumeError as e:
            self.errors.append(f"{e} (listing {root.prefix}{path})")
            return []
