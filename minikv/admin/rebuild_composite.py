"""Rebuild's last step: the records of S3 multipart objects, from their manifests.

A multipart object has no file under its own key (s3/composite.py): its bytes are its upload's
parts, which the walk found and recorded as the ordinary values they are, and its record is
written back here from the manifest (part number 0 of the upload, also recorded by the walk):
one small read per manifest, from a local folder when rebuild was given them, else from a
replica. A key that holds a record already keeps the newer of the two (by mtime): an object
overwritten after a crash left the old manifest behind must not come back over the new value.
A manifest whose parts are not all there is reported and left out (the object cannot be read).
"""

from __future__ import annotations

from minikv import replicas
from minikv.admin.common import show
from minikv.admin.progress import Progress
from minikv.admin.rebuild_pg import add_many as pg_add_many
from minikv.http.client import Pool, VolumeError
from minikv.index.record import LIVE, PENDING, decode_data, encode_composite, is_composite
from minikv.index.store import Store
from minikv.placement import key2path
from minikv.s3.composite import MANIFEST_LIMIT, PART_PREFIX, manifest_upload, parse_manifest, part_key

PAGE = 10_000  # records read per scan of the parts


async def _manifest_bytes(pool: Pool, dirs: dict[str, str], key: bytes, raw: bytes) -> bytes | None:
    for volume in decode_data(raw).volumes:
        host, _, sub = volume.partition("/")
        try:
            if dirs:
                with open(dirs[host] + (f"/{sub}" if sub else "") + key2path(key), "rb") as f:
                    return f.read(MANIFEST_LIMIT)
            where, path = replicas.locate(volume, key)
            resp = await pool.request(where, "GET", path)
            if resp.status == 200:
                return resp.body
        except (OSError, KeyError, VolumeError):
            continue
    return None


def _newer(key: bytes, current: bytes | None, new: bytes) -> bytes | None:
    """What a key already recorded becomes: the composite record `new` if it is the newer value."""
    if current is None:
        return new
    if current[0] == PENDING or current == new or decode_data(current).mtime_ms >= decode_data(new).mtime_ms:
        return None
    return new


async def composites(store, pool: Pool, dirs: dict[str, str], progress: Progress) -> None:
    """Write the record of every multipart object whose manifest the index now holds."""
    pos = PART_PREFIX
    while True:
        pairs, pos = store.scan(PART_PREFIX, pos, 0, None, PAGE)
        found = dict(pairs)
        for key, raw in pairs:
            if not key.endswith(b"/00000") or raw[0] != LIVE or is_composite(raw):
                continue
            upload_id = manifest_upload(key)
            if upload_id is None:  # a file on a volume can be named anything
                progress.add("failed")
                progress.problem(f"{show(key)}: no upload's manifest (minikv makes no such upload id): left as it is")
                continue
            data = await _manifest_bytes(pool, dirs, key, raw)
            parsed = parse_manifest(data) if data is not None else None
            if parsed is None:
                progress.add("failed")
                progress.problem(f"{show(key)}: multipart manifest unreadable: the object it makes is not restored")
                continue
            obj, mtime, numbers = parsed
            sizes = []
            for n in numbers:
                part = found.get(part_key(upload_id, n)) or store.get(part_key(upload_id, n))
                sizes.append(decode_data(part).size if part is not None and part[0] == LIVE else None)
            if None in sizes:
                progress.add("failed")
                progress.problem(f"{show(obj)}: multipart object with {sizes.count(None)} part(s) missing on the "
                                 "volumes: not restored")
                continue
            record = encode_composite(LIVE, sum(sizes), mtime, upload_id, numbers)
            items = [(obj, record)]
            added = store.add_many(items, _newer) if isinstance(store, Store) else pg_add_many(store, items, _newer)
            progress.add("written", added)
            progress.add("multipart")
        if not pos:
            return
