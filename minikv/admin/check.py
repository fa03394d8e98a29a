"""Is a key's copy on a volume right? Shared by verify, repair and rebuild -md5.

A replica is right when its file is there with the record's size and, when asked (-md5), its
content hashes to the record's md5. A record without an md5 (`-md5sum=false`, or made by
rebuild) is judged by the replicas themselves: the md5 most of them share wins, and with no
majority none of them can be called wrong (reported as a conflict, left alone).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import NamedTuple

from minikv import replicas
from minikv.http.client import Pool, VolumeError
from minikv.index.record import NO_MD5, Data, decode_composite


class Replica(NamedTuple):
    volume: str
    size: int | None  # None: no file
    md5: bytes | None  # None: not read (or no file)
    error: str | None  # the volume could not be asked


async def inspect_one(pool: Pool, volume: str, key: bytes, with_md5: bool) -> Replica:
    try:
        if with_md5:
            got = await replicas.md5_of(pool, volume, key)
            return Replica(volume, *(got if got else (None, None)), None)
        return Replica(volume, await replicas.exists(pool, volume, key), None, None)
    except VolumeError as e:
        return Replica(volume, None, None, str(e))


async def inspect(pool: Pool, key: bytes, volumes: list[str], with_md5: bool) -> list[Replica]:
    return list(await asyncio.gather(*(inspect_one(pool, v, key, with_md5) for v in volumes)))


KINDS = ("missing", "wrong size", "wrong md5", "unreachable")


class Verdict(NamedTuple):
    good: list[str]  # replicas holding a right copy, in record order
    problems: list[tuple[str, str, str]]  # (volume, kind, detail); kinds are KINDS
    conflict: bool  # md5s disagree and nothing says which is right


def judge(record: Data, found: list[Replica]) -> Verdict:
    good: list[str] = []
    problems: list[tuple[str, str, str]] = []
    sized = []
    for r in found:
        if r.error is not None:
            problems.append((r.volume, "unreachable", r.error))
        elif r.size is None:
            problems.append((r.volume, "missing", "no file"))
        elif r.size != record.size:
            problems.append((r.volume, "wrong size", f"{r.size} bytes, the record says {record.size}"))
        else:
            sized.append(r)
    want = record.md5
    conflict = False
    if any(r.md5 is not None for r in sized) and want == NO_MD5:
        (top, n), *rest = Counter(r.md5 for r in sized).most_common()
        if rest and n == rest[0][1]:
            conflict, want = True, None  # no majority: cannot tell which copy is right
        else:
            want = top
    for r in sized:
        if r.md5 is None or want is None or r.md5 == want:
            good.append(r.volume)
        else:
            problems.append((r.volume, "wrong md5", f"md5 {r.md5.hex()}, expected {want.hex()}"))
    return Verdict(good, problems, conflict)


def composite_missing(store, key: bytes, raw: bytes) -> str | None:
    """What an S3 multipart object (composite record `raw`) lacks: its manifest and parts are
    keys checked as any other, so here only that each still has a record. None when whole (or
    when the key changed meanwhile)."""
    # here, not at the top: the S3 modules cost each process of a walk ~0.4 CPU-s to import
    from minikv.s3.composite import manifest_key, part_key

    upload_id, numbers = decode_composite(raw)
    missing = [k for k in [manifest_key(upload_id)] + [part_key(upload_id, n) for n in numbers]
               if store.get(k) is None]
    if not missing or store.get(key) != raw:
        return None
    part = "manifest" if missing[0] == manifest_key(upload_id) else f"part {int(missing[0][-5:])}"
    return f"multipart object whose {part} has no record ({len(missing)} missing)"
