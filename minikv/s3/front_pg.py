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

A GET or HEAD of an object is the exception, as it is most of S3's traffic: its signature is
checked, its two reads (the record, its attributes) are awaited on the loop, then S3's code
runs on the loop too, answered from them (`Ready`). Through a helper thread the same GET cost
the index five times the CPU it costs on LMDB, most of it in the threads waking each other
(BENCHMARKS.md). A record that is not readable (a 404 looks its bucket up), or code that asks
another read, goes the thread's way, given the reads made; what ran before that read nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import inspect
import threading

from minikv.http.response import HTTPError
from minikv.index.pg import QUERY_TIMEOUT, IndexUnavailable, PgStore
from minikv.index.store import MAX_KEY, StoreError
from minikv.s3.errors import S3Error
from minikv.s3.front import S3
from minikv.s3.meta_pg import PgMeta
from minikv.s3.sigv4 import verify
from minikv.s3.values import Values, readable

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


class NotReady(BaseException):
    """S3's code, run on the loop, asked Ready for a read it was not given (a BaseException: S3's
    code turns every Exception into an answer)."""


class Failed:
    """A read made for Ready that failed: its error, raised where S3's code makes that read."""

    def __init__(self, error: StoreError):
        self.error = error


class Ready:
    """A Bridge for one request whose reads were made before its code ran on the loop's thread:
    a call made then (or from a helper thread running that code) gets its read's value, or raises
    NotReady if it was not made (a helper thread's goes to the Bridge). Once the code has
    returned (`started`), every call goes to the Bridge: its coroutine's reads are fresh ones."""

    def __init__(self, bridge: Bridge, answers: dict, loop_thread: int):
        self._bridge = bridge
        self._answers = answers  # {(method name, args): value}
        self._names = {name for name, _ in answers}  # looked at first: other calls' args may not hash
        self._thread = loop_thread
        self.started = False

    def __getattr__(self, name: str):
        found = getattr(self._bridge, name)
        if not callable(found):
            return found

        def call(*args, **kwargs):
            if self.started:
                return found(*args, **kwargs)
            if not kwargs and name in self._names and (name, args) in self._answers:
                answer = self._answers[name, args]
                if isinstance(answer, Failed):
                    raise answer.error
                return answer
            if threading.get_ident() != self._thread:
                return found(*args, **kwargs)
            raise NotReady(name)

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
            answer, s3, signed = None, self, None
            # an object's GET or HEAD (not ListParts: its reads are others, made on the loop anyway)
            if req.method in (b"GET", b"HEAD") and b"/" in key[1:-1] and len(key) <= MAX_KEY \
                    and b"uploadId" not in query:
                answer, s3, signed = await self._on_loop(req, key, path, query)
            if answer is None:
                answer = await asyncio.to_thread(S3.handle, s3, req, key, path, query, signed)
            if s3 is not self:
                s3.store.started = s3.meta.started = True  # the coroutine's reads: the Bridge's
            if not isinstance(answer, bytes):
                answer = await answer  # S3._finish: the operation's coroutine, on the loop
        except StoreError as e:  # the database went away while an error was being told
            raise HTTPError(503, str(e)) from None
        except NotReady as e:  # a read out of turn must cost the request, not leave it unanswered
            raise HTTPError(500, f"internal error: the S3 code read {e} out of turn") from None
        return answer

    async def _on_loop(self, req, key: bytes, path: bytes, query: bytes):
        """S3.handle of an object's GET or HEAD on the loop, its signature checked and its reads
        awaited first: (its answer, or None to run it in a helper thread; the S3 to run it with;
        the signature). A record that is not readable goes the thread's way (a 404 looks its
        bucket up), with the read made; so does code that asks another read. A read that failed
        fails where the code makes it (a 503, or first the 501 of what it refuses unread), not
        made twice."""
        signed = None
        if self.secret_key:
            try:
                signed = verify(req.method, path, key, query, req.headers, self.access_key, self.secret_key)
            except S3Error:
                return None, self, None  # told by S3.handle, which reads nothing before
        found = None
        try:
            raw = await self.store.get(key)
            found = readable(raw)
            attrs = await self.meta.attrs(key, found) if found is not None else None
        except StoreError as e:  # S3's code raises it where it reads, after what it refuses unread (a 501)
            failed = Failed(e)
            raw, attrs = (failed, None) if found is None else (raw, failed)
        view = copy.copy(self)  # this request's: its store and meta answer the reads made
        view.store = Ready(self.store, {("get", (key,)): raw}, self._thread)
        view.meta = Ready(self.meta, {} if found is None else {("attrs", (key, found)): attrs}, self._thread)
        if found is None and not isinstance(raw, Failed):
            return None, view, signed
        try:
            return S3.handle(view, req, key, path, query, signed), view, signed
        except NotReady:
            return None, view, signed

    def _error(self, ctx, e):
        # only a NoSuchKey looks its bucket up: on the loop (from _finish or _on_loop) that
        # lookup may wait, in a helper thread; any other error is told at once (a 304, a 412)
        if e.code == "NoSuchKey" and threading.get_ident() == self._thread:
            return asyncio.to_thread(S3._error, self, ctx, e)
        return S3._error(self, ctx, e)
