"""The index in PostgreSQL: the same records as the LMDB store (index/record.py), shared by any
number of index servers.

One table holds key -> record bytes (`k bytea` primary key: PostgreSQL orders bytea by byte
value, as LMDB orders keys, so `?list` is a range scan of the primary key). Every state change
is one statement that is its own compare-and-set, done by the database:

    absent -> R      INSERT ... ON CONFLICT (k) DO NOTHING
    E -> R           UPDATE ... WHERE k = $1 AND rec = E
    E -> absent      DELETE ... WHERE k = $1 AND rec = E

so two servers can never both take a key's lock. The compare-and-sets a worker makes while its
previous ones are out go together, as one statement with the same row-by-row conditions and one
commit (index/pg_write.py), on a connection the worker keeps for them besides its pool.

A PENDING record also names its owner in the `owner` column (the server's id; the worker's pid
is inside the record): a compare-and-set from a PENDING record only succeeds for its owner. That
is the fence of crash recovery across servers (index/lease.py): a server that takes over a dead
one's records first makes them its own, in one statement, so a server that only looked dead
(stopped, cut off) can no longer complete the writes it had in flight.

SQL used: bytea, a primary key, a partial index, INSERT ... ON CONFLICT, UPDATE/DELETE ...
RETURNING, timestamptz arithmetic with now(). No stored procedures, no advisory locks besides
one around the creation of the schema.
"""

from __future__ import annotations

import asyncio
import os
import time
from urllib.parse import parse_qs, unquote, unquote_plus, urlsplit

from minikv.index.record import PENDING, check_transition
from minikv.index.store import StoreError, top_of

SCHEMA_VERSION = 1
MAX_KEY = 511  # the same limit as LMDB's, so that an index moves between engines whole
CONNECT_TIMEOUT = 5.0  # seconds to open a connection: a host that drops packets is down, not slow
QUERY_TIMEOUT = 10.0  # seconds for one statement
WAIT = 10.0  # seconds a statement waits for a database it cannot reach (a restart) before its 503
RETRIES = 5  # new connections a read, or a compare-and-set whose outcome was found, tries after a break
# the share of QUERY_TIMEOUT a statement waits for a row another transaction holds: the database
# gives up first (an error: nothing applied), so no statement the client gave up on goes on later.
# The group commit waits less: one held row must not hold up the worker's other writes
LOCK_WAIT, GROUP_LOCK_WAIT = 0.8, 0.1
POOL_SIZE = 8  # connections per worker: a request holds one for one statement at a time
RECENT = 4096  # records a process keeps as guesses for its next writes (PgStore.recent)
_SCHEMA_LOCK = 0x6D696E696B76  # "minikv": serialises the first start of several servers

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS minikv_schema (version integer NOT NULL)",
    "CREATE TABLE IF NOT EXISTS minikv_keys (k bytea PRIMARY KEY, rec bytea NOT NULL, owner text)",
    # recovery looks up the records in flight of one owner, never scans the keys
    "CREATE INDEX IF NOT EXISTS minikv_keys_owner ON minikv_keys (owner) WHERE owner IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS minikv_leases (id text PRIMARY KEY, token text NOT NULL, "
    "expires timestamptz NOT NULL)",
]


def is_url(db: str) -> bool:
    """Does -db name a PostgreSQL database (rather than an LMDB folder)?"""
    return db.startswith(("postgresql://", "postgres://"))


def describe(db: str) -> str:
    """The URL without its password (in the user part, or libpq's `password=` parameter), for
    messages, logs and the status page."""
    parts = urlsplit(db)
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1))
    if _secret_params(parts.query):
        parts = parts._replace(query="&".join(
            item.partition("=")[0] + "=***" if _is_secret(item) else item for item in parts.query.split("&")))
    return parts.geturl()


# libpq's parameters that hold a secret (sslpassword: the client key's passphrase), by their
# decoded names, as the driver reads them (`pass%77ord=` is a password too)
_SECRET_PARAMS = frozenset({"password", "sslpassword"})


def _is_secret(item: str) -> bool:
    name, eq, _ = item.partition("=")
    return bool(eq) and unquote_plus(name).strip().lower() in _SECRET_PARAMS


def _secret_params(query: str) -> bool:
    return any(_is_secret(item) for item in query.split("&"))


def _has_password(db: str) -> bool:
    parts = urlsplit(db)
    return parts.password is not None or _secret_params(parts.query)


def on_this_host(db: str) -> bool:
    """Does the URL reach PostgreSQL on this host: every host it names a unix socket (libpq's
    default, when it names none) or a loopback address?"""
    parts = urlsplit(db)
    given = parse_qs(parts.query).get("host") or [unquote(parts.netloc.rpartition("@")[2])]
    for host in (",".join(given) if given != [""] else os.environ.get("PGHOST", "")).split(","):
        if host.startswith("["):  # [::1]:5432
            host = host[1:].partition("]")[0]
        elif not host.startswith("/") and host.count(":") == 1:
            host = host.partition(":")[0]
        if not (host == "" or host.startswith(("/", "@")) or host in ("localhost", "::1")
                or host.startswith("127.")):
            return False
    return True


def default_workers(cores: int) -> int:
    """Index workers when -workers is not given and PostgreSQL runs on this host: its backends
    do part of every request's work on the same cores, and a worker per core left each worker
    waking for a few requests at a time (on 2 cores, one worker served thrash at about twice
    the rate of two, with a third less CPU per loop)."""
    return max(1, cores // 2)


def password_warning(db: str) -> str:
    """A warning when a database URL given on the command line holds a password, which every
    user of the machine can read there (ps); "" otherwise."""
    if is_url(db) and _has_password(db):
        return ("warning: the password in the -db URL is visible to every user of this machine (ps); "
                "leave it out and set PGPASSWORD, or put it in ~/.pgpass")
    return ""


class IndexUnavailable(StoreError):
    """The database cannot be reached, or refused the statement: nothing changed, unless
    `maybe_done` (the connection broke while the statement was out: it may have been applied).
    `refused`: the database answered the statement with an error."""

    maybe_done = False
    refused = False
    locked = False


def _down(e: BaseException, maybe_done: bool = False, refused: bool = False) -> IndexUnavailable:
    down = IndexUnavailable(f"the index database is unavailable ({type(e).__name__}: {e}); try again")
    down.maybe_done = maybe_done
    down.refused = refused
    return down


def start_error(db: str, e: BaseException) -> str:
    """One line saying why the database at `db` cannot be used, for the start of a server."""
    import asyncpg

    where = describe(db)
    if isinstance(e, asyncpg.InvalidPasswordError):
        return f"-db {where}: the password was refused (or the user is unknown): {e}"
    if isinstance(e, asyncpg.InvalidCatalogNameError):
        return f"-db {where}: the database does not exist: create it (createdb) or fix the URL: {e}"
    if isinstance(e, asyncpg.InvalidAuthorizationSpecificationError):
        return f"-db {where}: the server refused this user: {e}"
    if isinstance(e, (OSError, asyncio.TimeoutError)):
        return f"-db {where}: cannot reach the database server: {e or 'timed out'}"
    if isinstance(e, (ValueError, asyncpg.ClientConfigurationError)):
        return f"-db {where}: not a usable PostgreSQL URL: {e}"
    if isinstance(e, asyncpg.PostgresError):
        return f"-db {where}: the database refused minikv's schema: {e}"
    return f"-db {where}: {type(e).__name__}: {e}"


async def connect(db: str, lock_wait: float = 0.0):
    """One connection (libpq's environment variables fill in what the URL leaves out);
    `lock_wait`: the share of QUERY_TIMEOUT its statements wait for a row lock (0: no limit)."""
    import asyncpg

    settings = {"lock_timeout": f"{int(lock_wait * QUERY_TIMEOUT * 1000)}ms"} if lock_wait else None
    return await asyncpg.connect(db, timeout=CONNECT_TIMEOUT, command_timeout=QUERY_TIMEOUT,
                                 server_settings=settings)


async def make_tables(conn, statements, version_table: str, version: int, lock: int = _SCHEMA_LOCK) -> int:
    """Run `statements` (CREATE ... IF NOT EXISTS) in one transaction under the advisory `lock`,
    so servers starting together make them once, and record `version` in `version_table` when it
    holds none: the version found (a later one is the caller's to refuse)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
        for statement in statements:
            await conn.execute(statement)
        found = await conn.fetchval(f"SELECT max(version) FROM {version_table}")
        if found is None:
            await conn.execute(f"INSERT INTO {version_table} (version) VALUES ($1)", version)
            return version
        return found


async def create_schema(conn) -> None:
    """Make the tables on first use; refuse a schema a later minikv made."""
    if (version := await make_tables(conn, SCHEMA, "minikv_schema", SCHEMA_VERSION)) > SCHEMA_VERSION:
        raise RuntimeError(f"the index schema is version {version}, made by a later minikv; this one "
                           f"knows version {SCHEMA_VERSION}: run the later minikv")


# the database's answers that say the connection is going away (an operator's shutdown or
# pg_terminate_backend, a server that cannot take it now, a connection exception): like a break
_GOING = ("57P01", "57P02", "57P03")


async def _execute(conn, method: str, query: str, args: tuple):
    """`conn.method(query, *args)`. The database's error is IndexUnavailable (refused: nothing
    was applied; `locked`: a row lock was waited for too long); a connection that breaks
    meanwhile is closed, and then the statement may have been applied: IndexUnavailable
    (maybe_done)."""
    import asyncpg

    try:
        return await getattr(conn, method)(query, *args)
    except asyncpg.PostgresError as e:
        if not (e.sqlstate in _GOING or (e.sqlstate or "").startswith("08")):
            down = _down(e, refused=True)
            down.locked = isinstance(e, asyncpg.LockNotAvailableError)
            raise down from None
        conn.terminate()
        raise _down(e, maybe_done=True) from None
    except BaseException as e:  # the connection broke (asyncpg's own errors included), or we were cancelled
        conn.terminate()  # never used again in whatever state it is left
        if not isinstance(e, Exception):
            raise
        raise _down(e, maybe_done=True) from None


TOP_STEPS = 2000  # keys outside any folder (`/flat`) one listing of folders may probe, besides the folders

# the loose index scan of top_folders: each step is the first key past the previous one's folder
# ("/name/..." -> "/name0": "0" follows "/"), or past the previous key when it is in no folder
_PAST = ("CASE WHEN position('\\x2f'::bytea IN substring(w.k FROM 2)) > 1 "
         "THEN substring(w.k FROM 1 FOR position('\\x2f'::bytea IN substring(w.k FROM 2))) || '\\x30'::bytea "
         "ELSE w.k || '\\x00'::bytea END")
_WALK_TOPS = (
    "WITH RECURSIVE walk(k, n, f) AS ("
    "SELECT (SELECT k FROM minikv_keys WHERE k >= $1 AND k < '\\x30'::bytea ORDER BY k LIMIT 1), 1, 0 "
    "UNION ALL "
    f"SELECT (SELECT m.k FROM minikv_keys m WHERE m.k >= {_PAST} AND m.k < '\\x30'::bytea ORDER BY m.k LIMIT 1), "
    "w.n + 1, w.f + (position('\\x2f'::bytea IN substring(w.k FROM 2)) > 1)::int "
    "FROM walk w WHERE w.k IS NOT NULL AND w.n < $2 "
    "AND w.f + (position('\\x2f'::bytea IN substring(w.k FROM 2)) > 1)::int < $3"
    ") SELECT k FROM walk ORDER BY n")


def _past_top(key: bytes) -> bytes:
    top = top_of(key)
    return top[:-1] + b"0" if top is not None else key + b"\0"


def prefix_end(prefix: bytes) -> bytes | None:
    """The first key after every key that starts with `prefix` (None: there is none)."""
    p = prefix.rstrip(b"\xff")
    return p[:-1] + bytes((p[-1] + 1,)) if p else None


class PgStore:
    """The Store interface (index/store.py) over a pool of connections; every call is a
    coroutine. `owner` is the id this server's PENDING records carry."""

    walks_tops = True  # top_folders walks the keys (no table of folders): s3/buckets.py

    def __init__(self, db: str, owner: str, pool_size: int = POOL_SIZE):
        self.db = db
        self.path = describe(db)
        self.owner = owner
        self.pool_size = pool_size
        self._pool = None
        self._writes = None  # the group commit of compare-and-sets (index/pg_write.py), made on first use
        self._held = None  # its connection: one of its own, not the pool's (run_held)
        self._unreachable: float | None = None  # since when the database cannot be reached (_wait_for_db)
        self._failed = 0.0  # when a connection last failed to open
        # the records this process read or wrote last, by key: a guess of what a write may expect
        # (api/app_pg.py), checked by its compare-and-set, never an answer to a read
        self.recent: dict[bytes, bytes] = {}

    async def _get_pool(self):
        """This process's connections (index/pg_conns.py): `acquire()` as a context manager."""
        if self._pool is None:
            from minikv.index.pg_conns import Conns

            # none opened until asked for: a worker starts (and answers 503) while the database
            # is down. Nothing is reset when a connection comes back: we leave no session state
            # behind, and one given back inside a transaction is dropped
            self._pool = Conns(lambda: connect(self.db, LOCK_WAIT), self.pool_size)
        return self._pool

    async def _run(self, method: str, query: str, *args, read: bool = False):
        """One statement on a pooled connection. `read`: a read-only statement, tried again on a
        new connection when its connection turns out broken (the database restarted since the
        pool opened it, or is going down), so that a restart costs no client an error."""
        pool = self._pool or await self._get_pool()
        tries = RETRIES if read else 0
        while True:
            conn = await self._take(pool.take)
            try:
                return await _execute(conn, method, query, args)
            except IndexUnavailable as e:
                if not (e.maybe_done and tries):
                    raise
                tries -= 1
                pool.drop_idle()  # opened before whatever broke this one (a restart breaks them all)
            finally:
                pool.give(conn)  # a broken one is dropped

    async def _take(self, opening):
        """A connection from `opening()`; see _wait_for_db when there is none."""
        try:
            conn = await opening()
        except Exception as e:  # noqa: BLE001 - the database cannot be reached: nothing was sent
            return await self._wait_for_db(opening, e)
        self._unreachable = None
        return conn

    async def _wait_for_db(self, opening, e: Exception):
        """A connection from `opening()` once the database can be reached again (a restart takes
        a second or two): tried until WAIT seconds after this process first failed to reach it,
        then IndexUnavailable. Past that, each call tries once: a database that stays down does
        not hold every request WAIT seconds. An outage whose last failure is over WAIT old is
        taken for over: its waiters may all have gone (cancelled) before it ended, and its clock
        left behind would fail a later outage's every request at once."""
        pause = 0.05
        while True:
            now = time.monotonic()
            if self._unreachable is None or now - self._failed > WAIT:
                self._unreachable = now
            self._failed = now
            if now - self._unreachable >= WAIT:
                raise _down(e) from None
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.5)
            try:
                conn = await opening()
            except Exception as again:  # noqa: BLE001 - as in _take
                e = again
                continue
            self._unreachable = None
            return conn

    async def run_held(self, method: str, query: str, *args):
        """One statement on this process's own connection, outside the pool, for the group
        commit (index/pg_write.py), which never has two out at once: no checkout and return per
        statement. Errors as _run's; a broken connection is replaced at the next statement. It
        waits GROUP_LOCK_WAIT for a row lock (IndexUnavailable.locked: index/pg_write.py)."""
        if self._held is None or self._held.is_closed():
            self._held = await self._take(lambda: connect(self.db, GROUP_LOCK_WAIT))
        return await _execute(self._held, method, query, args)

    async def close(self) -> None:
        if self._held is not None:
            self._held.terminate()
            self._held = None
        if self._pool is not None:
            await self._pool.close()

    def _remember(self, key: bytes, rec: bytes | None) -> None:
        if rec is None:
            self.recent.pop(key, None)
            return
        if len(self.recent) >= RECENT:
            self.recent.clear()  # guesses only: losing them costs a lookup each, no more
        self.recent[key] = rec

    async def get(self, key: bytes) -> bytes | None:
        rec = await self._run("fetchval", "SELECT rec FROM minikv_keys WHERE k = $1", key, read=True)
        self._remember(key, rec)
        return rec

    async def get_many(self, keys: list[bytes]) -> dict[bytes, bytes]:
        """The records of those of `keys` that have one, in one round trip."""
        if len(keys) == 1:
            raw = await self.get(keys[0])
            return {} if raw is None else {keys[0]: raw}
        rows = await self._run("fetch", "SELECT k, rec FROM minikv_keys WHERE k = ANY($1::bytea[])", keys,
                               read=True)
        found = {r[0]: r[1] for r in rows}
        for key in keys:
            self._remember(key, found.get(key))
        return found

    async def cas(self, key: bytes, expect: bytes | None, new: bytes | None,
                  owner: str | None = None) -> tuple[bool, bytes | None]:
        """Replace `key`'s record with `new` (None deletes it) only if it is `expect` now (None:
        absent), done by the database; (done, the record after the call). A PENDING `expect` must
        also be owned by `owner` (default: this server). The compare-and-sets of one event loop
        that wait for each other go to the database together (index/pg_write.py)."""
        check_transition(expect, new)
        owner = owner or self.owner
        new_owner = owner if new is not None and new[0] == PENDING else None
        if self._writes is None:
            from minikv.index.pg_write import Writes

            self._writes = Writes(self)
        change = (key, expect, new, new_owner, owner if expect and expect[0] == PENDING else None)
        try:
            done = await self._writes.cas(*change)
        except IndexUnavailable as e:
            if not e.maybe_done:
                raise
            done = await self._settle(change, e)
        if done:
            self._remember(key, new)
            return True, new
        # only to say why (the lock is held, the key is gone...): the change itself was not made
        return False, await self.get(key)

    async def _settle(self, change: tuple, e: IndexUnavailable) -> bool:
        """The outcome of a compare-and-set whose connection broke while it was out (`e`: the
        database restarted, say), from the record read now. `new` (gone, for a delete): it was
        made. Still `expect`: it was not, and its connection is closed, so it never will be: it
        goes again. Anything else, or the database still unreachable: unknown, `e`. A new
        PENDING record found is unknown too: another request of this process may have made the
        same bytes (the same key in the same millisecond), so it cannot be told to be ours."""
        key, expect, new = change[:3]
        for _ in range(RETRIES):
            try:
                rec = await self.get(key)
            except IndexUnavailable:
                raise e from None
            if rec == new and (new is None or new[0] != PENDING):
                return True
            if rec != expect:
                raise e
            try:
                if await self._writes.cas(*change):
                    return True
            except IndexUnavailable as again:
                if not again.maybe_done:
                    raise
                e = again
            # not made now: read again, as the first statement may yet have been (its server
            # still at work when the client gave it up)
        raise e

    async def cas_one(self, key: bytes, expect: bytes | None, new: bytes | None, new_owner: str | None,
                      owner: str | None, held: bool = False) -> bool:
        """One compare-and-set in one statement (see cas; `owner`: the one a PENDING `expect` must
        have, else None; `held`: on the group commit's own connection)."""
        run = self.run_held if held else self._run
        if expect is None:
            return await run(
                "fetchval", "INSERT INTO minikv_keys (k, rec, owner) VALUES ($1, $2, $3) "
                "ON CONFLICT (k) DO NOTHING RETURNING true", key, new, new_owner)
        if owner is not None:
            if new is None:
                return await run("fetchval", "DELETE FROM minikv_keys WHERE k = $1 AND rec = $2 "
                                 "AND owner = $3 RETURNING true", key, expect, owner)
            return await run("fetchval", "UPDATE minikv_keys SET rec = $3, owner = $4 WHERE k = $1 "
                             "AND rec = $2 AND owner = $5 RETURNING true", key, expect, new, new_owner, owner)
        if new is None:
            return await run("fetchval", "DELETE FROM minikv_keys WHERE k = $1 AND rec = $2 "
                             "RETURNING true", key, expect)
        return await run("fetchval", "UPDATE minikv_keys SET rec = $3, owner = $4 WHERE k = $1 "
                         "AND rec = $2 RETURNING true", key, expect, new, new_owner)

    async def scan(self, prefix: bytes, start: bytes = b"", limit: int = 0,
                   keep=None, budget: int = 0) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """As Store.scan: records below `prefix` from `start` on, in key order; at most `budget`
        records read in this call (one statement), then the key to go on from."""
        chunk = budget or 1000
        out: list[tuple[bytes, bytes]] = []
        pos = max(prefix, start)
        end = prefix_end(prefix)
        while True:
            if end is None:
                rows = await self._run("fetch", "SELECT k, rec FROM minikv_keys WHERE k >= $1 "
                                       "ORDER BY k LIMIT $2", pos, chunk + 1, read=True)
            else:
                rows = await self._run("fetch", "SELECT k, rec FROM minikv_keys WHERE k >= $1 AND k < $2 "
                                       "ORDER BY k LIMIT $3", pos, end, chunk + 1, read=True)
            for i, (key, value) in enumerate(rows):
                if i == chunk:
                    if budget:
                        return out, key
                    pos = key
                    break
                if keep is not None and not keep(value):
                    continue
                if limit and len(out) == limit:
                    return out, key
                out.append((key, value))
            else:
                return out, b""

    async def top_folders(self, start: bytes, limit: int) -> tuple[list[bytes], bytes | None]:
        """Up to `limit` top-level folders `/name/` from `start` on, in order, and the position
        to go on from (None: no more). No table keeps them here (it would cost every write a
        second row to keep): one statement walks the keys' index, one probe per folder (it jumps
        past each folder's keys) or per key outside any folder, at most TOP_STEPS probes; a walk
        cut short by keys outside folders ends early, with the position to go on from."""
        rows = await self._run("fetch", _WALK_TOPS, max(start, b"/"), TOP_STEPS + limit, limit, read=True)
        tops: list[bytes] = []
        for (key,) in rows:
            if key is None:
                return tops, None  # the walk reached the last key
            top = top_of(key)
            if top is not None and top >= start and top not in tops[-1:]:
                tops.append(top)
        return tops, _past_top(rows[-1][0]) if rows else None

    async def first_records(self, tops: list[bytes], n: int) -> dict[bytes, list[bytes]]:
        """The records of the first `n` keys below each folder `/name/` of `tops`, in key order,
        in one statement (ListBuckets dates the buckets only its keys make by them)."""
        rows = await self._run(
            "fetch", "SELECT t.top, r.rec FROM unnest($1::bytea[]) AS t(top) CROSS JOIN LATERAL "
            "(SELECT rec FROM minikv_keys WHERE k >= t.top AND k < substring(t.top FROM 1 FOR length(t.top) - 1) "
            "|| '\\x30'::bytea ORDER BY k LIMIT $2) r", tops, n, read=True)
        out: dict[bytes, list[bytes]] = {}
        for top, rec in rows:
            out.setdefault(top, []).append(rec)
        return out

    async def pending_of(self, owner: str) -> list[tuple[bytes, bytes]]:
        rows = await self._run("fetch", "SELECT k, rec FROM minikv_keys WHERE owner = $1", owner, read=True)
        return [(r[0], r[1]) for r in rows]

    async def count(self) -> int:
        return await self._run("fetchval", "SELECT count(*) FROM minikv_keys", read=True)


def server_id(port: int) -> str:
    """The id a server's records and lease carry: the same after a restart (so that it resolves
    its own records at once), different for every server of a cluster."""
    import socket

    return f"{socket.gethostname()}:{port}"
