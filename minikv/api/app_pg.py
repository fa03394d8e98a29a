"""The minikeyvalue API on an index that answers over the network (PostgreSQL, index/pg.py).

App (api/app.py) reads the index synchronously: on LMDB a read is a memory-map lookup and a GET
is answered with bytes, no task. Here a read is a round trip, so PgApp answers a request with
a coroutine that first fetches, in one query, the records the request will read (the key; for a
PUT also the keys whose file would sit above its file), then runs App's own code over a view of
the request holding them. A plain GET or HEAD does the same without the coroutine: its answer is
a future, which a callback completes when the lookup's batch comes back (`_read`), so the reads
that are most of the traffic cost no task. What App writes goes to the database through the overrides
below (`_cas`, `_lock`, `_drop`, `_rebalance`), and `?list` scans it chunk by chunk
(`_list_rest`). So the API's rules are written once, and LMDB's path pays nothing for this one.

A PUT of a key the worker knows nothing of and a DELETE of a key it saw last skip that lookup:
they guess the record, and their lock's compare-and-set checks the guess (`_guess`).

S3 requests go to the S3 front (s3/front_pg.py), which reads the database itself.
"""

from __future__ import annotations

import asyncio

from minikv.api.app import LIST_CHUNK, App, _keys_json, _page, _page_next, split_target
from minikv.http.client import VolumeError
from minikv.http.response import HTTPError
from minikv.index.pg import MAX_KEY, PgStore
from minikv.index.pg_batch import Lookups
from minikv.index.record import LIVE, OP_PUT, UNLINKED
from minikv.index.recovery import abandoned, cas_or_later, retry_when_writable
from minikv.index.store import StoreError
from minikv.placement import keys_above
from minikv.s3.detect import claims as s3_claims


class Fetched:
    """The records one request reads, fetched before App's synchronous code runs; writes go
    to the engine (App's write paths reach it through PgApp's overrides)."""

    __slots__ = ("records", "engine")

    def __init__(self, records: dict[bytes, bytes | None], engine: PgStore):
        self.records = records
        self.engine = engine

    def get(self, key: bytes) -> bytes | None:
        return self.records[key]  # KeyError: App read a key PgApp did not fetch (a bug)

    def scan(self, prefix: bytes, start: bytes = b"", limit: int = 0, keep=None, budget: int = 0):
        # nothing read yet: App's listing goes on in _list_rest, which reads the database.
        # b"\0" sorts before every key (keys hold no NUL): a start that is not "done"
        return [], max(prefix, start) or b"\0"

    def cas(self, key: bytes, expect: bytes | None, new: bytes | None):
        return self.engine.cas(key, expect, new)


def undo_later(engine: PgStore, key: bytes, pending: bytes, back: bytes | None) -> None:
    """Put `back` in place of our lock `pending` once the database answers again: a statement
    whose answer was lost may have taken the lock, which must not stay."""
    retry_when_writable(lambda: engine.cas(key, pending, back))  # done, or the lock was never taken


def abandon_later(engine: PgStore, pool, key: bytes, pending: bytes, volumes: list[str], touched=()) -> None:
    """Undo a PUT once the database answers again, if its lock is still there: whether the
    value's record became LIVE could not be told while it was down (a statement's answer lost).
    As App._abandon: an UNLINKED value it was written over stays where it still is."""
    from minikv import replicas

    async def abandon() -> None:
        if await engine.get(key) == pending:
            delete, record = abandoned(pending, volumes, touched)
            await replicas.delete_all(pool, delete, key)
            await engine.cas(key, pending, record)

    retry_when_writable(abandon)


class Stale(Exception):
    """A request's guess of its record (PgApp._guess) was wrong: its lock was not taken.
    `current`: the record read after that."""

    def __init__(self, current: bytes | None):
        super().__init__("the record was not the one guessed")
        self.current = current


def _pass_on(done: asyncio.Future, out: asyncio.Future) -> None:
    """The outcome of `done` (a task) onto `out`."""
    if done.cancelled():
        out.cancel()
    elif done.exception() is not None:
        out.set_exception(done.exception())
    else:
        out.set_result(done.result())


class PgApp(App):
    guessed = False  # this view of a request guessed its record instead of reading it

    def __init__(self, config, store: PgStore, pool, health):
        super().__init__(config, store, pool, health)
        self.engine = store
        self.lookups = Lookups(store)  # one query for the lookups of one pass of the loop (index/pg_batch.py)
        self.group = None  # commits are the database's (its synchronous_commit), not batched here
        self.app = self  # the app itself, in each view of a request (_view_answer copies the rest)

    def handle(self, req):
        if req.method == b"GET" or req.method == b"HEAD":
            answer = self._read(req)
            if answer is not None:
                return answer
        return self._handle(req)

    def _read(self, req) -> asyncio.Future | None:
        """A plain GET or HEAD of a key: a future of its answer, which a callback makes when the
        lookup's batch comes back, without a task (most of the traffic is reads). None for the
        rest (S3, listings, a query string), which _handle answers."""
        key, _, query = split_target(req.url)
        if query or len(key) > MAX_KEY or (self.s3 is not None and s3_claims(req.headers, query)):
            return None
        if self.access is not None:
            self.access.check(req.method, req.headers)
        looked = self.lookups.get_many([key])
        out = looked.get_loop().create_future()
        looked.add_done_callback(lambda done: self._read_done(req, key, done, out))
        return out

    def _read_done(self, req, key: bytes, looked: asyncio.Future, out: asyncio.Future) -> None:
        try:
            try:
                found = looked.result()
            except StoreError as e:
                raise HTTPError(503, str(e)) from None
            answer = self._view_answer(req, [key], found, False)
        except BaseException as e:  # noqa: BLE001 - the HTTP layer answers it (a 4xx/5xx, or a 500 for a bug)
            out.set_exception(e)
            return
        if isinstance(answer, bytes):
            out.set_result(answer)
        else:  # a coroutine (a multipart object's read, -verify-get): in a task after all
            asyncio.ensure_future(answer).add_done_callback(lambda done: _pass_on(done, out))

    async def _handle(self, req):
        key, path, query = split_target(req.url)
        if self.s3 is not None and s3_claims(req.headers, query):
            return await self.s3.handle(req, key, path, query)  # s3/front_pg.py
        if self.access is not None:
            self.access.check(req.method, req.headers)
        keys = []
        if len(key) <= MAX_KEY and not (query and query.split(b"&", 1)[0] in (b"list", b"unlinked")):
            keys.append(key)
            if req.method == b"PUT":
                keys += keys_above(key)
        found = self._guess(req.method, keys)
        if found is not None:
            try:
                return await self._answer(req, keys, found, True)
            except Stale as e:  # the guess was wrong, nothing was changed: again with the record read
                return await self._answer(req, keys, {key: e.current} if e.current is not None else {}, False)
        try:
            found = await self.lookups.get_many(keys) if keys else {}
        except StoreError as e:
            raise HTTPError(503, str(e)) from None
        return await self._answer(req, keys, found, False)

    async def _answer(self, req, keys: list[bytes], found: dict[bytes, bytes], guessed: bool):
        answer = self._view_answer(req, keys, found, guessed)
        if not isinstance(answer, bytes):
            answer = await answer
        return answer

    def _view_answer(self, req, keys: list[bytes], found: dict[bytes, bytes], guessed: bool):
        """App's code on a view of the request holding the records it reads: the answer, or a
        coroutine of it."""
        # copy.copy's shallow copy without its generic path (__reduce_ex__, copyreg): 5 -> 0.5 us
        view = object.__new__(type(self))
        view.__dict__ = self.__dict__.copy()
        view.store = Fetched({k: found.get(k) for k in keys}, self.engine)
        view.access = None  # checked by _handle
        view.guessed = guessed
        return App.handle(view, req)

    def _guess(self, method: bytes, keys: list[bytes]) -> dict[bytes, bytes] | None:
        """The records a PUT or DELETE may assume without reading them (None: it must read
        them): a new key is absent (a PUT's INSERT finds out), a key this worker saw last
        LIVE (UNLINKED) still is. A guess is only ever the `expect` of the request's first
        compare-and-set, which the database checks: when it was wrong the lock is not taken,
        and the request starts again with the record read then (Stale). A read never guesses."""
        if len(keys) != 1:
            return None  # a PUT below another key's folder, or no key
        seen = self.engine.recent.get(keys[0])
        if method == b"PUT":
            return {} if seen is None else None
        if method == b"DELETE" and seen is not None:
            # only guesses that lead to the lock: a 404, 409 or -protect's 403 needs the record read
            if seen[0] == UNLINKED or (seen[0] == LIVE and not self.config.protect):
                return {keys[0]: seen}
        return None

    async def _put_holding(self, files: int, *args) -> bytes:
        # the files of the uploads in flight are counted on the app: a view's count is its own
        # copy, and counted there no upload would ever meet the budget (App.put)
        self.app.held_files += files
        try:
            return await self._put_body(*args)
        finally:
            self.app.held_files -= files

    async def _cas(self, key: bytes, expect: bytes | None, new: bytes | None):
        try:
            return await self.engine.cas(key, expect, new)
        except StoreError as e:
            raise HTTPError(503, str(e)) from None

    async def _lock(self, key: bytes, expect: bytes | None, pending: bytes) -> None:
        try:
            done, current = await self.engine.cas(key, expect, pending)
        except StoreError as e:
            if getattr(e, "maybe_done", False):  # the lock may be ours: it must not stay
                undo_later(self.engine, key, pending, expect)
            raise HTTPError(503, f"{e}; nothing was stored" if pending[1:2] == OP_PUT else str(e)) from None
        if not done:
            if self.guessed:
                raise Stale(current)
            raise self._raced(current, pending[1:2] == OP_PUT)

    async def _abandon(self, key: bytes, pending: bytes, volumes: list[str], touched=()) -> str:
        # the files go only while the lock is ours: a LIVE-making statement whose answer was
        # lost may have landed, and then they are the key's value
        try:
            current = await self.engine.get(key)
        except StoreError as e:
            abandon_later(self.engine, self.pool, key, pending, volumes, touched)
            return str(e)
        if current != pending:
            return ""
        return await super()._abandon(key, pending, volumes, touched)

    async def _undo(self, key: bytes, pending: bytes, raw: bytes | None) -> str:
        return await cas_or_later(self.engine, key, pending, raw)  # not App's: no group commit here

    async def _rebalance(self, key: bytes, raw: bytes, volumes: list[str], pending: bytes) -> bytes:
        from minikv.admin.move import LostLock, move_key
        from minikv.http.response import head

        await self._lock(key, raw, pending)
        try:
            await move_key(self.pool, self.engine, key, raw, volumes, pending, self.health.is_up, self.epoch,
                           detach=True)
        except VolumeError as e:
            raise HTTPError(503, f"{e}; the key stays where it was") from None
        except LostLock as e:
            raise HTTPError(409, str(e)) from None
        except StoreError as e:
            undo_later(self.engine, key, pending, raw)
            raise HTTPError(503, str(e)) from None
        except Exception:
            undo_later(self.engine, key, pending, raw)  # a bug must not leave the key locked
            raise
        return head(204)

    async def _list_rest(self, prefix: bytes, pos: bytes, keep, want: int, keys: list[bytes],
                         limit: int, url: bool) -> bytes:
        try:
            while pos and len(keys) < want:
                pairs, pos = await self.engine.scan(prefix, pos, want - len(keys), keep, LIST_CHUNK)
                keys.extend(k for k, _ in pairs)
        except StoreError as e:
            raise HTTPError(503, str(e)) from None
        nxt = _page_next(keys, want, limit, url)
        parts = []
        for i in range(0, len(keys), LIST_CHUNK):
            await asyncio.sleep(0)
            parts.append(_keys_json(keys[i:i + LIST_CHUNK], url))
        return _page(nxt, parts)
