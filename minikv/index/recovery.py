"""Undoing the writes a crash interrupted, so no key stays locked (409) and none is a phantom.

Every PENDING record names the volumes it was touching and the record it replaced:
- put: the value was never acknowledged; delete whatever reached the volumes, drop the record;
- delete: finish it; if a replica cannot be deleted now, leave the key UNLINKED (DELETE again);
- rebalance: delete the new copies, put the old record back (its replicas were never touched).
"""

from __future__ import annotations

from minikv import replicas
from minikv.http.client import Pool
from minikv.index.record import OP_DELETE, OP_REBALANCE, UNLINKED, decode_data, decode_pending, with_state
from minikv.index.store import Store


async def recover(store: Store, pool: Pool, owner: int | None = None) -> int:
    """Resolve the PENDING records of `owner` (a worker pid), or all of them when None
    (at start-up, when no worker runs). Returns how many were resolved."""
    resolved = 0
    for key, raw in store.pending_records():
        p = decode_pending(raw)
        if owner is not None and p.owner != owner:
            continue
        if p.op == OP_REBALANCE and p.previous:
            old = decode_data(p.previous).volumes
            await replicas.delete_all(pool, [v for v in p.volumes if v not in old], key)
            store.cas(key, raw, p.previous)
        else:
            failed = await replicas.delete_all(pool, p.volumes, key)
            if failed and p.op == OP_DELETE and p.previous:
                store.cas(key, raw, with_state(p.previous, UNLINKED))
            else:
                store.cas(key, raw, None)  # what could not be deleted is an orphan for `gc`
        resolved += 1
    return resolved
