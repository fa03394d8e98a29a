"""Review of the walk, rebuild into PostgreSQL, the grouped compare-and-sets and the trimming
of LMDB pages: each test here failed on the code reviewed, against real volumes and databases."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_admin import admin, key_with_slash, ready, write  # noqa: E402
from test_rebuild_fast import lmdb_records  # noqa: E402

from minikv.placement import key2path, key2volume  # noqa: E402


def test_a_foreign_name_that_is_not_utf8_costs_rebuild_no_folder(make_cluster):
    # a stray file and folder whose names are not UTF-8, beside a nested key (its folder makes
    # the listing go the careful JSON way): they are skipped as foreign, the keys all found
    c = make_cluster(volumes=1, replicas=1, subvolumes=1)
    nested = key_with_slash()
    keys = {nested: b"nested", "/plain": b"plain"}
    write(c, keys)
    ready(c)
    c.index.stop()
    vol = key2volume(nested.encode(), c.names, 1, 1)[0]
    folder = bytes(c.volume_dir(vol) / key2path(nested.encode())[1:6])
    with open(os.path.join(folder, b"\xff\xfe"), "wb") as f:
        f.write(b"stray")
    os.mkdir(os.path.join(folder, b"\xfe"))
    with open(os.path.join(folder, b"\xfe", b"x"), "wb") as f:
        f.write(b"stray")
    r = admin("rebuild", c, db=c.root / "again")
    assert r.returncode == 0, r.stderr
    assert "incomplete" not in r.stderr, r.stderr
    assert sorted(lmdb_records(c.root / "again")) == sorted(k.encode() for k in keys)
