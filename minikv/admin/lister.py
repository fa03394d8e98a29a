"""Folder listings asked of a volume in bulk: a batch of GETs in one write on one connection,
the answers gathered in order, one future per batch.

The walk (admin/walk.py) asks about one listing per `svXX/<aa>/<bb>` folder, ~1.5 million at
1,000,000 keys, and each answer holds a file or two: the Python around each request is what
the walk costs. http/client.py's pipes pay per request for what a PUT or a DELETE needs (an
exchange with its own future and timeout, the answer's headers as a dict, a retry of what a
closed connection left unanswered). A listing needs only its status and body, so here a
request is one bytes concatenation and an answer two parser callbacks (httptools calls no
Python for the headers when the protocol has no `on_header`).

Failures are not retried here: an answer that did not come (the volume closed the connection,
fell silent for `timeout`, sent something malformed) is None, and the walk asks for that folder
again the careful way (Walker.files, through the Pool, retried).
"""

from __future__ import annotations

import asyncio

import httptools

from minikv.http.client import MAX_ANSWER, VOLUME_REQUESTS, Pool, _Link, too_big

Answer = tuple[int, bytes]  # status, body
MAX_IDLE = 16  # idle connections kept per volume
LIST_TOTAL = 300.0  # the longest a listing (or a batch of them) may take in all
MAX_BATCH = 8 * MAX_ANSWER  # a batch's answers together (a few hundred KB as a rule)


class _Batch(_Link):
    """One connection to a volume; carries one batch at a time. Bytes go to the parser as on
    the Pool's connections (_Link); a failure ends the batch with what came."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str):
        self.loop = loop
        self.host = host
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.want = 0  # answers the batch in flight waits for
        self.answers: list[Answer] = []
        self.parts: list[bytes] = []
        self.gathered = 0  # bytes of the answer coming
        self.batch_bytes = 0  # bytes of the batch's answers
        self.done: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.last_rx = 0.0
        self.started = 0.0  # when the batch in flight was sent

    def _idle(self) -> bool:
        return False  # the Pool's watch on its idle connections: not for these

    def _lost(self, err: Exception | None) -> None:
        self.closed = True
        self._finish()

    def on_body(self, data: bytes) -> None:
        self.parts.append(data)
        self.gathered += len(data)
        self.batch_bytes += len(data)
        # one answer, and the batch's answers together (kept until the batch ends)
        if self.gathered > MAX_ANSWER or self.batch_bytes > MAX_BATCH:
            raise too_big(self.host)

    def on_message_complete(self) -> None:
        parts = self.parts
        self.parts = []
        self.gathered = 0
        self.answers.append((self.parser.get_status_code(), parts[0] if len(parts) == 1 else b"".join(parts)))
        if not self.parser.should_keep_alive():
            self.close()  # what is left of the batch goes unanswered
        elif len(self.answers) >= self.want:
            self._finish()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self._finish()

    def _finish(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def _check(self, timeout: float) -> None:
        """The batch's timer: the volume may stay silent for `timeout`, and take LIST_TOTAL in all
        (a batch of listings takes a second or so; one sent a byte at a time would take for ever)."""
        if self.done is None or self.done.done():
            return
        left = min(self.last_rx + timeout, self.started + LIST_TOTAL) - self.loop.time()
        if left <= 0:
            self.close()
        else:
            self.timer = self.loop.call_later(left, self._check, timeout)


class Lister:
    """Bulk listings of the volumes a Pool talks to (its address cache, secret and timeout)."""

    def __init__(self, pool: Pool):
        self.pool = pool
        self._idle: dict[str, list[_Batch]] = {}

    async def _conn(self, host: str) -> _Batch | None:
        idle = self._idle.get(host)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        addr = self.pool.address(host)
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(lambda: _Batch(loop, host), *addr), self.pool.timeout)
        except (OSError, ValueError, asyncio.TimeoutError):
            return None
        return conn

    def _send(self, conn: _Batch, host: str, paths: list[str]) -> None:
        head, tail = self.pool.bare_head("GET", host)
        VOLUME_REQUESTS[host] = VOLUME_REQUESTS.get(host, 0) + len(paths)
        conn.want = len(paths)
        conn.answers = []
        conn.gathered = conn.batch_bytes = 0
        conn.done = conn.loop.create_future()
        conn.last_rx = conn.started = conn.loop.time()
        conn.transport.write(b"".join([head + p.encode("latin-1") + tail for p in paths]))

    async def many(self, targets: list[tuple[str, str]], timeout: float) -> list[Answer | None]:
        """The answers to GET `path` of each (host, path) of `targets` (paths needing no quoting),
        in order; None for each that did not come. Every host's batch is sent before any answer
        is awaited."""
        by_host: dict[str, list[int]] = {}
        for i, (host, _) in enumerate(targets):
            by_host.setdefault(host, []).append(i)
        out: list[Answer | None] = [None] * len(targets)
        sent: list[tuple[str, _Batch, list[int]]] = []
        try:
            for host, idx in by_host.items():
                conn = await self._conn(host)
                if conn is not None and not conn.closed:
                    self._send(conn, host, [targets[i][1] for i in idx])
                    conn.timer = conn.loop.call_later(timeout, conn._check, timeout)
                    sent.append((host, conn, idx))
            while sent:
                host, conn, idx = sent[0]
                await conn.done
                del sent[0]  # collected: another batch may have the connection from here on
                conn.timer.cancel()
                for i, answer in zip(idx, conn.answers):
                    out[i] = answer
                idle = self._idle.setdefault(host, [])
                if not conn.closed and len(idle) < MAX_IDLE:
                    idle.append(conn)
                elif not conn.closed:
                    conn.close()
        finally:
            for _, conn, _ in sent:  # not collected (cancelled): its answers would mix with the next batch's
                conn.timer.cancel()
                conn.close()
        return out

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
