"""The S3 front on a PostgreSQL index (index/pg.py): the same code as on LMDB (front.py and the
modules it calls), run so that its reads may wait for the database.

S3's code reads the index and its meta store in two kinds of places:
- in its coroutines (writes, multipart, the GET's streaming), which await `settle(...)` of every
  engine call (index/engine.py): on LMDB a plain value, here a coroutine;
- in plain functions (HEAD, the start of a GET, listings, buckets), which on LMDB answer from
  the memory map without a task. Here those run in a helper thread (`asyncio.to_thread`), where
  each engine call blocks that thread (never the event loop) until the statement, run on the
  worker's loop, has answered.

`Bridge` gives both from one object: called on the worker's loop, an engine call returns its
coroutine; called from a helper thread, its value. So LMDB's path is untouched, and S3's rules
stay written once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading

from minikv.http.response import HTTPError
from minikv.index.pg import QUERY_TIMEOUT, IndexUnavailable, PgStore
from minikv.index.store import StoreError
from minikv.s3.front import S3
from minikv.s3.meta_pg import PgMeta
from minikv.s3.values import Values

CALL_TIMEOUT = 3 * QUERY_TIMEOUT  # a helper thread never waits forever for the loop


class Bridge:
    """An engine (PgStore, PgMeta) whose calls answer a coroutine on the loop's own thread, and
    their value in any other thread."""

    def __init__(self, target, loop: asyncio.AbstractEventLoop):
        self._target = target
        self._loop = loop
        self._thread = threading.get_ident()

    def __getattr__(self, name: str):
        found = getattr(self._target, name)
        if not callable(found):
            return found

        def call(*args, **kwargs):
            answer = found(*args, **kwargs)
            if not inspect.isawaitable(answer) or threading.get_ident() == self._thread:
                return answer
            try:
                return asyncio.run_coroutine_threadsafe(answer, self._loop).result(CALL_TIMEOUT)
            except concurrent.futures.TimeoutError:
                raise IndexUnavailable(f"the index database did not answer within {CALL_TIMEOUT:g}s; "
                                       "try again") from None

        return call


class PgS3(S3):
    def __init__(self, app):
        engine: PgStore = app.engine
        loop = asyncio.get_running_loop()
        self.app = app
        self.config = app.config
        self.store = Bridge(engine, loop)
        self.pool = app.pool
        self.health = app.health
        self.values = Values(app.config, self.store, app.pool, app.health)
        self.values.uploads = app  # S3 writes count in the plain API's budget of upload files, as on LMDB
        self.meta = Bridge(PgMeta(engine), loop)
        self.values.meta = self.meta
        self.access_key = getattr(app.config, "s3_access_key", "") or ""
        self.secret_key = getattr(app.config, "s3_secret_key", "") or ""
        self._thread = threading.get_ident()

    def close(self) -> None:
        pass  # the database connections are the engine's

    async def handle(self, req, key: bytes, path: bytes, query: bytes):
        try:
            answer = await asyncio.to_thread(S3.handle, self, req, key, path, query)
            if not isinstance(answer, bytes):
                answer = await answer  # S3._finish: the operation's coroutine, on the loop
        except StoreError as e:  # the database went away while an error was being told
            raise HTTPError(503, str(e)) from None
        return answer

    def _error(self, ctx, e):
        if threading.get_ident() == self._thread:  # from _finish, on the loop: its lookup may wait
            return asyncio.to_thread(S3._error, self, ctx, e)
        return S3._error(self, ctx, e)
