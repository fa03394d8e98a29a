"""verify's walk notes what it lists and asks the index nothing; its second pass reads the
notes beside the index, both in key order (admin/seen.py). Orphans of every kind must still be
found, by either walk and with one process or several, and a key that neither the index nor
the notes can hold must not end the run."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_admin import admin, put_direct  # noqa: E402
from test_review7 import long_key_files, written  # noqa: E402

from minikv.placement import key2volume  # noqa: E402


def test_verify_finds_every_kind_of_orphan_from_its_notes(make_cluster):
    keys = {f"/vn/{i}": b"v%d" % i for i in range(30)}
    c = written(make_cluster, keys, volumes=3, replicas=2, subvolumes=2)
    subs = [f"{n}/sv0{i}" for n in c.names for i in range(2)]
    put_direct(subs[1], "/a-before-every-record", b"x")  # no record: before the first in key order
    put_direct(subs[2], "/zz-after-every-record", b"x")  # ... and after the last
    placed = key2volume(b"/vn/3", c.names, 2, 2)
    extra = next(v for v in subs if v not in placed)
    put_direct(extra, "/vn/3", keys["/vn/3"])  # a copy its LIVE record does not name
    long_key, paths = long_key_files(c)  # longer than the index (and the notes) hold
    folders = [str(c.volume_dir(n)) for n in c.names]
    for walk in ([], folders):
        for workers in ("1", "2"):
            r = admin("verify", c, "-workers", workers, *walk)
            what = f"{'local' if walk else 'HTTP'} walk, {workers} process(es): {r.stderr}"
            assert r.returncode == 1 and "Traceback" not in r.stderr, what
            assert "30 keys seen, 30 ok" in r.stderr, what
            assert f"/a-before-every-record: {subs[1]}: orphan" in r.stderr, what
            assert f"/zz-after-every-record: {subs[2]}: orphan" in r.stderr, what
            assert f"/vn/3: {extra}: orphan" in r.stderr, what
            assert f"{3 + len(paths)} orphan files" in r.stderr, what
            assert "missing" not in r.stderr and "wrong size" not in r.stderr, what
    assert all(p.read_bytes() == b"long" for p in paths) and long_key


def test_verify_asks_again_for_a_copy_listed_with_another_size(make_cluster):
    keys = {f"/vs/{i}": b"value %d" % i for i in range(10)}
    c = written(make_cluster, keys, volumes=2, replicas=2, subvolumes=1)
    placed = key2volume(b"/vs/4", c.names, 2, 1)
    put_direct(placed[1], "/vs/4", b"other size")  # as a crash between two copies leaves it
    for walk in ([], [str(c.volume_dir(n)) for n in c.names]):
        r = admin("verify", c, *walk)
        assert r.returncode == 1, r.stderr
        assert f"/vs/4: {placed[1]}: wrong size" in r.stderr and "1 files of wrong size" in r.stderr, r.stderr
        assert ": orphan" not in r.stderr, r.stderr
