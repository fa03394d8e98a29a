"""Review of the admin commands against hostile or damaged volume contents (a cluster written by
the Go minikeyvalue, or left by a crash): each test here failed on the code reviewed, against
real nginx volumes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import requests

sys.path.insert(0, str(Path(__file__).parent))

from test_admin import admin, put_direct, ready, write  # noqa: E402
from test_local_fast import put_file  # noqa: E402
from test_local_fast import rebuild as local_rebuild  # noqa: E402
from test_rebuild_fast import lmdb_records  # noqa: E402

from minikv.index.record import decode_data  # noqa: E402
from minikv.placement import key2path, key2volume  # noqa: E402


def copies(c, key: bytes) -> list[Path]:
    """The key's files where placement puts them."""
    return [c.volume_dir(v) / key2path(key)[1:] for v in key2volume(key, c.names, c.replicas, c.subvolumes)]


def written(make_cluster, keys: dict[str, bytes], **layout):
    """A cluster of `layout` holding `keys`, its index stopped: volumes to damage."""
    c = make_cluster(**layout)
    write(c, keys)
    ready(c)
    c.index.stop()
    return c


def test_empty_copies_left_by_a_crash_do_not_outvote_the_one_that_holds_the_value(make_cluster):
    # a crash can leave a file empty (its rename reached the disk, its data did not): two empty
    # copies won the size vote in rebuild, and repair then copied the empty value over the only
    # copy that held the bytes
    c = written(make_cluster, {"/crash/1": b"the value", "/crash/2": b"other"}, volumes=3, replicas=3, subvolumes=1)
    files = copies(c, b"/crash/1")
    for path in files[:2]:
        path.write_bytes(b"")
    r = admin("rebuild", c, db=c.root / "again")
    assert r.returncode == 0, r.stderr
    record = decode_data(lmdb_records(c.root / "again")[b"/crash/1"])
    assert record.size == len(b"the value") and len(record.volumes) == 1, record
    r = admin("repair", c, db=c.root / "again")
    assert r.returncode == 0, r.stderr
    assert [p.read_bytes() for p in files] == [b"the value"] * 3


def long_key_files(c) -> tuple[bytes, list[Path]]:
    """A key longer than the index holds (the Go original takes any), its files on every volume,
    old enough for gc's -age."""
    key = b"/l/" + b"\x41\x0f\xc1" * 200  # "QQ/B" repeated: a chain of short folders
    paths = [c.volume_dir(v) / key2path(key)[1:] for v in c.names]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"long")
        os.utime(path, (1, 1))
    return key, paths


def test_deleting_orphans_keeps_the_files_of_a_key_longer_than_the_index_holds(make_cluster):
    # such a key's files are no record's, so an orphan to delete: locking its record first
    # raised (LMDB takes no key that long) and ended gc and repair with a traceback
    c = written(make_cluster, {"/short": b"value"}, volumes=2, replicas=2, subvolumes=1)
    _, paths = long_key_files(c)
    for command, flags in (("gc", ["-age", "0s"]), ("repair", [])):
        r = admin(command, c, "-delete-orphans", *flags)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr and "longer than the index holds (511)" in r.stderr, r.stderr
        assert all(p.read_bytes() == b"long" for p in paths), command


def test_a_symbolic_link_loop_on_a_volume_ends_the_walk_with_an_error(make_cluster):
    # nginx follows links: two links to `.` in an `<aa>/<bb>` folder made its listings a tree
    # 2^40 folders deep, and the walk over HTTP (rebuild, verify, repair, gc) never ended
    keys = {f"/loop/{i}": b"v%d" % i for i in range(10)}
    c = written(make_cluster, keys, volumes=2, replicas=2, subvolumes=1)
    folder = copies(c, b"/loop/0")[0].parent
    os.symlink(".", folder / "a")
    os.symlink(".", folder / "b")
    r = admin("rebuild", c, db=c.root / "again", timeout=180)
    assert r.returncode == 1, r.stderr  # the folder's rest is not walked: said, not a clean run
    assert "a symbolic link to a folder above?" in r.stderr, r.stderr
    assert sorted(lmdb_records(c.root / "again")) == sorted(k.encode() for k in keys)


def test_a_local_rebuild_reads_a_subvolume_linked_from_another_disk(make_cluster):
    # a subvolume moved to another disk and linked back, as nginx serves it: the local walk
    # skipped the link, and the index came out without its copies (with one replica, its keys)
    keys = {f"/moved/{i}": b"v%d" % i for i in range(30)}
    c = written(make_cluster, keys, volumes=2, replicas=1, subvolumes=2)
    sub = c.volume_dir(c.names[0]) / "sv01"
    assert any(sub.rglob("*")), "no key on the subvolume to move"
    sub.rename(c.root / "other-disk")
    os.symlink(c.root / "other-disk", sub)
    dirs = [str(c.volume_dir(v)) for v in c.names]
    over_http = admin("rebuild", c, db=c.root / "http")
    local = admin("rebuild", c, *dirs, db=c.root / "local")
    assert over_http.returncode == 0 and local.returncode == 0, (over_http.stderr, local.stderr)
    placed = {k: decode_data(raw).volumes for k, raw in lmdb_records(c.root / "http").items()}
    assert sorted(placed) == sorted(k.encode() for k in keys)
    assert {k: decode_data(raw).volumes for k, raw in lmdb_records(c.root / "local").items()} == placed


def test_a_volume_whose_top_cannot_be_listed_costs_the_walk_that_volume_only(make_cluster):
    # its folder unreadable to nginx's workers (any user but root), so "/" answers 403 while
    # the volume is up: Walker.roots raised, and verify and gc ended with a traceback, verify
    # before checking any record
    c = written(make_cluster, {f"/top/{i}": b"v" for i in range(10)}, volumes=2, replicas=2, subvolumes=1)
    top = c.volume_dir(c.names[0])
    mode = top.stat().st_mode
    os.chmod(top, 0)
    try:
        r = admin("verify", c)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "orphan search incomplete" in r.stderr and "10 keys seen" in r.stderr, r.stderr
        r = admin("gc", c, "-delete-orphans")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "orphan search incomplete" in r.stderr, r.stderr
    finally:
        os.chmod(top, mode)


def test_deleting_orphans_keeps_them_when_no_copy_the_record_names_is_left(make_cluster):
    # a move killed between its copy and its switch leaves the new copy an orphan; the old copy,
    # the one the record names, then lost with its disk: gc -delete-orphans deleted the orphan,
    # the value's last copy, and said all went well
    c = written(make_cluster, {"/moved": b"the value", "/other": b"x"}, volumes=2, replicas=1, subvolumes=1)
    named = copies(c, b"/moved")[0]
    other = next(v for v in c.names if c.volume_dir(v) not in named.parents)
    put_direct(other, "/moved", b"the value")  # by nginx: its DELETE would succeed
    orphan = c.volume_dir(other) / key2path(b"/moved")[1:]
    os.utime(orphan, (1, 1))
    named.unlink()
    for command, flags in (("gc", ["-age", "0s"]), ("repair", [])):
        r = admin(command, c, "-delete-orphans", *flags)
        assert r.returncode == 1, r.stderr
        assert "may be the last ones" in r.stderr, r.stderr
        assert orphan.read_bytes() == b"the value", command


def volume_folders(tmp_path, keys: list[bytes], mtime: int | None = None) -> list[Path]:
    """Two volume folders (test_local_fast's volumes) holding every key, for a local rebuild."""
    dirs = [tmp_path / "v1", tmp_path / "v2"]
    for key in keys:
        for folder in dirs:
            put_file(folder, key, b"value")
            if mtime is not None:
                os.utime(folder / key2path(key)[1:], (mtime, mtime))
    return dirs


def test_a_local_walk_goes_on_past_an_aa_folder_it_cannot_read(tmp_path):
    # an `<aa>` that is a link to itself (as root, the way to make a folder that cannot be read;
    # for any other user chmod 000 does the same): scandir raised, which ended the walk's
    # process, and the other `<aa>` folders of its share went unread
    keys = [b"/aa/%d" % i for i in range(40)]
    dirs = volume_folders(tmp_path, keys)
    bad = next(f"{a:02x}" for a in range(256) if not (dirs[0] / f"{a:02x}").exists())
    os.symlink(bad, dirs[0] / bad)
    r = local_rebuild(tmp_path, tmp_path / "idx", *map(str, dirs))
    assert r.returncode == 1, r.stderr  # a folder not read: said, not a clean run
    assert f"cannot read {dirs[0] / bad}" in r.stderr and "process exited" not in r.stderr, r.stderr
    assert sorted(lmdb_records(tmp_path / "idx")) == sorted(keys)


def test_an_index_html_on_a_volume_hides_none_of_its_keys(make_cluster):
    # nginx served a folder's index.html in place of its listing: one at a volume's top (a
    # stray file) and rebuild found no folder on that volume, left its keys out and said all
    # went well
    keys = {f"/ix/{i}": b"v%d" % i for i in range(20)}
    c = written(make_cluster, keys, volumes=2, replicas=1, subvolumes=1)
    for name in c.names:
        (c.volume_dir(name) / "index.html").write_bytes(b"[]")
    folder = copies(c, b"/ix/0")[0].parent
    (folder / "index.html").write_bytes(b"[1]")
    r = admin("rebuild", c, db=c.root / "again")
    assert r.returncode == 0, r.stderr
    assert sorted(lmdb_records(c.root / "again")) == sorted(k.encode() for k in keys)


def test_a_key_whose_folder_chain_is_over_a_thousand_deep_ends_no_walk(make_cluster):
    # nginx takes a PUT of it (the Go original's PUT goes through), each folder of its chain two
    # characters: the walks (rebuild over HTTP and from folders, verify) and gc's clean-up of
    # empty folders went down the chain by recursion, and RecursionError ended their process
    keys = {f"/deep/{i}": b"v" for i in range(20)}
    c = written(make_cluster, keys, volumes=2, replicas=1, subvolumes=1)
    deep = b"/aa" + b"\x03\xf0\x3f" * 600 + b"xy"  # "A/A/..." : 1,200 folders
    assert key2path(deep).count("/") > 1100
    volume = key2volume(deep, c.names, 1, 1)[0]
    assert requests.put(f"http://{volume}{quote(key2path(deep))}", data=b"deep").status_code == 201
    chain = c.volume_dir(volume) / key2path(deep)[1:].split("/")[0]
    dirs = [str(c.volume_dir(v)) for v in c.names]
    try:
        for db, flags in (("http", []), ("local", dirs)):
            r = admin("rebuild", c, *flags, db=c.root / db)
            assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # the key is too long
            assert "longer than the index holds" in r.stderr, r.stderr
            assert sorted(lmdb_records(c.root / db)) == sorted(k.encode() for k in keys)
        r = admin("verify", c, db=c.root / "http")
        assert "Traceback" not in r.stderr and "20 ok" in r.stderr, r.stderr
        r = admin("gc", c, "-age", "0s", *dirs, db=c.root / "http")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    finally:
        subprocess.run(["rm", "-rf", str(chain)], check=True)  # shutil.rmtree recurses too


def test_subvolumes_past_256_are_walked(make_cluster):
    # `sv%02X` has three hex digits from 256 on (-subvolumes 300: sv100 to sv12B), which the
    # walks took for stray folders: rebuild left those subvolumes' keys out and exited 0
    keys = {f"/many/{i}": b"v" for i in range(40)}
    c = written(make_cluster, keys, volumes=1, replicas=1, subvolumes=300)
    placed = {k.encode(): key2volume(k.encode(), c.names, 1, 300) for k in keys}
    assert any(len(v[0].rsplit("/sv", 1)[1]) == 3 for v in placed.values())
    for db, flags in (("http", []), ("local", [str(c.volume_dir(c.names[0]))])):
        r = admin("rebuild", c, *flags, db=c.root / db)
        assert r.returncode == 0, r.stderr
        assert {k: decode_data(raw).volumes for k, raw in lmdb_records(c.root / db).items()} == placed


def test_a_file_dated_before_1970_is_a_key_like_any_other(tmp_path):
    # a clock or a restore gone wrong: its mtime is negative, which the record's unsigned field
    # could not hold; struct.error ended the local walk's process and its share's keys were lost
    keys = [b"/old/%d" % i for i in range(40)]
    dirs = volume_folders(tmp_path, keys, mtime=-86400 * 400)
    r = local_rebuild(tmp_path, tmp_path / "idx", *map(str, dirs))
    assert r.returncode == 0, r.stderr
    records = lmdb_records(tmp_path / "idx")
    assert sorted(records) == sorted(keys) and {decode_data(raw).mtime_ms for raw in records.values()} == {0}
