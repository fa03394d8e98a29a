"""Odd listings on the walk's plain path (admin/walk.py plain_entries, add_plain): what it
accepts it keys as the careful path would, and no byte of a listing makes it raise."""

from __future__ import annotations

from minikv.admin.walk import add_plain, plain_entries
from minikv.placement import key2path_bytes


def test_a_non_utf8_mtime_is_no_crash():
    # an mtime that is not UTF-8 (nginx sends ASCII; another server or a damaged answer may
    # not): the file is still keyed, its mtime unknown (0) as parse_mtime makes any odd one
    path = key2path_bytes(b"k")
    body = b'[\n{ "name":"%s", "type":"file", "mtime":"\xff\xfe", "size":3 }\n]\n' % path[7:]
    found = plain_entries(body)
    assert found is not None
    group: dict = {}
    assert add_plain(group, {}, "v:1", path[:7], found) == 0
    assert [(f.volume, f.size, f.mtime_ms) for f in group[b"k"]] == [("v:1", 3, 0)]
