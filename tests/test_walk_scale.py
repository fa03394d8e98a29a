"""The walk of the volumes at the speed of the disks (issue 15): verify's walk shared out among
processes as rebuild's is (admin/parts.py), finding what one process finds, and failing loudly
when one of them dies; the listings of `<aa>/<bb>` folders read without the JSON parser when
nginx wrote them in its usual layout (admin/walk.py plain_files). Real volumes (nginx), real
index processes, real LMDB."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).parent))

from test_admin import key_with_slash, write  # noqa: E402

from minikv.placement import key2path  # noqa: E402


def test_plain_files_reads_a_listing_as_the_json_parser_does_and_leaves_it_the_rest(make_cluster):
    from minikv.admin.walk import plain_files

    c = make_cluster(volumes=1, replicas=1, subvolumes=1)
    keys = {f"/pf/{i}": os.urandom(i + 1) for i in range(40)}
    nested = key_with_slash()
    keys[nested] = b"nested"
    write(c, keys)
    top = c.volume_dir(c.names[0])
    odd = top / key2path(b"/pf/0")[1:3]  # an <aa> folder
    odd = next(p for p in odd.iterdir() if p.is_dir())
    (odd / 'a"b').write_bytes(b"x")  # a name nginx escapes in JSON
    checked = fallback = 0
    for aa in sorted(p for p in top.iterdir() if p.is_dir() and len(p.name) == 2):
        for bb in sorted(p for p in aa.iterdir() if p.is_dir()):
            path = f"/{aa.name}/{bb.name}/"
            body = requests.get(f"http://{c.names[0]}{path}").content
            entries = json.loads(body)
            got = plain_files(body, path)
            if got is None:
                # what it leaves to the JSON parser: a nested folder, an escaped name
                assert any(e["type"] == "directory" or '"' in e["name"] for e in entries), body
                fallback += 1
                continue
            assert [(f, s) for f, s, _ in got] == [(path + e["name"], e["size"]) for e in entries]
            assert all(m > 1_600_000_000_000 for _, _, m in got)
            checked += 1
    assert checked >= 30 and fallback == 2, (checked, fallback)
    assert plain_files(b"[\r\n]", "/00/00/") == []
    assert plain_files(b"<html>", "/00/00/") is None
