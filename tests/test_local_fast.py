"""The local rebuild's fast paths: file names checked as bytes (placement.name2key), folders
walked by bytes paths, records put PACE at a time (Store.add_many with LMDB's putmulti). Each
must give what the plain way gives: path2key's answer, the same records, merges and tops."""

from __future__ import annotations

import base64
import os
import random
import subprocess
import sys

from minikv.index.record import LIVE, OP_PUT, PENDING, decode_data, encode_data, encode_pending
from minikv.index.store import PACE, Store
from minikv.placement import key2path, key2volume, name2key, path2key

VOLUMES = ["127.0.0.1:1", "127.0.0.1:2"]


def mangled(name: str) -> list[str]:
    """Names near a key's file name that are no key's (or another key's) file name."""
    flipped = name[:-1] + chr(ord(name[-1]) ^ 1)
    return [name, name[:-1], name + "=", name.replace("=", ""), flipped, name.lower(), " " + name,
            name + "\n", "é" + name, name[:-2] + "Q" + name[-1:]]


def test_name2key_answers_as_path2key_does():
    rnd = random.Random(7)
    checked = 0
    for _ in range(3000):
        key = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 24)))
        path = key2path(key)
        aa, bb, name = path[1:3], path[4:6], path[7:]
        if "/" in name:
            continue  # a nested folder: the walk reads those the careful way
        for candidate in mangled(name):
            for a, b in ((aa, bb), ("00", "00"), (bb, aa)):
                want = path2key(f"/{a}/{b}/{candidate}")
                assert name2key(bytes.fromhex(a + b), os.fsencode(candidate)) == want, (key, candidate)
                checked += 1
    assert checked > 50_000
    assert name2key(b"\0\0", b"\xff\xfe") is None  # not UTF-8: no key's name


def rebuild(tmp_path, db, *dirs: str, force: bool = False) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "minikv", "rebuild", "-volumes", ",".join(VOLUMES), "-db", str(db),
            "-replicas", "2", "-subvolumes", "1", *(["-force"] if force else []), *dirs]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)


def put_file(folder, key: bytes, data: bytes) -> None:
    path = folder / key2path(key)[1:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_a_local_rebuild_keeps_the_keys_and_skips_what_is_no_key_s_file(tmp_path):
    dirs = [tmp_path / "v1", tmp_path / "v2"]
    keys = {b"/lf/%d" % i: b"x" * i for i in range(200)}
    keys[b"/nested/xyz?a"] = b"nested"  # its name holds a `/`: a folder chain
    for key, value in keys.items():
        for volume, folder in zip(VOLUMES, dirs):
            assert volume in key2volume(key, VOLUMES, 2, 1)
            put_file(folder, key, value)
    good = key2path(b"/lf/1")[1:]  # a folder that holds a key, for the strays below
    stray = dirs[0] / good[:5]
    base = base64.b64encode(b"A").decode()  # "QQ=="
    for name in [b"\xff\xfe", b"QR==", base.encode(), b"not base64!", b"bG9uZw"]:
        (stray / os.fsdecode(name)).write_bytes(b"stray")  # QQ== is b"A"'s name, in another folder
    r = rebuild(tmp_path, tmp_path / "idx", *map(str, dirs))
    assert r.returncode == 0, r.stderr
    assert f"{len(keys)} keys found" in r.stderr and "5 foreign files skipped" in r.stderr, r.stderr
    store = Store(str(tmp_path / "idx"), readonly=True)
    try:
        pairs, _ = store.scan(b"")
        got = {k: decode_data(v) for k, v in pairs}
        assert sorted(got) == sorted(keys)
        for key, value in keys.items():
            assert got[key].size == len(value) and got[key].volumes == key2volume(key, VOLUMES, 2, 1), key
        assert store.top_folders(b"", 10) == [b"/lf/", b"/nested/"]
    finally:
        store.close()


def test_add_many_adds_the_new_merges_the_others_and_keeps_the_tops(tmp_path):
    store = Store(str(tmp_path / "db"))
    try:
        record = encode_data(LIVE, ["v1"], 5, 1, b"\0" * 16, 0)
        other = encode_data(LIVE, ["v2"], 5, 1, b"\0" * 16, 0)
        pending = encode_pending(OP_PUT, 1, 1, ["v1"])
        there = {b"/a/same": record, b"/a/other": other, b"/b/busy": pending}
        store.add_many(sorted(there.items()), lambda k, c, n: n)
        assert pending[0] == PENDING
        # a batch longer than a chunk, the existing keys in its second chunk
        new = {b"/c/%05d" % i: record for i in range(PACE + 10)}
        batch = sorted({**new, **{k: record for k in there}, b"/d/1": record, b"flat": record}.items())
        merged = []

        def merge(key, current, value):
            merged.append(key)
            return None if current[0] == PENDING else value

        assert store.add_many(batch, merge) == len(new) + 2
        assert sorted(merged) == [b"/a/other", b"/b/busy"]  # the same record asks no merge
        assert store.get(b"/a/other") == record and store.get(b"/b/busy") == pending
        assert store.get(b"/c/00000") == record and store.get(b"flat") == record
        assert store.top_folders(b"", 10) == [b"/a/", b"/b/", b"/c/", b"/d/"]
    finally:
        store.close()


def test_a_key_longer_than_the_index_holds_is_left_out_and_the_rebuild_goes_on(tmp_path):
    # the Go original's goleveldb takes keys of any length; a base64 name with a `/` every four
    # characters keeps each folder of the chain short, so such a key's file can be on a volume
    long_key = b"/l/" + b"\x41\x0f\xc1" * 200  # "QQ/B" repeated
    assert len(long_key) > 511 and max(map(len, key2path(long_key).split("/"))) < 255
    dirs = [tmp_path / "v1", tmp_path / "v2"]
    keys = [long_key] + [b"/short/%d" % i for i in range(20)]
    for key in keys:
        for folder in dirs:
            put_file(folder, key, b"value")
    r = rebuild(tmp_path, tmp_path / "idx", *map(str, dirs))
    assert r.returncode == 1, r.stderr  # an index without a key the volumes hold: not a clean run
    assert "incomplete" not in r.stderr and "1 keys too long, left out" in r.stderr, r.stderr
    assert "603 bytes, longer than the index holds (511)" in r.stderr, r.stderr
    store = Store(str(tmp_path / "idx"), readonly=True)
    try:
        assert sorted(k for k, _ in store.scan(b"")[0]) == sorted(keys[1:])
    finally:
        store.close()


def test_what_a_local_walk_finds_beside_the_bb_folders(tmp_path):
    # the `<bb>` folders of an `<aa>` are taken by name (two hex digits), their type left to the
    # scandir of each: a file or a dangling link so named is skipped, a link to a folder is
    # followed (as nginx follows it), and one that cannot be read (a link to itself) is said
    dirs = [tmp_path / "v1", tmp_path / "v2"]
    keys = [b"/bb/%d" % i for i in range(60)]
    for key in keys:
        for folder in dirs:
            put_file(folder, key, b"value")
    aa = dirs[0] / key2path(keys[0])[1:3]
    free = [f"{b:02x}" for b in range(256) if not (aa / f"{b:02x}").exists()]
    (aa / free[0]).write_bytes(b"a file")
    os.symlink("nowhere", aa / free[1])
    moved = dirs[0] / key2path(keys[0])[1:6]
    (tmp_path / "elsewhere").mkdir()
    moved.rename(tmp_path / "elsewhere" / "bb")
    os.symlink(tmp_path / "elsewhere" / "bb", moved)
    r = rebuild(tmp_path, tmp_path / "idx", *map(str, dirs))
    assert r.returncode == 0, r.stderr
    assert f"{len(keys)} keys found, {2 * len(keys)} files" in r.stderr, r.stderr
    os.symlink(free[2], aa / free[2])
    r = rebuild(tmp_path, tmp_path / "idx2", *map(str, dirs))
    assert r.returncode == 1, r.stderr  # a folder not read: said, not a clean run
    assert f"cannot read {aa / free[2]}" in r.stderr and f"{len(keys)} keys found" in r.stderr, r.stderr


def test_a_folder_whose_files_cannot_be_read_is_one_error_and_the_walk_goes_on(tmp_path, monkeypatch):
    # a `<bb>` folder that lists but whose files cannot be looked at (a chmod gone wrong; a
    # folder replaced meanwhile): one "cannot read" for the folder, as its listing's error
    # would be, not one line per file; the other folders are walked
    import asyncio

    from minikv.admin.local import LocalWalker

    folder = tmp_path / "v1"
    where = key2path(b"/bad/0")[1:6]  # an `<aa>/<bb>` folder, and five keys of it
    keys = [b"/bad/%d" % i for i in range(1_000_000) if key2path(b"/bad/%d" % i)[1:6] == where][:5]
    others = [b"/good/%d" % i for i in range(20)]
    for key in keys + others:
        put_file(folder, key, b"v")
    bad = os.fsencode(folder / where)
    bad_names = {os.fsencode(key2path(key).rsplit("/", 1)[1]) for key in keys}
    lstat = os.lstat

    def refuse(path, *args, **kwargs):  # by the file's name: the walk may look it up from its folder
        if os.fsencode(path).rsplit(b"/", 1)[-1] in bad_names:
            raise PermissionError(13, "Permission denied")
        return lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", refuse)
    walker = LocalWalker({VOLUMES[0]: str(folder)})
    found: dict = {}

    async def walk():
        async def handle(group):
            found.update(group)
        return await walker.walk(await walker.roots(), handle, lambda: None)

    assert asyncio.run(walk()) == 0
    assert walker.errors == [f"cannot read {os.fsdecode(bad)}: Permission denied"], walker.errors
    assert len(keys) == 5 and sorted(found) == sorted(k for k in others if key2path(k)[1:6] != where)


def test_a_walk_finds_the_same_with_its_folders_open_or_not(tmp_path, monkeypatch):
    # files are looked up from their open `<aa>` folder; past OPEN_FOLDERS, or with no file
    # descriptor left (EMFILE), by their whole path: the same files either way, and every
    # folder opened is closed again
    import asyncio
    import errno

    from minikv.admin import local

    folder = tmp_path / "v1"
    keys = [b"/fd/%d" % i for i in range(300)] + [b"/nested/xyz?a"]
    for i, key in enumerate(keys):
        put_file(folder / f"sv{i % 3:02X}", key, b"v" * (i % 7 + 1))

    def walk():
        walker = local.LocalWalker({VOLUMES[0]: str(folder)})
        found: dict = {}

        async def run():
            async def handle(group):
                found.update(group)
            await walker.walk(await walker.roots(), handle, lambda: None)

        before = len(os.listdir("/proc/self/fd"))
        asyncio.run(run())
        assert len(os.listdir("/proc/self/fd")) == before
        return found, walker.errors

    lstat = os.lstat
    from_folder = 0

    def counted(path, *, dir_fd=None):
        nonlocal from_folder
        from_folder += dir_fd is not None
        return lstat(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "lstat", counted)
    want, errors = walk()
    assert errors == [] and sorted(want) == sorted(keys)
    assert {f.volume for copies in want.values() for f in copies} == {f"{VOLUMES[0]}/sv0{i}" for i in range(3)}
    assert from_folder >= len(keys) - 1  # looked up from their open folder (the nested one by path)
    monkeypatch.setattr(local, "OPEN_FOLDERS", 1)  # the first root's `<aa>` open, the others' not
    assert walk() == (want, [])
    from_folder = 0
    monkeypatch.setattr(local, "OPEN_FOLDERS", 0)
    assert walk() == (want, []) and from_folder == 0
    monkeypatch.setattr(local, "OPEN_FOLDERS", 256)
    real_open = os.open

    def no_descriptor_left(path, flags, *args, **kwargs):
        if flags & os.O_DIRECTORY:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_descriptor_left)
    assert walk() == (want, [])


def test_a_walk_leaves_descriptors_to_spare_under_a_low_limit(tmp_path):
    # 120 subvolumes, one `<aa>` each, under a limit of 60 descriptors more than the process
    # has open: the walk opens a quarter of its limit at most and finds every copy, no error
    folder = tmp_path / "v1"
    for i in range(120):
        put_file(folder / f"sv{i:02X}", b"/low/0", b"v")
    script = f"""
import asyncio, os, resource
from minikv.admin.local import LocalWalker
used = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 60, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
walker = LocalWalker({{"127.0.0.1:1": {str(folder)!r}}})
found = {{}}
async def handle(group):
    found.update(group)
async def run():
    await walker.walk(await walker.roots(), handle, lambda: None)
asyncio.run(run())
print(sum(map(len, found.values())), walker.open_most, walker.errors)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    copies, open_most, errors = r.stdout.split(" ", 2)
    assert copies == "120" and errors.strip() == "[]", r.stdout
    assert 0 < int(open_most) <= 30, r.stdout


def test_an_aa_folder_replaced_while_it_is_walked_is_an_error(tmp_path):
    # a subvolume that is a link, re-pointed mid-walk: its `<bb>` folders are then listed in the
    # new place and their files looked up in the old one, so files may be missed: said
    import asyncio
    import shutil

    from minikv.admin.local import LocalWalker

    real, other = tmp_path / "disk1", tmp_path / "disk2"
    keys = [b"/moved/%d" % i for i in range(40)]
    for key in keys:
        put_file(real, key, b"v")
    shutil.copytree(real, other)
    (tmp_path / "v1").mkdir()
    link = tmp_path / "v1" / "sv00"
    os.symlink(real, link)
    walker = LocalWalker({VOLUMES[0]: str(tmp_path / "v1")})

    async def handle(group):
        if link.readlink() == real:  # once, at the first folder with files
            link.unlink()
            os.symlink(other, link)

    async def run():
        await walker.walk(await walker.roots(), handle, lambda: None)

    asyncio.run(run())
    assert any("was replaced while it was walked" in e for e in walker.errors), walker.errors
