"""Group commit of a worker's compare-and-sets on the PostgreSQL index (index/pg.py).

Each compare-and-set sent alone costs a pool checkout, a round trip, an executor start and a
commit (a WAL flush: synchronous_commit stays on), in the index's Python and in PostgreSQL,
for a one-row change. Here the compare-and-sets a worker's requests make while a group is out
wait, and then go together as ONE statement, so one commit serves them all (as index/group.py
does for LMDB's -fsync). Under load the groups grow with the writes in flight; with none in
flight a compare-and-set goes at once, alone, as the statement of one, sent and awaited by its
caller's own task (no task of its own: the common case when the worker is not busy). The
statements go on a connection the worker keeps for them (PgStore.run_held), not through the pool.

What does not change:
- each change is still a compare-and-set done by the database: the group's statement inserts,
  updates or deletes a row only where the row is what that change expects (and, from a PENDING
  record, only for its owner), so a group changes exactly the rows its changes would change one
  by one, and reports which;
- a group never holds two changes of one key (the later waits for the next group): within one
  statement their order would be undefined;
- the statement is one transaction: it is applied whole or not at all. When the database
  refuses it (an error in one change, a deadlock with another server's group, a row another
  transaction holds past GROUP_LOCK_WAIT), nothing was applied and each change is tried again
  alone on the pool's connections while the next group goes, so one bad change or one held
  row fails, or holds up, only its own request.
  When the connection breaks while it is out, every change of the group may have been applied:
  each caller hears so (IndexUnavailable.maybe_done), as for a statement of its own, and
  PgStore.cas then tells from the record whether it was.
"""

from __future__ import annotations

import asyncio

MAX_GROUP = 256  # changes in one statement

# one row per change: k, the record expected (NULL: absent), the new one (NULL: delete), the
# owner the new record carries, the owner a PENDING expected record must have (else NULL).
# `m.k = ANY($1)` gives the UPDATE and the DELETE a condition on the primary key of their own:
# without it, a plan made while the table looked small (a new index: every connection keeps
# its plan) joined b to a sequential scan of the whole table, dead rows too, in every group
GROUP_CAS = (
    "WITH b AS (SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::bytea[], $4::text[], $5::text[]) "
    "AS b(k, expect, new, new_owner, owner)), "
    "ins AS (INSERT INTO minikv_keys (k, rec, owner) SELECT k, new, new_owner FROM b WHERE expect IS NULL "
    "ON CONFLICT (k) DO NOTHING RETURNING k), "
    "upd AS (UPDATE minikv_keys m SET rec = b.new, owner = b.new_owner FROM b WHERE m.k = ANY($1::bytea[]) "
    "AND b.expect IS NOT NULL AND b.new IS NOT NULL AND m.k = b.k AND m.rec = b.expect "
    "AND (b.owner IS NULL OR m.owner = b.owner) RETURNING m.k), "
    "del AS (DELETE FROM minikv_keys m USING b WHERE m.k = ANY($1::bytea[]) AND b.expect IS NOT NULL "
    "AND b.new IS NULL AND m.k = b.k AND m.rec = b.expect AND (b.owner IS NULL OR m.owner = b.owner) "
    "RETURNING m.k) "
    "SELECT k FROM ins UNION ALL SELECT k FROM upd UNION ALL SELECT k FROM del")

Change = tuple  # (key, expect, new, new_owner, owner or None, future of done)


class Writes:
    """The compare-and-sets of one worker (one event loop) on `store`, grouped."""

    def __init__(self, store):
        self.store = store
        self.queue: list[Change] = []
        self.busy = False

    async def cas(self, key: bytes, expect: bytes | None, new: bytes | None, new_owner: str | None,
                  owner: str | None) -> bool:
        """True when the change was made, False when the record was not `expect`."""
        if self.busy:
            fut = asyncio.get_running_loop().create_future()
            self.queue.append((key, expect, new, new_owner, owner, fut))
            return await fut
        # nothing out: the change goes at once, alone, from the caller's own task (no task, no
        # future of a group of one); the changes made meanwhile wait for it as for a group
        self.busy = True
        try:
            return bool(await self.store.cas_one(key, expect, new, new_owner, owner, held=True))
        except Exception as e:  # noqa: BLE001 - all but a held row's are the caller's
            if not getattr(e, "locked", False):
                raise
        finally:
            self.busy = False
            if self.queue:
                self._send()
        # another transaction held the row past GROUP_LOCK_WAIT: it is waited for on a pooled
        # connection, and the worker's other changes go on meanwhile
        return bool(await self.store.cas_one(key, expect, new, new_owner, owner))

    def _send(self) -> None:
        # the first change of each key, in key order (groups of two servers then take their rows'
        # locks in one order, which keeps them from deadlocking), the others for the next group
        group: dict[bytes, Change] = {}
        rest: list[Change] = []
        for change in self.queue:
            if change[0] in group or len(group) == MAX_GROUP:
                rest.append(change)
            else:
                group[change[0]] = change
        self.queue = rest
        self.busy = True
        asyncio.ensure_future(self._run([group[k] for k in sorted(group)]))

    async def _run(self, group: list[Change]) -> None:
        try:
            again = await self._together(group)
        finally:
            self.busy = False
            if self.queue:
                self._send()
        # each alone on the pool's connections, while the next group goes: one bad change, or one
        # row another transaction holds, fails (or holds up) only its own request
        await asyncio.gather(*(self._alone(c) for c in again))

    async def _alone(self, change: Change) -> None:
        key, expect, new, new_owner, owner, fut = change
        try:
            done = await self.store.cas_one(key, expect, new, new_owner, owner)
        except BaseException as e:  # noqa: BLE001 - the asker gets the failure (503 with its reason)
            _fail(fut, e)
            if not isinstance(e, Exception):
                raise
            return
        if not fut.done():
            fut.set_result(bool(done))

    async def _together(self, group: list[Change]) -> list[Change]:
        """The group's statement on the held connection (a group of one: its change's own); the
        changes to try again alone: those of a statement the database refused (nothing was
        applied) when it held more than one, or that waited too long for a row."""
        try:
            if len(group) == 1:
                c = group[0]
                rows = [(c[0],)] if await self.store.cas_one(*c[:5], held=True) else []
            else:
                rows = await self.store.run_held("fetch", GROUP_CAS, *([c[i] for c in group] for i in range(5)))
        except BaseException as e:  # noqa: BLE001 - see below
            if getattr(e, "locked", False) or (len(group) > 1 and getattr(e, "refused", False)):
                return group
            for c in group:
                _fail(c[5], e)
            if not isinstance(e, Exception):
                raise
            return []
        done = {r[0] for r in rows}
        for c in group:
            if not c[5].done():
                c[5].set_result(c[0] in done)
        return []


def _fail(fut: asyncio.Future, e: BaseException) -> None:
    if fut.done():
        return
    if not isinstance(e, Exception):
        fut.set_exception(asyncio.CancelledError())
        return
    # an exception of each asker's own: the same object raised in many tasks would chain their
    # tracebacks into one another
    try:
        mine = type(e)(*e.args)
        mine.__dict__.update(e.__dict__)
    except Exception:  # noqa: BLE001 - an exception that cannot be remade is shared
        mine = e
    fut.set_exception(mine)
