"""Is this index server's lease on a shared PostgreSQL index still surely its own?

A server whose lease expires (it was stopped, or cut off from the database, for LEASE seconds)
has its writes in flight undone by another server (index/lease.py), which may then let a client
write the same key again. The records are fenced by the takeover, but the uploads to nginx are
not: one still open would, once its last bytes arrive, rename its file over the newer value's.
So a write sends its last bytes (the volumes' commit point) only while the last renewal of the
lease that succeeded was sent less than LEASE/2 seconds ago (renewed there and then if it is
older): the lease then runs for LEASE/2 more at least, and what is left to do in that time is a
send. It narrows the window to a stop between the check and that send; it cannot close it.
A server with an LMDB index has no lease: `renewed` is never called and nothing is refused.
"""

from __future__ import annotations

import time

LEASE = 10.0  # index/lease.py's
_renewed_at: float | None = None  # time.monotonic() when the last successful renewal was sent
_token: str | None = None  # the lease row's token at that renewal
_losses = 0  # times a renewal found the lease lost: writes locked before one never commit
_renew = None  # renews the lease now (index/lease.py renew), given by the server: `use`


def renewed(sent_at: float, token: str) -> None:
    """A renewal sent at `sent_at` (time.monotonic(), one clock for every process) succeeded,
    and the lease row has `token`: one other than before means it was lost and claimed again
    meanwhile, maybe by another worker of this server (index/lease.py renew)."""
    global _renewed_at, _token
    if _token is not None and token != _token:
        lost()
    _token = token
    if _renewed_at is None or sent_at > _renewed_at:
        _renewed_at = sent_at


def use(renew) -> None:
    """`renew()`: renew the lease now; the lease row's token, None when it was lost (index/lease.py)."""
    global _renew
    _renew = renew



def lost() -> None:
    """A renewal found the lease taken over: the writes in flight are another server's to undo."""
    global _losses
    _losses += 1


def epoch() -> int:
    """Taken when a write locks its key, given back to `refused` at its commit."""
    return _losses


def suspect(since: int) -> bool:
    """Must `refused` be asked (a stale renewal, or a loss since the write's lock)? No lease: no."""
    return _renewed_at is not None and (since != _losses or time.monotonic() - _renewed_at >= LEASE / 2)


async def refused(since: int, done: str = "the value was not committed") -> str:
    """"" when a write that locked its key at `epoch()` == `since` may commit now, after renewing
    the lease here if the last renewal is stale (the database was out of reach, and the upkeep's
    next renewal has not come yet); else why not, for its 503. A lease lost since the lock
    refuses it even when claimed again since: its record was undone by another server."""
    if _renewed_at is not None and time.monotonic() - _renewed_at >= LEASE / 2 and _renew is not None:
        sent = time.monotonic()
        try:
            if (token := await _renew()) is not None:
                renewed(sent, token)
            else:
                lost()
        except Exception:  # noqa: BLE001 - the database still out of reach: refused as stale
            pass
    if since != _losses:
        return ("this index server's lease on the index was taken over since the key was locked: another "
                f"server undid the lock, so {done}")
    if time.monotonic() - _renewed_at >= LEASE / 2:
        return (f"this index server last renewed its lease on the index {time.monotonic() - _renewed_at:.0f}s "
                f"ago and cannot now (the database out of reach?): {done}")
    return ""
