"""Rebuild's records, made fast: a key's LIVE record from the files found for it, with what does
not depend on the key (the volumes' names as bytes, the `volume/svXX` names, the layout's epoch)
computed once per run instead of once per key.

A rebuild makes one record per key of the cluster, so these few microseconds a key are most of
its Python work. The result is byte for byte rebuild.make_record's (tests/test_rebuild_fast.py
pins it against make_record and placement.key2volume); the uncommon cases (copies that differ in
size, copies off their placement) go through make_record itself.
"""

from __future__ import annotations

import struct
from operator import itemgetter

from minikv.config import Config
from minikv.index.record import LIVE, NO_MD5, VOLUMES_AT
from minikv.placement import _md5, epoch

_HEAD = struct.Struct("<BQQ16sI")  # state and record.py's <QQ16sI, packed in one call
_score = itemgetter(0)
assert _HEAD.size == VOLUMES_AT


class Placer:
    """placement.key2volume and rebuild.make_record for one cluster layout."""

    def __init__(self, config: Config):
        self.config = config
        self.encoded = list(enumerate(v.encode() for v in config.volumes))
        self.replicas = config.replicas
        self.subvolumes = config.subvolumes
        if config.subvolumes > 1:
            self.names = [[f"{v}/sv{i:02X}" for i in range(config.subvolumes)] for v in config.volumes]
        else:
            self.names = [[v] for v in config.volumes]
        self.epoch = epoch(config.volumes, config.replicas, config.subvolumes)

    def want(self, key: bytes) -> list[str]:
        """key2volume(key, ...): the volumes ranked by md5(key + name), highest first, stable."""
        ranked = sorted([(_md5(key + e).digest(), i) for i, e in self.encoded], key=_score, reverse=True)
        if self.subvolumes > 1:
            n = self.subvolumes
            return [self.names[i][int.from_bytes(s[12:16], "big") % n] for s, i in ranked[:self.replicas]]
        return [self.names[i][0] for _, i in ranked[:self.replicas]]

    def record(self, key: bytes, found: list) -> tuple[bytes, list]:
        """make_record(key, found, config) (no md5): the record and the copies left out."""
        size = found[0].size
        mtime = found[0].mtime_ms
        for f in found:
            if f.size != size:
                break
            if f.mtime_ms > mtime:
                mtime = f.mtime_ms
        else:
            want = self.want(key)
            if len(found) == len(want):
                for f in found:  # a loop, not all(...): a generator costs more than the check
                    if f.volume not in want:
                        break
                else:
                    # the usual case: every copy where placement puts it, so the record lists placement
                    # a file dated before 1970 (a clock or a restore gone wrong) has a negative mtime
                    return _HEAD.pack(LIVE, size, mtime if mtime > 0 else 0, NO_MD5, self.epoch) + ",".join(want).encode(), []
        from minikv.admin.rebuild import make_record  # a cycle at import time: rebuild imports us

        return make_record(key, found, self.config)
