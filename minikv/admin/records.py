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

from minikv.config import Config
from minikv.index.record import LIVE, NO_MD5, VOLUMES_AT
from minikv.placement import _md5, epoch

_HEAD = struct.Struct("<BQQ16sI")  # state and record.py's <QQ16sI, packed in one call
TAGS = 2**32 - 1  # a score's tag is this minus its volume's place in -volumes
assert _HEAD.size == VOLUMES_AT


class Placer:
    """placement.key2volume and rebuild.make_record for one cluster layout."""

    def __init__(self, config: Config):
        self.config = config
        self.replicas = config.replicas
        self.subvolumes = config.subvolumes
        if config.subvolumes > 1:
            names = [[f"{v}/sv{i:02X}" for i in range(config.subvolumes)] for v in config.volumes]
        else:
            names = [[v] for v in config.volumes]
        # each volume's name to hash, and a tag that follows its score through a plain sort of
        # bytes: TAGS - its place, so that equal scores keep the order of -volumes (stable, as
        # key2volume's sort), with no key function called per item
        self.tagged = [(v.encode(), (TAGS - i).to_bytes(4, "big")) for i, v in enumerate(config.volumes)]
        self.names = {TAGS - i: n for i, n in enumerate(names)}
        chosen = min(config.replicas, len(config.volumes))
        # the chosen scores' last four bytes (the subvolume) and tags, read in one call
        self.unpack = struct.Struct(">" + "12xII" * chosen).unpack
        self.chosen = chosen
        self.epoch = epoch(config.volumes, config.replicas, config.subvolumes)

    def want(self, key: bytes) -> list[str]:
        """key2volume(key, ...): the volumes ranked by md5(key + name), highest first, stable."""
        scored = [_md5(key + e).digest() + tag for e, tag in self.tagged]
        scored.sort(reverse=True)
        v = self.unpack(b"".join(scored[:self.chosen]))
        names, n = self.names, self.subvolumes
        if self.chosen == 3:  # the usual layout, spelled out: a third of this function's time
            return [names[v[1]][v[0] % n], names[v[3]][v[2] % n], names[v[5]][v[4] % n]]
        pairs = iter(v)
        return [names[tag][score % n] for score, tag in zip(pairs, pairs)]

    def record(self, key: bytes, found: list) -> tuple[bytes, list]:
        """make_record(key, found, config) (no md5): the record and the copies left out."""
        _, size, mtime = found[0]
        for _, s, m in found:  # Found's fields unpacked: no attribute looked up
            if s != size:
                break
            if m > mtime:
                mtime = m
        else:
            want = self.want(key)
            if len(found) == len(want):
                for f in found:  # a loop, not all(...): a generator costs more than the check
                    if f[0] not in want:
                        break
                else:
                    # the usual case: every copy where placement puts it, so the record lists placement
                    # a file dated before 1970 (a clock or a restore gone wrong) has a negative mtime
                    return _HEAD.pack(LIVE, size, mtime if mtime > 0 else 0, NO_MD5, self.epoch) + ",".join(want).encode(), []
        from minikv.admin.rebuild import make_record  # a cycle at import time: rebuild imports us

        return make_record(key, found, self.config)
