"""Moving one key's replicas onto the volumes placement names now (REBALANCE, rebalance).

The record is the lock: the caller has taken it to PENDING(rebalance) first. Order: copy to the
new volumes, switch the record, then delete from the volumes no longer named, so that at every
moment one complete set of replicas is named by the record or by its PENDING predecessor.
"""

from __future__ import annotations

from collections.abc import Callable

from minikv import replicas
from minikv.http.client import Pool, VolumeError
from minikv.index.record import LIVE, decode_data, encode_data
from minikv.index.store import Store
from minikv.placement import host_of


async def move_key(pool: Pool, store: Store, key: bytes, raw: bytes, volumes: list[str], pending: bytes,
                   is_up: Callable[[str], bool] = lambda host: True, epoch: int = 0) -> None:
    """Move the key whose LIVE record was `raw` (now locked as `pending`) onto `volumes`.
    On failure the new copies are deleted, the old record is back, and VolumeError is raised."""
    old = decode_data(raw)
    sources = [v for v in old.volumes if is_up(host_of(v))] or old.volumes
    copied: list[str] = []
    try:
        for dst in volumes:
            if dst in old.volumes:
                continue
            for i, src in enumerate(sources):
                try:
                    await replicas.copy(pool, key, src, dst)
                    break
                except VolumeError as e:
                    if e.host == host_of(dst) or i == len(sources) - 1:
                        raise
            copied.append(dst)
    except BaseException:
        await replicas.delete_all(pool, copied, key)
        store.cas(key, pending, raw)
        raise
    store.cas(key, pending, encode_data(LIVE, volumes, old.size, old.mtime_ms, old.md5, epoch))
    # a replica that cannot be deleted now is an orphan file: `minikv gc` finds it later
    await replicas.delete_all(pool, [v for v in old.volumes if v not in volumes], key)
