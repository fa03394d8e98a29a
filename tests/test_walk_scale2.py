"""The walk's leaner paths give what the careful ones gave (issues 12 and 15): a plain listing
read straight from its bytes (admin/walk.py plain_entries, add_plain) keys and skips each name
as path2key does; and rebuild's bulk load into PostgreSQL, which COPYs a batch straight into the
index while none of its keys is there (admin/rebuild_pg.py), merges like before once one is.
Real PostgreSQL."""

from __future__ import annotations

import base64
import json
import random
import sys
import uuid
from pathlib import Path

from minikv.admin.rebuild_pg import add_many
from minikv.admin.walk import add_copies, add_plain, plain_entries
from minikv.index.pg_sync import SyncPgStore
from minikv.placement import key2path

sys.path.insert(0, str(Path(__file__).parent))

from test_walk_scale import plain_files  # noqa: E402

MTIME = "Wed, 02 Dec 2026 12:00:00 GMT"


def listing(names: list[str], dirs: tuple[str, ...] = ()) -> bytes:
    """A listing in nginx's `autoindex_format json` layout."""
    entries = [f'{{ "name":"{d}", "type":"directory", "mtime":"{MTIME}" }}' for d in dirs]
    entries += [f'{{ "name":"{n}", "type":"file", "mtime":"{MTIME}", "size":{len(n)} }}' for n in names]
    return ("[\r\n" + ",\r\n".join(entries) + ("\r\n" if entries else "") + "]\r\n").encode()


def test_a_plain_listing_keys_and_skips_names_as_path2key_does():
    rnd = random.Random(12)
    folder = key2path(b"/w/0")[:7]  # "/aa/bb/"
    canonical = [key2path(k)[7:] for k in (b"/w/0", *(rnd.randbytes(rnd.randrange(1, 30)) for _ in range(400)))
                 if key2path(k)[:7] == folder]
    name = canonical[0]
    odd = [
        name.rstrip("="),  # padding left out: base64 that decodes, but not the name minikv writes
        name[:-2] + ("B" if name[-2] != "B" else "C") + name[-1] if name.endswith("=") else name + "A",
        base64.b64encode(b"/elsewhere").decode(),  # a key of another folder
        "====", "not base64!", "foo.txt",
    ]
    for names in ([name], [name, *odd], odd, [name, name]):
        body = listing(names)
        group_old: dict = {}
        skipped_old = add_copies(group_old, {}, "v:1/sv00", plain_files(body, folder))
        group_new: dict = {}
        skipped_new = add_plain(group_new, {}, "v:1/sv00", folder.encode(), plain_entries(body))
        assert (group_new, skipped_new) == (group_old, skipped_old), names
    assert list(group_new) == [b"/w/0"] and len(group_new[b"/w/0"]) == 2
    assert [e["name"] for e in json.loads(listing(odd))] == odd
    # a folder spelled otherwise than key2path writes it holds no key, whatever its names
    for other in (folder.upper(), folder[:-1], "/" + folder[4:6] + folder[:4], folder.replace("/", "_")):
        group: dict = {}
        assert add_plain(group, {}, "v:1/sv00", other.encode(), plain_entries(listing([name]))) == 1, other
        assert group == {} and add_copies(group, {}, "v:1/sv00", plain_files(listing([name]), other)) == 1


def test_what_is_not_a_plain_listing_goes_to_the_json_parser():
    name = key2path(b"/w/1")[7:]
    assert plain_entries(listing([])) == []
    assert plain_entries(b"[\n]") == []
    assert [e[0] for e in plain_entries(listing([name, name]))] == [name.encode()] * 2
    for body in (listing([name], dirs=("sub",)),  # a nested folder
                 listing([name, 'a\\"b']),  # an escaped name
                 listing([name])[:-4],  # cut short
                 listing([name]).replace(b", \"size\"", b", \"extra\":1, \"size\""),  # another layout
                 b"<html><body>" + listing([name]) + b"</body></html>",
                 b"[\r\n{}\r\n]\r\n", b"", b"[", b"]"):
        assert plain_entries(body) is None, body


def test_rebuild_s_bulk_load_copies_straight_until_a_key_is_there_then_merges(postgres):
    url = postgres.create_db("t" + uuid.uuid4().hex[:12])
    store = SyncPgStore(url, "test")
    merged = []

    def merge(key: bytes, current: bytes | None, new: bytes) -> bytes | None:
        merged.append(key)
        return current + b"+" + new

    try:
        assert store.copy_straight
        first = [(f"/b/{i:03d}".encode(), b"one") for i in range(0, 100, 2)]
        assert add_many(store, first, merge) == 50
        assert store.copy_straight and not merged
        # a batch with a key already there: its COPY fails whole, then the careful way
        second = [(f"/b/{i:03d}".encode(), b"two") for i in range(1, 100, 2)] + [(b"/b/010", b"two")]
        assert add_many(store, sorted(second), merge) == 50
        assert not store.copy_straight and merged == [b"/b/010"]
        third = [(b"/b/200", b"three"), (b"/b/020", b"three")]
        assert add_many(store, third, merge) == 1
        records = dict(store.scan(b"")[0])
    finally:
        store.close()
    assert len(records) == 101
    assert records[b"/b/010"] == b"one+two" and records[b"/b/020"] == b"one+three"
    assert records[b"/b/011"] == b"two" and records[b"/b/200"] == b"three"
