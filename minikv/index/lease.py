"""Crash recovery across the index servers sharing one PostgreSQL index.

Each server has an id (host:port, index/pg.server_id) and a lease row in `minikv_leases` that its
workers renew every RENEW_EVERY seconds; the `token` of the row is this run's, so a second
process started with the same id cannot renew it. The PENDING records a server's workers make
carry its id in `owner`.

- At start (before the workers fork) a server claims its row: at once when there is none or it
  has expired, else it waits out the lease (a previous run of it killed a moment ago, or the
  same id running elsewhere: then it gives up). It then resolves every PENDING record of its id:
  no worker of its own runs yet, so they are a previous run's.
- When one of its workers dies, the supervisor resolves that worker's records (its pid is in
  the record).
- Every worker looks every RENEW_EVERY seconds for leases that have expired (and for owners of
  PENDING records that have no lease at all). Taking one is a compare-and-set on the row, so
  exactly one live server wins it; the winner makes the dead server's records its own in one
  statement (`owner` -> "<its id>#recovering"), which fences them: the dead server, should it only
  have been stopped or cut off, can change none of them any more. Then each is resolved as
  index/recovery.py resolves a dead worker's, and the row is dropped.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time

from minikv.http.client import Pool
from minikv.index import fence
from minikv.index.pg import PgStore, connect, create_schema, describe, start_error
from minikv.index.record import decode_pending, now_ms
from minikv.index.recovery import owner_alive, resolve
from minikv.index.store import StoreError

LEASE = fence.LEASE  # seconds a server's records stay its own after its last renewal
RENEW_EVERY = 2.0
ORPHAN_AGE = 5.0  # seconds: a dead worker's record older than this was missed by its supervisor
RECOVERING = "#recovering"  # suffix of the owner of records taken over, being resolved


def log(msg: str) -> None:
    from minikv.server import log as server_log

    server_log(msg)


async def _claim(conn, me: str, token: str) -> bool:
    """Take the lease row of `me` if it is free (absent or expired)."""
    return bool(await conn.fetchval(
        "INSERT INTO minikv_leases (id, token, expires) VALUES ($1, $2, now() + make_interval(secs => $3)) "
        "ON CONFLICT (id) DO UPDATE SET token = $2, expires = now() + make_interval(secs => $3) "
        "WHERE minikv_leases.expires < now() OR minikv_leases.token = $2 RETURNING true", me, token, LEASE))


async def start(db: str, me: str, pool: Pool) -> tuple[str, int]:
    """At a server's start: the schema, this run's lease (its token), then the records a
    previous run left in flight, resolved. Returns (token, records resolved)."""
    conn = await connect(db)
    try:
        await create_schema(conn)
        token = secrets.token_hex(8)
        deadline = time.monotonic() + LEASE + RENEW_EVERY * 2
        seen, since, waiting = None, time.monotonic(), False
        while not await _claim(conn, me, token):
            # a row that nobody renews for two renewal periods is a dead run's: take it at once
            # (a compare-and-set on what we saw), instead of waiting for the whole lease
            row = await conn.fetchrow("SELECT token, expires FROM minikv_leases WHERE id = $1", me)
            if row is not None and tuple(row) != seen:
                seen, since = tuple(row), time.monotonic()
            elif row is not None and time.monotonic() - since > 2 * RENEW_EVERY + 0.5:
                if await conn.fetchval("UPDATE minikv_leases SET token = $1, expires = now() + "
                                       "make_interval(secs => $2) WHERE id = $3 AND token = $4 AND expires = $5 "
                                       "RETURNING true", token, LEASE, me, *seen):
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"minikv server: another index server with id {me} renews its lease in "
                                 f"{describe(db)}: two servers cannot share a host and port")
            if not waiting:
                waiting = True
                log(f"the lease of server id {me} is held (a previous run killed moments ago?); waiting "
                    f"for it to stop being renewed")
            await asyncio.sleep(0.25)
    finally:
        await conn.close()
    store = PgStore(db, me, pool_size=2)
    try:
        n = await resolve_owner(store, pool, me)
    finally:
        await store.close()
    return token, n


def start_sync(db: str, me: str, pool_factory) -> str:
    """`start` for the supervisor: one line and exit code 1 for a database that cannot be used."""
    async def run():
        pool = pool_factory()
        try:
            return await start(db, me, pool)
        finally:
            pool.close()

    try:
        token, n = asyncio.run(run())
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to use the database ends in one line
        cause = e.__cause__ if isinstance(e, StoreError) and e.__cause__ else e
        print(f"minikv server: {start_error(db, cause)}", file=sys.stderr)
        raise SystemExit(1) from None
    if n:
        log(f"undid {n} write(s) a previous run of server {me} left in flight")
    return token


async def resolve_owner(store: PgStore, pool: Pool, dead: str) -> int:
    """Make the PENDING records of server `dead` (and of its unfinished takeovers) this
    server's, in one statement, then resolve each. Returns how many."""
    mine = store.owner + RECOVERING
    rows = await store._run("fetch", "UPDATE minikv_keys SET owner = $1 WHERE owner = $2 OR owner = $3 "
                            "RETURNING k, rec", mine, dead, dead + RECOVERING)
    for key, raw in rows:
        await resolve(pool, key, raw, lambda k, e, n: store.cas(k, e, n, owner=mine))
    return len(rows)


async def _claim_and_resolve(store: PgStore, pool: Pool, key: bytes, raw: bytes) -> bool:
    """Resolve one of this server's records, unless another of its processes got it first: the
    record is first made "<id>#recovering" by a compare-and-set, so only one resolves it."""
    mine = store.owner + RECOVERING
    if not await store._run("fetchval", "UPDATE minikv_keys SET owner = $1 WHERE k = $2 AND rec = $3 "
                            "AND owner = $4 RETURNING true", mine, key, raw, store.owner):
        return False
    await resolve(pool, key, raw, lambda k, e, n: store.cas(k, e, n, owner=mine))
    return True


async def resolve_worker(store: PgStore, pool: Pool, pid: int) -> int:
    """The records of this server's worker `pid`, which died."""
    n = 0
    for key, raw in await store.pending_of(store.owner):
        if decode_pending(raw).owner == pid:
            n += await _claim_and_resolve(store, pool, key, raw)
    return n


async def resolve_dead_workers(store: PgStore, pool: Pool) -> int:
    """The records of this server's workers that are gone and were not resolved when they died
    (the supervisor could not reach the database then). Only records older than ORPHAN_AGE, so
    as never to race the supervisor resolving a worker that died a moment ago."""
    n = 0
    old = now_ms() - ORPHAN_AGE * 1000
    for key, raw in await store.pending_of(store.owner):
        p = decode_pending(raw)
        if p.started_ms < old and not owner_alive(p.owner, p.started_ms):
            n += await _claim_and_resolve(store, pool, key, raw)
    return n


async def renew(store: PgStore, token: str) -> str | None:
    """Push this server's lease RENEW_EVERY... LEASE seconds on: the row's token, None when the
    lease was lost (taken over while this server could not renew it). It is then claimed again
    once the taker is done, as `<token>#<random>`: every worker of the server renews the one row,
    so a token that changed tells each of them the lease was lost meanwhile (index/fence.py),
    whichever of them claimed it again."""
    got = await store._run("fetchval", "UPDATE minikv_leases SET expires = now() + make_interval(secs => $3) "
                           "WHERE id = $1 AND (token = $2 OR token LIKE $2 || '#%') RETURNING token",
                           store.owner, token, LEASE)
    if got is not None:
        return got
    await store._run("fetchval", "INSERT INTO minikv_leases (id, token, expires) VALUES "
                     "($1, $2, now() + make_interval(secs => $3)) ON CONFLICT (id) DO NOTHING",
                     store.owner, f"{token}#{secrets.token_hex(4)}", LEASE)
    return None


async def take_over(store: PgStore, pool: Pool) -> int:
    """Resolve the records of every server whose lease expired (or that has records and no
    lease); each such server is taken by one live server only. Returns how many records."""
    me = store.owner
    taker = "taken by " + me + " " + secrets.token_hex(4)
    dead = [r[0] for r in await store._run(
        "fetch", "UPDATE minikv_leases SET token = $1, expires = now() + make_interval(secs => $2) "
        "WHERE expires < now() AND id <> $3 RETURNING id", taker, LEASE, me)]
    # owners with records but no lease row: a takeover that died half-way, a row dropped by hand
    for (owner,) in await store._run(
            "fetch", "SELECT DISTINCT split_part(owner, '#', 1) FROM minikv_keys WHERE owner IS NOT NULL "
            "AND split_part(owner, '#', 1) NOT IN (SELECT id FROM minikv_leases)"):
        if owner != me and await store._run(
                "fetchval", "INSERT INTO minikv_leases (id, token, expires) VALUES "
                "($1, $2, now() + make_interval(secs => $3)) ON CONFLICT (id) DO NOTHING RETURNING true",
                owner, taker, LEASE):
            dead.append(owner)
    n = 0
    for owner in dead:
        got = await resolve_owner(store, pool, owner)
        await store._run("execute", "DELETE FROM minikv_leases WHERE id = $1 AND token = $2", owner, taker)
        if got:
            log(f"server {owner} stopped renewing its lease: undid {got} write(s) it left in flight")
        n += got
    return n


async def keep(store: PgStore, pool: Pool, token: str) -> None:
    """A worker's part: renew this server's lease, take over dead servers'. Runs until
    cancelled; a database that is down is only waited for."""
    held = True
    while True:
        try:
            sent = time.monotonic()
            got = await renew(store, token)
            renewed = got is not None
            if renewed:
                fence.renewed(sent, got)  # a write's last bytes go only while this is recent
            else:
                fence.lost()  # and never for a write locked before this
            if not renewed and held:
                log("this server's lease was taken over (the database was out of reach for longer than "
                    f"{LEASE:.0f}s): its writes in flight were undone by another server")
            held = renewed
            await take_over(store, pool)
            if await resolve_dead_workers(store, pool):
                log("undid writes left in flight by workers of this server that died while the database was "
                    "out of reach")
        except StoreError:
            pass  # the database is down: requests say so; we try again
        except Exception as e:  # noqa: BLE001 - a bug here must not stop the renewals
            log(f"lease upkeep failed: {e!r}; trying again")
        await asyncio.sleep(RENEW_EVERY)


def release_sync(db: str, me: str, token: str) -> None:
    """At a clean stop: drop this run's lease row, so that a restart need not wait it out.
    Records still PENDING (none after a clean stop) would be taken over as those of a server
    without a lease."""
    async def run() -> None:
        conn = await connect(db)
        try:
            await conn.execute("DELETE FROM minikv_leases WHERE id = $1 AND (token = $2 OR token LIKE $2 || '#%')",
                               me, token)
        finally:
            await conn.close()

    try:
        asyncio.run(run())
    except Exception:  # noqa: BLE001 - the lease then expires by itself
        pass
