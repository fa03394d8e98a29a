"""A small keep-alive HTTP/1.1 client for talking to volume servers (nginx).

Two kinds of connection, kept idle per volume for reuse:
- a `_Conn` carries one streamed request at a time (downloads, uploads of large or unknown
  size), with flow control both ways: an upload's `write` never buffers more than the
  transport's high-water mark before `drain` waits, and a download pauses the socket while its
  consumer is behind;
- a `_Pipe` carries whole small writes (DELETE, PUT of a small value), pipelined: the ones
  made to one volume in one pass of the event loop and the next go out in one write and are
  answered in order. Under a write load a third or more of them share a pass with another request to
  the same volume, and each one that does saves a send and a wake-up of nginx (7-15% more
  PUT+GET+DELETE loops per second in A/B runs, BENCHMARKS.md). A request queued behind an
  answer that closed the connection gets no answer at all: it is sent once more on another
  connection (these requests are whole and idempotent on a volume: a second send does no
  harm). Other requests go alone on a `_Conn` (see request_many): a GET's answer may be big
  or slow to come (a folder listing; a REBALANCE sent to an index) and would hold up the ones
  queued behind it.

Every wait is bounded by the volume timeout. Errors are `VolumeError`s whose message says
which volume failed and how, ready to be shown to the client in a 5xx.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import re

import httptools

from minikv.http.server import Body

STALL_MIN = 5.0  # a transfer that makes no progress for this long (or the timeout) fails
WATCH_TICK = 0.1  # how often waiting connections are checked: timeouts fire up to this late
VOLUME_REQUESTS: dict[str, int] = {}  # requests this process sent to each volume (for minikv/ops)


class VolumeError(Exception):
    """A volume could not be reached or did not answer in time: `volume <host> <what>`."""

    def __init__(self, host: str, what: str):
        super().__init__(f"volume {host} {what}")
        self.host = host
        self.what = what

    @property
    def timed_out(self) -> bool:
        """Did a timer of ours run out (connect or answer), rather than the volume refuse or close?"""
        return _TIMED_OUT.search(self.what) is not None


_TIMED_OUT = re.compile(r"within [0-9.e+-]+s$")  # every timeout's message here ends "... within <n>s"


# connect() failing with these is the index's shortage, not the volume's fault
_LOCAL_ERRNOS = {errno.EMFILE: "open files", errno.ENFILE: "open files", errno.ENOBUFS: "socket buffers",
                 errno.ENOMEM: "memory", errno.EADDRNOTAVAIL: "local ports"}
LOCAL_PREFIX = "the index is out of "


class LocalError(VolumeError):
    """A volume could not be reached for want of something on the index's side (open files):
    says so, and is no sign that the volume is down."""

    def __init__(self, host: str, what: str, strerror: str):
        super().__init__(host, f"could not be reached: {strerror}")
        self.args = (f"{LOCAL_PREFIX}{what} ({strerror}, connecting to volume {host})",)


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"<Response {self.status} {len(self.body)} bytes>"


class _Watchdog:
    """The timeouts of every connection waiting on a volume, checked WATCH_TICK apart by one
    timer: cheaper than a timer per request (4% of the index's instructions under thrash)."""

    def __init__(self, loop):
        self.loop = loop
        self.waiting: set[_Conn] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, conn: _Conn) -> None:
        self.waiting.add(conn)
        if self._timer is None:
            self._timer = self.loop.call_later(WATCH_TICK, self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self.loop.time()
        for conn in [c for c in self.waiting if now - max(c.last_rx, c.watched) >= c.timeout]:
            conn.expire()
        if self.waiting:
            self._timer = self.loop.call_later(WATCH_TICK, self._tick)


class _Link(asyncio.Protocol):
    """What both kinds of volume connection share: bytes go to the response parser, and a
    failure fails whatever waits on the connection (`_lost`)."""

    host: str
    loop: asyncio.AbstractEventLoop
    parser: httptools.HttpResponseParser
    last_rx: float  # when the last byte came: the watchdog measures silence from it
    pool: Pool | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            cause = e.__context__  # a callback's own refusal (too big, unasked) says what it was
            self._lost(cause if isinstance(cause, VolumeError) else VolumeError(self.host, f"sent a malformed response: {e}"))
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if self._idle() and self.pool is not None and self.pool.on_idle_lost is not None:
            # nothing asked, yet the volume hung up: it may be stopping, which reads must know now
            self.pool.on_idle_lost(self.host)
        self._lost(VolumeError(self.host, "closed the connection" + (f" ({exc})" if exc else "")))

    def _idle(self) -> bool:
        """Kept for reuse, carrying no request, and not closed by us."""
        raise NotImplementedError

    def _lost(self, err: Exception | None) -> None:
        raise NotImplementedError


class _Conn(_Link):
    def __init__(self, host: str, watchdog: _Watchdog):
        self.host = host
        # kept, not looked up: asyncio.get_event_loop() makes a getpid() system call each time
        self.loop = asyncio.get_running_loop()
        self.watchdog = watchdog
        self.timeout = 0.0  # while watched: how long the volume may stay silent
        self.watched = 0.0  # when the watch began
        self.what = ""  # what the error says when the time is up
        self.transport = None
        self.closed = False
        self.keep_alive = True
        self.reused = False  # has served a request before: the volume may have closed it since
        self.idle = False  # in the pool, waiting for its next request
        self.expired = False  # a watchdog gave up on it
        self._write_paused = False
        # a download's consumer fell behind: may still hold when the answer is whole and the
        # connection goes back to the pool (see release)
        self.read_paused = False
        self._drain: asyncio.Future | None = None
        self.parser = None
        self.head_only = False
        self._reset(False)

    def _reset(self, head_only: bool, collect: bool = False) -> None:
        """Ready for the next request. `collect`: gather the whole body in `parts` (small
        answers) instead of streaming it through `body` with flow control."""
        loop = self.loop
        if self.parser is None or self.head_only:
            # after a HEAD the parser still waits for the body its Content-Length announced
            self.parser = httptools.HttpResponseParser(self)
        self.head_only = head_only
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        # the end of the head matters only to a download, which streams the body after it
        self.head = None if collect else loop.create_future()
        self.done = loop.create_future()
        self.parts: list[bytes] | None = [] if collect else None
        self.gathered = 0  # bytes in parts
        self.body = None if collect else Body(self, False)
        self.got_bytes = False
        self.last_rx = loop.time()

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        super().data_received(data)

    def _idle(self) -> bool:
        return self.idle and not self.closed

    def _lost(self, err: Exception) -> None:
        self.closed = True
        for fut in (self.head, self.done):
            if fut is not None and not fut.done():
                fut.set_exception(err)
                fut.exception()  # mark retrieved: nobody may be waiting on both
        if self.body is not None:
            self.body.fail(err)
        self._wake()
        self.unwatch()

    # -- a watchdog instead of asyncio.wait_for: no task per request, and it measures
    #    silence (from the watch or the last byte received, the later), so a long answer that
    #    keeps coming is not cut off --
    def watch(self, timeout: float, what: str) -> None:
        self.timeout = timeout
        self.what = what
        self.watched = self.loop.time()
        self.watchdog.add(self)

    def unwatch(self) -> None:
        self.watchdog.waiting.discard(self)

    def expire(self) -> None:
        what = self.what
        self.unwatch()
        self.expired = True
        self._lost(VolumeError(self.host, what))
        if self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    def _wake(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # flow control hooks used by Body
    def _pause(self, why: str) -> None:
        if not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume(self, why: str) -> None:
        if not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    # -- parser callbacks --
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if self.head is not None and not self.head.done():
            self.head.set_result(None)
        if self.head_only:
            # httptools cannot be told a response answers HEAD; its Content-Length announces a
            # body that will never come, so this response ends here.
            self.on_message_complete()

    def on_body(self, data: bytes) -> None:
        if self.parts is not None:
            self.parts.append(data)
            self.gathered += len(data)
            if self.gathered > MAX_ANSWER:
                raise too_big(self.host)
        else:
            self.body.feed(data)

    def on_message_complete(self) -> None:
        if self.body is not None:
            self.body.finish()
        if not self.done.done():
            self.done.set_result(None)

    async def drain(self, timeout: float) -> None:
        while self._write_paused and not self.closed:
            self._drain = self.loop.create_future()
            try:
                await asyncio.wait_for(self._drain, timeout)
            except asyncio.TimeoutError:
                raise VolumeError(self.host, f"took no data for {timeout:g}s") from None
        if self.closed:
            await self.done  # raises the reason


PIPE_MAX = 64 << 10  # writes up to this size (head and body) go whole on a pipe
# The most of an answer gathered whole (listings, HEADs, DELETEs, small GETs: a folder's listing
# is some 100 bytes a file): past it the answer is refused, so that a volume (or anything in its
# place) that sends without end cannot take the memory of the index or an admin command.
MAX_ANSWER = 64 << 20


def too_big(host: str) -> VolumeError:
    return VolumeError(host, f"sent an answer over {MAX_ANSWER >> 20} MB to a request answered in a few "
                             "(a listing, a HEAD): is it a minikv volume?")
PIPELINED = frozenset(("PUT", "DELETE"))  # quick for nginx to answer, and answered in a few bytes


class _Exchange:
    """One pipelined request and, once it has come, its answer."""

    __slots__ = ("data", "timeout", "what", "status", "headers", "parts", "gathered", "done", "keep_alive",
                 "started")

    def __init__(self, loop, data: bytes, timeout: float, what: str):
        self.data = data  # the whole request, kept to send it again
        self.timeout = timeout  # how long the volume may stay silent once it is this one's turn
        self.what = what  # what the error says then
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.parts: list[bytes] = []
        self.gathered = 0
        self.done = loop.create_future()
        self.keep_alive = True
        self.started = False  # a byte of its answer came


class _Pipe(_Link):
    """A connection carrying whole requests, several at a time, answered in order."""

    def __init__(self, host: str, watchdog: _Watchdog, pool: Pool):
        self.host = host
        self.loop = asyncio.get_running_loop()
        self.watchdog = watchdog
        self.pool = pool
        self.transport = None
        self.closed = False
        self.expired = False
        self.served = 0  # answers received: a connection that served one may since be closed
        self.queue: collections.deque[_Exchange] = collections.deque()  # unanswered, in order
        self.out: list[bytes] = []  # requests waiting for the end of the next pass
        self.parser = httptools.HttpResponseParser(self)
        self.watched = 0.0  # when the request at the head of the queue had its turn
        self.last_rx = 0.0

    @property
    def timeout(self) -> float:  # the watchdog's: the silence allowed to the oldest request
        return self.queue[0].timeout if self.queue else 0.0

    def add(self, ex: _Exchange) -> None:
        if not self.queue:
            self.watched = self.loop.time()
            self.watchdog.add(self)
        self.queue.append(ex)
        self.out.append(ex.data)

    def send(self) -> None:
        if self.out and not self.closed:
            self.transport.write(self.out[0] if len(self.out) == 1 else b"".join(self.out))
        self.out.clear()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _idle(self) -> bool:
        return not self.queue and not self.closed

    def _lost(self, err: Exception | None) -> None:
        """Fail every unanswered request: with `err`, or (None: the volume fell silent) each
        with what its own wait says."""
        self.closed = True
        self.watchdog.waiting.discard(self)
        while self.queue:
            ex = self.queue.popleft()
            if not ex.done.done():
                ex.done.set_exception(err or VolumeError(self.host, ex.what))
                ex.done.exception()  # retrieved: the waiter may be gone

    def expire(self) -> None:  # the watchdog's: the oldest request got no answer in time
        self.expired = True
        self._lost(None)
        self.close()

    # -- parser callbacks: the answer at the head of the queue --
    def on_message_begin(self) -> None:
        if not self.queue:
            raise VolumeError(self.host, "sent an answer to no request")
        self.queue[0].started = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.queue[0].headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        ex = self.queue[0]
        ex.status = self.parser.get_status_code()
        ex.keep_alive = self.parser.should_keep_alive()

    def on_body(self, data: bytes) -> None:
        ex = self.queue[0]
        ex.parts.append(data)
        ex.gathered += len(data)
        if ex.gathered > MAX_ANSWER:
            raise too_big(self.host)

    def on_message_complete(self) -> None:
        ex = self.queue.popleft()
        self.served += 1
        self.watched = self.loop.time()  # the next answer has the whole timeout again
        if not ex.done.done():
            ex.done.set_result(None)
        if not ex.keep_alive:
            self.close()  # those queued behind fail unanswered, and are sent again
        elif not self.queue:
            self.watchdog.waiting.discard(self)
            self.pool._idle_pipe(self)


class WholeUpload:
    """A PUT of a small value of known size: gathered, then sent whole on a pipe.
    The same calls as Upload."""

    paused = False

    def __init__(self, pool: Pool, host: str, head: bytes, length: int):
        self.pool = pool
        self.host = host
        self.parts = [head]
        self.left = length
        self.sent: tuple[_Pipe, _Exchange] | None = None

    def write(self, chunk: bytes) -> None:
        self.parts.append(chunk)
        self.left -= len(chunk)

    async def drain(self) -> None:
        pass

    def end(self) -> None:
        """Queue the request, to go out at the end of the next pass (with the other replicas')."""
        if self.sent is None and self.left == 0:
            pipe = self.pool._pipe_now(self.host)
            if pipe is not None:
                self._queue(pipe)

    async def finish(self) -> int:
        if self.left:
            raise VolumeError(self.host, f"was to get {self.left} more bytes of PUT body than were sent (a bug)")
        self.end()
        if self.sent is None:  # no idle connection was left: make one
            self._queue(await self.pool._pipe(self.host))
        pipe, ex = self.sent
        try:
            await ex.done
        except VolumeError as e:
            ex = await self.pool._again(pipe, ex, e)
        return ex.status

    def _queue(self, pipe: _Pipe) -> None:
        stall = self.pool.stall
        self.sent = self.pool._queue(pipe, b"".join(self.parts), stall, f"did not answer a PUT within {stall:g}s")

    def abort(self) -> None:
        """Nothing to undo: the request goes out whole or not at all (the connection may carry
        other requests, so it is not dropped); the caller deletes what may have been written."""


class Upload:
    """A streaming PUT to one volume: write() chunks, then finish() for the status."""

    def __init__(self, pool: Pool, conn: _Conn, chunked: bool, head: bytes):
        self.pool = pool
        self.conn = conn
        self.chunked = chunked
        self.host = conn.host
        # sent with the first chunk: one write (one syscall, one packet) for a small value
        self._head = head

    @property
    def paused(self) -> bool:
        return self.conn._write_paused or self.conn.closed

    def write(self, chunk: bytes) -> None:
        if self.chunked:
            chunk = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        if self._head:
            chunk, self._head = self._head + chunk, b""
        self.conn.write(chunk)

    async def drain(self) -> None:
        await self.conn.drain(self.pool.stall)

    def end(self) -> None:
        """Send what completes the request (without waiting for the answer)."""
        if self.chunked or self._head:
            self.conn.write(self._head + (b"0\r\n\r\n" if self.chunked else b""))
            self._head = b""
            self.chunked = False

    async def finish(self) -> int:
        """End the request and wait for the volume's status."""
        self.end()
        self.conn.watch(self.pool.stall, f"did not answer a PUT within {self.pool.stall:g}s")
        try:
            await self.conn.done
        except VolumeError:
            self.abort()
            raise
        finally:
            self.conn.unwatch()
        self.pool.release(self.conn)
        return self.conn.status

    def abort(self) -> None:
        """Drop the connection: nginx then discards the partial upload."""
        self.pool.discard(self.conn)


class Pool:
    def __init__(self, timeout: float = 1.0, max_idle: int = 64, secret: str = ""):
        self.timeout = timeout
        # proof for volumes started with -secret that this request comes from the index
        self.extra_head = f"X-Minikv-Secret: {secret}\r\n" if secret else ""
        self.stall = max(STALL_MIN, timeout)
        self.max_idle = max_idle
        self._idle: dict[str, collections.deque[_Conn]] = {}
        self._addr: dict[str, tuple[str, int]] = {}
        self._watchdog: _Watchdog | None = None
        self._pipes: dict[str, list[_Pipe]] = {}  # idle pipes per volume
        self._open: dict[str, _Pipe] = {}  # the pipe each volume's requests go on in this pass
        self._heads: dict[tuple[str, str], tuple[bytes, bytes]] = {}  # _head's, without a path
        # called with a volume's host:port when it closes a connection that was idle here
        self.on_idle_lost = None

    def _kept(self, host: str) -> _Conn | None:
        """An idle kept-alive connection to `host`, if there is one (the usual case)."""
        idle = self._idle.get(host)
        while idle:
            conn = idle.pop()
            conn.idle = False
            if not conn.closed:
                return conn
        return None

    def holds_idle(self, host: str) -> bool:
        """Whether a kept-alive connection to `host` waits in the pool (whose close we would see)."""
        return any(not conn.closed for conn in self._idle.get(host, ()))

    def address(self, host: str) -> tuple[str, int]:
        """Where to connect for `host` ("name:port"): the address a first connection resolved it to."""
        name, _, port = host.rpartition(":")
        return self._addr.get(host) or (name or "localhost", int(port or 80))

    async def _connect(self, host: str, kind=_Conn):
        """A new connection to `host`: a _Conn, or a _Pipe."""
        loop = asyncio.get_running_loop()
        if self._watchdog is None or self._watchdog.loop is not loop:
            self._watchdog = _Watchdog(loop)
        watchdog = self._watchdog
        make = (lambda: _Conn(host, watchdog)) if kind is _Conn else (lambda: _Pipe(host, watchdog, self))
        addr = self.address(host)
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(make, addr[0], addr[1]), self.timeout)
        except asyncio.TimeoutError:
            raise VolumeError(host, f"did not accept a connection within {self.timeout:g}s") from None
        except OSError as e:
            if e.errno in _LOCAL_ERRNOS:
                raise LocalError(host, _LOCAL_ERRNOS[e.errno], e.strerror) from None
            raise VolumeError(host, f"is unreachable: {e.strerror or e}") from None
        conn.pool = self
        try:
            peer = None if conn.transport.is_closing() else conn.transport.get_extra_info("peername")
        except AttributeError:  # uvloop, once the socket is gone
            peer = None
        if conn.closed or peer is None:  # the volume closed it at once: it is stopping
            conn.transport.close()
            raise VolumeError(host, "closed the connection as soon as it was made")
        # resolve a name once: "localhost" would otherwise be looked up on every connection
        self._addr.setdefault(host, peer[:2])
        return conn

    # -- pipes --
    def _pipe_now(self, host: str) -> _Pipe | None:
        """The pipe `host`'s requests go on in this pass: the one already chosen, or an idle one
        (None: a new connection is needed)."""
        pipe = self._open.get(host)
        if pipe is not None and not pipe.closed:
            return pipe
        idle = self._pipes.get(host)
        while idle:
            pipe = idle.pop()
            if not pipe.closed:
                self._choose(pipe)
                return pipe
        return None

    async def _pipe(self, host: str) -> _Pipe:
        pipe = self._pipe_now(host)
        if pipe is None:
            pipe = await self._connect(host, _Pipe)
            other = self._open.get(host)
            if other is not None and not other.closed:  # chosen while we connected
                self._idle_pipe(pipe)
                return other
            self._choose(pipe)
        return pipe

    def _choose(self, pipe: _Pipe) -> None:
        if not self._open:
            # after one more poll of the sockets: requests made by the answers and client
            # requests it brings share the write too (+5% thrash loops/s in A/B runs; the poll
            # does not wait, as a callback is ready)
            loop = pipe.loop
            loop.call_soon(loop.call_soon, self._send_pipes)
        self._open[pipe.host] = pipe

    def _send_pipes(self) -> None:
        """The end of the next pass: each chosen pipe sends its requests in one write."""
        pipes, self._open = self._open, {}
        for pipe in pipes.values():
            if pipe.queue:
                pipe.send()
            elif not pipe.closed:  # chosen but not used (an upload whose body did not come)
                self._idle_pipe(pipe)

    def _idle_pipe(self, pipe: _Pipe) -> None:
        idle = self._pipes.setdefault(pipe.host, [])
        if len(idle) >= self.max_idle:
            pipe.close()
        else:
            idle.append(pipe)

    def _queue(self, pipe: _Pipe, data: bytes, timeout: float, what: str) -> tuple[_Pipe, _Exchange]:
        ex = _Exchange(pipe.loop, data, timeout, what)
        pipe.add(ex)
        return pipe, ex

    async def _again(self, pipe: _Pipe, ex: _Exchange, err: VolumeError) -> _Exchange:
        """After `ex` failed with `err`: a request that got no answer because the connection
        closed under it (after an earlier answer: it was kept alive, or the answer before closed
        it) is sent once more, on another connection; any other failure is raised."""
        if ex.started or pipe.expired or not pipe.served:
            raise err
        pipe, ex = self._queue(self._pipe_now(pipe.host) or await self._pipe(pipe.host), ex.data, ex.timeout, ex.what)
        await ex.done
        return ex

    def release(self, conn: _Conn) -> None:
        if conn.closed or not conn.keep_alive or not conn.done.done() or conn.done.exception():
            self.discard(conn)
            return
        conn.reused = True
        if conn.read_paused:  # the next answer must be read, not left in the socket
            conn._resume("reuse")
        idle = self._idle.setdefault(conn.host, collections.deque())
        if len(idle) >= self.max_idle:
            self.discard(conn)
            return
        conn.idle = True
        idle.append(conn)

    def discard(self, conn: _Conn) -> None:
        conn.closed = True
        if conn.transport is not None:
            conn.transport.close()

    def forget(self, host: str) -> None:
        """Close every idle connection to a volume (it restarted or went down)."""
        for conn in self._idle.pop(host, ()):
            self.discard(conn)
        for pipe in self._pipes.pop(host, ()):
            pipe.close()

    def close(self) -> None:
        for host in {*self._idle, *self._pipes}:
            self.forget(host)

    def bare_head(self, method: str, host: str) -> tuple[bytes, bytes]:
        """The head of a request with no headers and no body, before and after its path."""
        ends = self._heads.get((method, host))
        if ends is None:
            ends = self._heads[(method, host)] = (f"{method} ".encode(), f" HTTP/1.1\r\nHost: {host}\r\n"
                                                  f"{self.extra_head}\r\n".encode("latin-1"))
        return ends

    def _head(self, method: str, host: str, path: str, headers, length: int | None) -> bytes:
        VOLUME_REQUESTS[host] = VOLUME_REQUESTS.get(host, 0) + 1
        if length == 0 and not headers and method not in ("PUT", "POST"):
            head, tail = self.bare_head(method, host)  # a walk's listings: built once per volume
            return head + path.encode("latin-1") + tail
        lines = [f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{self.extra_head}"]
        lines.extend(f"{n}: {v}\r\n" for n, v in headers)
        if length is None:
            lines.append("Transfer-Encoding: chunked\r\n")
        elif length or method in ("PUT", "POST"):
            lines.append(f"Content-Length: {length}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    async def request(self, host: str, method: str, path: str, body: bytes = b"",
                      headers=(), timeout: float | None = None, pipelined: bool = False) -> Response:
        """One whole request and response (small bodies: DELETE, HEAD, listings). `timeout`
        bounds the silence: an answer that keeps coming may take longer. `pipelined`: a GET
        that may share a connection (and a write) with others, as PUT and DELETE always do."""
        result = (await self.request_many([(host, method, path)], body, headers, timeout, pipelined))[0]
        if isinstance(result, VolumeError):
            raise result
        return result

    async def request_many(self, targets: list[tuple[str, str, str]], body: bytes = b"", headers=(),
                           timeout: float | None = None, pipelined: bool = False) -> list[Response | VolumeError]:
        """The same kind of request to several volumes at once: every request is sent before
        any answer is awaited (no task per request). A Response or a VolumeError for each."""
        timeout = timeout or self.timeout
        sent: list[tuple[_Pipe, _Exchange] | _Conn | VolumeError] = []
        for host, method, path in targets:
            data = self._head(method, host, path, headers, len(body)) + body
            what = f"did not answer {method} within {timeout:g}s"
            try:
                if (method in PIPELINED or pipelined and method == "GET") and len(data) <= PIPE_MAX:
                    sent.append(self._queue(self._pipe_now(host) or await self._pipe(host), data, timeout, what))
                    continue
                # alone: a slow answer would hold up the requests behind it, and httptools
                # cannot be told that an answer is to HEAD (it would read the next answer as
                # the body this one announced)
                conn = self._kept(host) or await self._connect(host)
            except VolumeError as e:
                sent.append(e)
                continue
            conn._reset(method == "HEAD", collect=True)
            conn.write(data)
            conn.watch(timeout, what)
            sent.append(conn)
        results: list[Response | VolumeError] = []
        for (host, method, path), item in zip(targets, sent):
            try:
                if isinstance(item, VolumeError):
                    raise item
                if isinstance(item, tuple):
                    pipe, ex = item
                    try:
                        await ex.done
                    except VolumeError as e:
                        ex = await self._again(pipe, ex, e)
                    results.append(Response(ex.status, ex.headers, b"".join(ex.parts)))
                else:
                    results.append(await self._answered(item, (host, method, path), body, headers, timeout))
            except VolumeError as e:
                results.append(e)
        return results

    async def _answered(self, conn: _Conn, target: tuple[str, str, str], body: bytes, headers,
                        timeout: float) -> Response:
        try:
            await conn.done
        except VolumeError:
            self.discard(conn)
            if not (conn.reused and not conn.got_bytes and not conn.expired):
                raise
            # a kept-alive connection the volume closed meanwhile: one fresh try
            again = (await self.request_many([target], body, headers, timeout))[0]
            if isinstance(again, VolumeError):
                raise again from None
            return again
        finally:
            conn.unwatch()
        self.release(conn)
        return Response(conn.status, conn.headers, b"".join(conn.parts))

    async def upload(self, host: str, path: str, length: int | None, headers=()) -> Upload | WholeUpload:
        head = self._head("PUT", host, path, headers, length)
        if length is not None and len(head) + length <= PIPE_MAX:
            if self._pipe_now(host) is None:
                await self._pipe(host)  # connect now: an unreachable volume fails before the body is read
            return WholeUpload(self, host, head, length)
        conn = self._kept(host) or await self._connect(host)
        conn._reset(False, collect=True)  # a volume's answer to PUT is a few bytes
        return Upload(self, conn, length is None, head)

    async def download(self, host: str, path: str, headers=()) -> tuple[_Conn, Body]:
        """GET with the body as a stream. Call `pool.finish_download(conn)` when done."""
        conn = self._kept(host) or await self._connect(host)
        conn._reset(False)
        conn.write(self._head("GET", host, path, headers, 0))
        conn.watch(self.timeout, f"did not answer GET within {self.timeout:g}s")
        try:
            await conn.head
        except VolumeError:
            self.discard(conn)
            raise
        finally:
            conn.unwatch()
        return conn, conn.body

    def finish_download(self, conn: _Conn) -> None:
        if conn.done.done() and not conn.done.exception():
            self.release(conn)
        else:
            self.discard(conn)
