"""The walk's `<aa>/<bb>` listings asked in batches (issue 15: rebuild over HTTP at 3× the Go
original): admin/lister.py sends a batch of GETs to a volume in one write and gathers the
answers with two parser callbacks each, and admin/walk.py hands its caller a batch of folders
at a time. Pinned here: what it costs in Python calls per listing (the walk's CPU is that
Python: 29.7 calls a listing before, with a request, a future and an answer object each); that it
finds every copy on real volumes; and that a volume cutting its connections mid-batch, or
falling silent, costs no file (the careful path asks again)."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from pathlib import Path

import requests
import uvloop

sys.path.insert(0, str(Path(__file__).parent))

from test_admin import write  # noqa: E402

from minikv.admin.lister import Lister  # noqa: E402
from minikv.admin.walk import Walker  # noqa: E402
from minikv.http.client import Pool  # noqa: E402
from minikv.placement import key2path  # noqa: E402

MTIME = "Wed, 02 Dec 2026 12:00:00 GMT"


def walk(hosts: list[str]) -> tuple[dict[bytes, list], list[str]]:
    """Walk `hosts`: ({key: volumes}, the walk's errors)."""
    found: dict[bytes, list] = {}

    async def handle(group):
        for key, copies in group.items():
            found.setdefault(key, []).extend(sorted(f.volume for f in copies))

    async def main() -> list[str]:
        pool = Pool(timeout=2.0)
        walker = Walker(pool, hosts, 64)
        try:
            await walker.walk(await walker.roots(), handle, lambda: None)
        finally:
            pool.close()
        return walker.errors

    return found, asyncio.run(main())


def calls_per_listing(hosts: list[str]) -> tuple[float, int]:
    """The Python calls the walk makes for its `<aa>/<bb>` listings, per listing (asking them,
    reading the answers, keying the files by key); and the listings."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call":
            calls += 1

    async def main() -> int:
        pool = Pool(timeout=2.0)
        walker = Walker(pool, hosts, 64)
        roots = await walker.roots()
        folders = []
        for aa in range(256):
            for root in roots:
                folders += [(root, f"/{aa:02x}/{bb}/") for bb in await walker._bbs_or_error(root, f"/{aa:02x}/")]
        folders.sort(key=lambda f: f[1])  # a folder's roots next to each other, as the walk asks
        group: dict = {}
        await walker._bb_group(folders[:10], group)  # the connections made
        sys.setprofile(profile)
        try:
            for i in range(0, len(folders), 1024):
                await walker._bb_group(folders[i:i + 1024], group)
        finally:
            sys.setprofile(None)
            pool.close()
        return len(folders)

    listings = uvloop.run(main())  # as the walk's processes: the loop's own work is no Python call
    return calls / listings, listings


def test_the_walk_finds_every_copy_at_a_few_python_calls_a_listing(make_cluster):
    c = make_cluster(volumes=2, replicas=2, subvolumes=3)
    keys = {f"/ws3/{i}": b"v" * (i % 7 + 1) for i in range(400)}
    write(c, keys)
    found, errors = walk(c.names)
    assert not errors
    assert sorted(found) == sorted(k.encode() for k in keys)
    assert all(len(v) == 2 and len(set(v)) == 2 for v in found.values())
    per_listing, listings = calls_per_listing(c.names)
    assert listings >= 700
    # one `<bb>` at a time through the Pool: 29.7 calls a listing; in batches through the Lister 8.0-8.7
    assert per_listing < 12, (per_listing, listings)


def test_the_walk_takes_its_folders_one_at_a_time_as_a_worker_is_free(make_cluster):
    # the `<aa>` folders may be shared with the other processes of the command (parts.Claims):
    # taken all at once, one process would hold every folder and the others none
    from minikv.admin.walk import BATCHES

    c = make_cluster(volumes=2, replicas=2, subvolumes=1)
    write(c, {f"/lazy/{i}": b"v" for i in range(50)})
    finished = 0
    taken_when: list[int] = []  # the folders finished when each was taken

    def folders():
        for aa in range(256):
            taken_when.append(finished)
            yield aa

    def done():
        nonlocal finished
        finished += 1

    async def handle(group):
        pass

    async def main() -> list[str]:
        pool = Pool(timeout=2.0)
        walker = Walker(pool, c.names, 64)
        try:
            await walker.walk(await walker.roots(), handle, done, None, folders())
        finally:
            pool.close()
        return walker.errors

    assert asyncio.run(main()) == []
    assert finished == 256 and len(taken_when) == 256
    # each worker holds one folder at a time: never more than BATCHES taken and not finished
    assert max(i - when for i, when in enumerate(taken_when)) <= BATCHES, taken_when


class FakeVolume:
    """A volume's JSON listings of `keys` (one file each, no subvolumes) on loopback, pipelined,
    that cuts the connection with no word after every `cut`-th answer, or (`silent`) never
    answers at all."""

    def __init__(self, keys: list[bytes], cut: int = 0, silent: bool = False):
        self.cut = cut
        self.silent = silent
        self.dirs: dict[str, dict[str, str]] = {}  # folder -> {name: "file" | "directory"}
        for key in keys:
            path = key2path(key)  # /aa/bb/name
            aa, bb, name = path[1:3], path[4:6], path[7:]
            self.dirs.setdefault("/", {})[aa] = "directory"
            self.dirs.setdefault(f"/{aa}/", {})[bb] = "directory"
            self.dirs.setdefault(f"/{aa}/{bb}/", {})[name] = "file"
        self.requests = 0

    def answer(self, path: str) -> bytes:
        entries = self.dirs.get(path)
        if entries is None:
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        lines = [f'{{ "name":"{n}", "type":"directory", "mtime":"{MTIME}" }}' if t == "directory" else
                 f'{{ "name":"{n}", "type":"file", "mtime":"{MTIME}", "size":3 }}' for n, t in sorted(entries.items())]
        body = ("[\r\n" + ",\r\n".join(lines) + "\r\n]\r\n").encode()
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                if self.silent:
                    continue
                writer.write(self.answer(head.split(b" ")[1].decode()))
                answered += 1
                if self.cut and answered == self.cut:
                    break
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # cancelled: the client kept the connection open till the end of the test
        finally:
            writer.close()


def keys_of(n: int) -> list[bytes]:
    return [f"/cut/{i}".encode() for i in range(n)]


async def started(volume: FakeVolume) -> tuple[asyncio.AbstractServer, str]:
    server = await asyncio.start_server(volume.serve, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


def test_a_volume_that_cuts_its_connections_mid_batch_loses_no_file():
    keys = keys_of(300)
    volume = FakeVolume(keys, cut=5)

    async def main():
        server, host = await started(volume)
        pool = Pool(timeout=2.0)
        try:
            # the batch: the answers before the cut, None for the rest
            folders = sorted(p for p in volume.dirs if p.count("/") == 3)[:12]
            lister = Lister(pool)
            answers = await lister.many([(host, p) for p in folders], 5.0)
            lister.close()
            assert [a is not None for a in answers] == [True] * 5 + [False] * 7, answers
            assert all(a[0] == 200 and json.loads(a[1]) for a in answers[:5])
            found: set[bytes] = set()

            async def handle(group):
                found.update(group)

            walker = Walker(pool, [host], 64)
            await walker.walk(await walker.roots(), handle, lambda: None)
            return found, walker.errors
        finally:
            pool.close()
            server.close()

    found, errors = asyncio.run(main())
    assert not errors
    assert found == set(keys)


def test_a_silent_volume_fails_the_batch_after_the_timeout():
    volume = FakeVolume(keys_of(20), silent=True)

    async def main():
        server, host = await started(volume)
        try:
            start = time.monotonic()
            lister = Lister(Pool(timeout=2.0))
            answers = await lister.many([(host, "/00/00/"), (host, "/00/01/")], 0.3)
            lister.close()
            return answers, time.monotonic() - start
        finally:
            server.close()

    answers, took = asyncio.run(main())
    assert answers == [None, None]
    assert 0.3 <= took < 10, took


def test_names_that_need_the_careful_path_still_come_through():
    """A name nginx escapes in JSON is no plain listing: the folder is asked again through the
    Pool, and its keys come as before."""
    key = b'/odd/"quoted"'
    name = base64.b64encode(key).decode()
    assert "/" not in name
    volume = FakeVolume([key, *keys_of(10)])
    path = key2path(key)
    volume.dirs[path[:7]]['a"b'] = "file"  # escaped by JSON below: not plain

    real_answer = volume.answer

    def answer(p: str) -> bytes:
        if p != path[:7]:
            return real_answer(p)
        body = json.dumps([{"name": n, "type": "file", "mtime": MTIME, "size": 3}
                           for n in sorted(volume.dirs[p])]).encode()
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    volume.answer = answer

    async def main():
        server, host = await started(volume)
        pool = Pool(timeout=2.0)
        found: set[bytes] = set()

        async def handle(group):
            found.update(group)

        try:
            walker = Walker(pool, [host], 64)
            skipped = await walker.walk(await walker.roots(), handle, lambda: None)
            return found, skipped, walker.errors
        finally:
            pool.close()
            server.close()

    found, skipped, errors = asyncio.run(main())
    assert not errors
    assert found == {key, *keys_of(10)}
    assert skipped == 1  # a"b


def test_an_aa_listing_is_read_without_the_json_parser_only_when_it_holds_bb_folders_alone(make_cluster):
    from minikv.admin.walk import plain_bbs

    c = make_cluster(volumes=1, replicas=1, subvolumes=1)
    keys = {f"/bbs/{i}": b"x" for i in range(60)}
    write(c, keys)
    top = c.volume_dir(c.names[0])
    aas = sorted(p for p in top.iterdir() if p.is_dir() and len(p.name) == 2)
    (aas[0] / "stray.txt").write_bytes(b"x")  # not a <bb> folder: the JSON parser reads this one
    (aas[1] / "zz").mkdir()
    read = 0
    for aa in aas:
        body = requests.get(f"http://{c.names[0]}/{aa.name}/").content
        got = plain_bbs(body)
        if aa in aas[:2]:
            assert got is None, body
            continue
        assert got == [e["name"] for e in json.loads(body)]
        read += 1
    assert read == len(aas) - 2 > 20
    assert plain_bbs(b"[\r\n]\r\n") == [] and plain_bbs(b"<html>") is None
    found, errors = walk(c.names)
    assert not errors and sorted(found) == sorted(k.encode() for k in keys)
