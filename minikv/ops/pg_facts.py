"""The operations listener's facts about an index in PostgreSQL (ops/facts.py is LMDB's).

Asked over the network, so fetched before an answer is made (`refresh`, awaited by the listener)
and kept FACTS_TTL seconds: scrapes and probes cannot load the database more than that. Each
query costs the same whatever the index holds:
- keys: counted while the table is small (SMALL_PAGES pages at most: a few milliseconds), else
  PostgreSQL's own estimate (pg_class.reltuples scaled to the table's size now, as its planner
  does), never count(*) over a big table;
- PENDING records: the rows with an owner (only PENDING records have one), through their
  partial index, at most PENDING_SCAN of them looked at;
- writable: one UPDATE of this server's own lease row that changes nothing, committed; it fails
  on a read-only standby, a full disk, a database that is down or refuses writes.
"""

from __future__ import annotations

import asyncio
import time

from minikv.index.record import decode_pending
from minikv.index.store import StoreError
from minikv.ops.report import Reporter

FACTS_TTL = 1.0  # seconds the figures are reused
TIMEOUT = 3.0  # seconds for the whole refresh: a probe must answer while the database hangs
PENDING_SCAN = 1000
SMALL_PAGES = 1000  # 8 MB of table: counted exactly below that

KEYS_ESTIMATE = (
    "SELECT c.reltuples, c.relpages, pg_relation_size(c.oid) / current_setting('block_size')::int, "
    "pg_stat_get_live_tuples(c.oid), pg_total_relation_size(c.oid) FROM pg_class c "
    "WHERE c.oid = 'minikv_keys'::regclass")
PENDING = f"SELECT rec FROM minikv_keys WHERE owner IS NOT NULL LIMIT {PENDING_SCAN}"
WRITE_PROBE = "UPDATE minikv_leases SET expires = expires WHERE id = $1"


def estimate_keys(reltuples: float, relpages: int, pages_now: int, live: int) -> int:
    """Rows in the table, as the planner estimates them: the density seen by the last VACUUM or
    ANALYZE times the pages there are now; the statistics' live-tuple count when neither has run."""
    if reltuples < 0 or relpages <= 0:
        return max(0, int(live))
    return max(0, round(reltuples / relpages * pages_now))


class PgReporter(Reporter):
    """Reporter for an index in PostgreSQL: the same report, the index's part from the database."""

    def __init__(self, app, folder: str):
        super().__init__(app, folder)
        self.engine = app.store
        self.at = 0.0
        self.lock = asyncio.Lock()
        self.facts = {"keys": 0, "pending": 0, "db_bytes": 0, "disk_free": None, "oldest_pending_seconds": None}
        self.reason: str | None = "the index database has not been asked yet"
        self.write_check = lambda: self.reason

    def index_facts(self) -> dict:
        return dict(self.facts)

    async def refresh(self) -> None:
        """Ask the database, at most once per FACTS_TTL (concurrent asks share one); never raises."""
        async with self.lock:
            if time.monotonic() - self.at < FACTS_TTL:
                return
            try:
                await asyncio.wait_for(self._ask(), TIMEOUT)
                self.reason = None
            except StoreError as e:
                self.reason = f"the index database cannot be written: {e}"
            except asyncio.TimeoutError:
                self.reason = f"the index database did not answer within {TIMEOUT:g}s"
            except Exception as e:  # noqa: BLE001 - the figures are worth less than the answer
                self.reason = f"the index database cannot be asked: {e!r}"
            self.at = time.monotonic()

    async def _ask(self) -> None:
        run = self.engine._run
        await run("execute", WRITE_PROBE, self.engine.owner)  # first: readiness matters most
        reltuples, relpages, pages_now, live, size = await run("fetchrow", KEYS_ESTIMATE, read=True)
        keys = estimate_keys(reltuples, relpages, pages_now, live)
        if pages_now <= SMALL_PAGES:
            keys = await run("fetchval", "SELECT count(*) FROM minikv_keys", read=True)
        recs = await run("fetch", PENDING, read=True)
        now_ms = time.time() * 1000
        oldest = min((decode_pending(r[0]).started_ms for r in recs), default=None)
        self.facts = {
            "keys": keys, "pending": len(recs),
            "db_bytes": size, "disk_free": None,
            "oldest_pending_seconds": None if oldest is None else max(0.0, (now_ms - oldest) / 1000)}
