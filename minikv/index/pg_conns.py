"""The connections of one process to the PostgreSQL index (index/pg.py): a plain list of idle ones.

asyncpg's own pool wraps each checkout in a proxy object, a timeout and a shielded release:
measured here, a one-row SELECT cost the client 40 µs of CPU on a connection held by hand and
129 µs through that pool, which put its checkout above the statement itself on every lookup. A
request here holds a connection for one statement (or one short transaction) at a time, so what
is needed is little: the last idle connection given back, else a new one while fewer than `size`
are open, else wait for one to come back. Rules:
- a connection that broke (the database restarted, a statement given up) or that comes back
  inside a transaction is dropped, never handed out again, and its place opens for a new one;
  after a break the idle ones go too (drop_idle): a restart broke them all;
- one idle longer than IDLE_CLOSE is closed, as asyncpg's pool does, so a burst does not keep
  its connections (each a PostgreSQL process) for ever;
- a caller cancelled while it waits passes its turn on, so no waiter is left asleep while a
  connection is free.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time

IDLE_CLOSE = 300.0  # seconds an idle connection is kept (asyncpg's pool: the same)


class Conns:
    def __init__(self, open_one, size: int):
        self.open_one = open_one  # coroutine function: one new connection
        self.size = size
        self.idle: list[tuple[object, float]] = []  # (connection, since when idle), newest last
        self.count = 0  # open: idle, out, or being opened
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self.closed = False

    async def take(self):
        """A connection of this process's own until `give` takes it back."""
        while True:
            while self.idle:
                conn = self.idle.pop()[0]
                if not conn.is_closed():
                    return conn
                self.count -= 1  # broke while idle
            if self.count < self.size:
                self.count += 1
                try:
                    return await self.open_one()
                except BaseException:
                    self.count -= 1
                    self._wake()  # its place is free again
                    raise
            fut = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._wake()  # woken and cancelled at once: the turn goes to the next
                else:
                    with contextlib.suppress(ValueError):
                        self.waiters.remove(fut)
                raise

    def give(self, conn) -> None:
        if self.closed or conn.is_closed() or conn.is_in_transaction():
            if not conn.is_closed():
                conn.terminate()
            self.count -= 1
        else:
            now = time.monotonic()
            self.idle.append((conn, now))
            if now - self.idle[0][1] > IDLE_CLOSE:  # the oldest has not been needed for long
                self.idle.pop(0)[0].terminate()
                self.count -= 1
        self._wake()

    @contextlib.asynccontextmanager
    async def acquire(self):
        """`async with conns.acquire() as conn:` take and give back."""
        conn = await self.take()
        try:
            yield conn
        finally:
            self.give(conn)

    def drop_idle(self) -> None:
        """Close the idle connections: one broke, and what broke it (a restart) broke them too,
        unseen yet (their end may still be on its way): new ones are opened in their place."""
        idle, self.idle = self.idle, []
        self.count -= len(idle)
        for conn, _ in idle:
            conn.terminate()
            self._wake()

    def _wake(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def close(self) -> None:
        self.closed = True  # connections out are dropped as they come back
        idle, self.idle = self.idle, []
        self.count -= len(idle)
        for conn, _ in idle:
            try:
                await conn.close(timeout=2)
            except Exception:  # noqa: BLE001 - it goes anyway
                conn.terminate()
