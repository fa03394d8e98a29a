"""The index's HTTP/1.1 server: an asyncio Protocol on the httptools (llhttp) parser.

One `Connection` per client socket. It only moves bytes, keeps requests in order and runs
timers; what a request means is the application's business (`app.handle(request)`), which
answers either at once with the response bytes (the hot path: GET/HEAD of a key costs no task
and no await), with a coroutine that streams the body and writes the answer later, or with a
future of the answer that a callback completes (a read that waits for a networked index: no task).

Rules it keeps:
- pipelined requests are answered in order: while one is being handled, later ones wait in a
  queue and reading pauses, so nothing is buffered without bound; the same while the client
  does not take its answers (the transport's buffer is full): one read of many small requests
  for big answers (`?list` pages) is not answered all at once into memory;
- a request body is a flow-controlled stream (`Body`): reading from the socket pauses when
  more than BODY_HIGH bytes wait for the handler;
- `Expect: 100-continue` is answered with `100 Continue` only when the handler starts reading
  the body, so a request that is refused first (403/409/411) never has its body sent;
- whole answers are written once the event loop has been round every socket that was ready
  (`write_soon`), not one by one as they are made: a client woken by its answer then finds the
  others ready too, instead of being woken (and preempting us) once per answer. On a 2-core
  machine under wrk this is about 15% more reads served; the answers wait microseconds;
- a response sent before its request body was fully read closes the connection afterwards,
  since the rest of that body would otherwise be taken for the next request;
- limits on the URL (414) and headers (431), also while a header line is still coming (llhttp
  holds it until it ends, growing), a timeout to read a request's headers (408),
  one for a stalled body (408), and one for idle keep-alive connections;
- anything malformed gets a 400 with a reason and the connection is closed; nothing a client
  sends can raise out of this class.

The fast path: a read that holds exactly one plain GET or HEAD (no body, no pipelining, no
upgrade) is matched whole by one regular expression instead of going through five parser
callbacks; that is most of the traffic, and 7% of the instructions of a 404. The expression
accepts only requests llhttp also accepts, with the same target and headers
(tests/test_fuzz.py checks this on generated requests); anything else goes to the parser.
"""

from __future__ import annotations

import asyncio
import collections
import re
import sys
import time
from dataclasses import dataclass

import httptools

from minikv.http.response import ClientGone, HTTPError, add_close, error

BODY_HIGH = 1 << 20  # pause reading the client when this much body waits for the handler
BODY_LOW = 256 << 10
OUT_HIGH = 64 << 10  # answers held for the end of the loop's pass past this go out at once
HEAD_SLACK = 8192  # a request's line and header separators, beyond the limits on URL and headers
DISCARD_MAX = 1 << 20  # body bytes we read and drop after an early answer, to keep the connection
# after an early answer to a bigger body: seconds we go on reading and dropping what the client
# sends before closing (in all, and with nothing coming), as nginx's lingering close does
LINGER_TOTAL = 10.0
LINGER_IDLE = 2.0
IO = [0, 0]  # bytes this process received from and sent to clients (for minikv/ops: one add each)
# minikv/ops's per-worker Counters when it counts requests (-metrics-port), else None: counted in
# _start, inline, since a wrapper around app.handle (one more Python frame) cost 9% of a read;
# an answer made at once is timed by the loop's pass it was made in (see Counters.tally)
COUNTS = None
# the methods of the fast path, one object each: a dict finds them by the hash they keep
GET, HEAD = b"GET", b"HEAD"
_clock = time.perf_counter


@dataclass
class Limits:
    max_url: int = 8192
    max_header_bytes: int = 65536
    max_headers: int = 100
    header_timeout: float = 10.0  # from a request's first byte to the end of its headers
    body_timeout: float = 60.0  # longest wait for more body bytes
    # slowest average rate of a body past its first body_timeout: a body of N bytes has at most
    # body_timeout + N / body_min_rate seconds (1 GB at 1 KiB/s: 12 days; 1 byte a minute: 60 s)
    body_min_rate: int = 1024
    idle_timeout: float = 75.0  # keep-alive connection with no request


class Body:
    """The request body as an async stream of chunks, with flow control on the socket."""

    __slots__ = ("_conn", "_chunks", "_buffered", "done", "_error", "_waiter", "_wants_continue", "discard")

    def __init__(self, conn: Connection | None, wants_continue: bool):
        self._conn = conn
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self.done = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future | None = None
        self._wants_continue = wants_continue
        self.discard = 0  # > 0: answered already; drop up to this many more bytes, then give up

    # -- protocol side --
    def feed(self, data: bytes) -> None:
        if not data:  # read() answers b"" only at the end: an empty chunk queued would end the body
            return
        if self.discard:
            self.discard -= len(data)
            if self.discard <= 0 and self._conn is not None:
                self._conn.close()
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > BODY_HIGH and self._conn is not None:
            self._conn._pause("body")
        self._wake()

    def finish(self) -> None:
        self.done = True
        self._wake()

    def fail(self, exc: Exception) -> None:
        if not self.done:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- handler side --
    @property
    def complete(self) -> bool:
        return self.done and not self._chunks

    async def read(self) -> bytes:
        """The next chunk; b"" at the end. Raises ClientGone if the client went away."""
        if self._wants_continue:
            self._wants_continue = False
            if self._conn is not None and not self._conn.closed:
                self._conn.send_interim(b"HTTP/1.1 100 Continue\r\n\r\n")
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.done:
                return b""
            loop = self._conn.loop if self._conn is not None else asyncio.get_running_loop()
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        if len(chunks) == 1:
            chunk = chunks.popleft()
        else:  # all that waits in one: a body sent in 1-byte chunks is not a pass of the handler each
            chunk = b"".join(chunks)
            chunks.clear()
        self._buffered -= len(chunk)
        if self._buffered < BODY_LOW and self._conn is not None:
            self._conn._resume("body")
        return chunk

    async def read_all(self, limit: int) -> bytes:
        parts, size = [], 0
        while chunk := await self.read():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"request body larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)


# One plain request, whole: method, target (absolute path, visible ASCII, no fragment), header
# lines of token names and field values without control characters, the blank line, nothing more.
_SIMPLE = re.compile(
    rb"(?:(G)ET|HEAD) (/[!\"$-~]*) HTTP/1\.1\r\n"
    rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t -~\x80-\xff]*\r\n)*)\r\n")
# headers that give a request a body, change the protocol or need the parser's judgement
_NOT_SIMPLE = frozenset((b"content-length", b"transfer-encoding", b"expect", b"upgrade"))

NO_BODY = Body(None, False)  # shared by every request without a body: already complete
NO_BODY.done = True


class Request:
    __slots__ = ("method", "url", "headers", "keep_alive", "body", "conn", "has_body")

    def __init__(self, method: bytes, url: bytes, headers: list, keep_alive: bool,
                 body: Body, conn: Connection | None, has_body: bool):
        self.method = method
        self.url = url
        self.headers = headers  # [(lower-case name, value)] as bytes
        self.keep_alive = keep_alive
        self.body = body
        self.conn = conn
        self.has_body = has_body

    def header(self, name: bytes, default: bytes | None = None) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return default


class Batch:
    """The connections whose whole answers wait for the end of this pass of the event loop.
    One per loop, shared by its connections: one callback per pass writes them all."""

    __slots__ = ("loop", "conns", "_due")

    def __init__(self, loop):
        self.loop = loop
        self.conns: list[Connection] = []
        self._due = False  # flush() will run at the end of this pass

    def add(self, conn: Connection) -> None:
        if not self._due:  # due() inline: this runs once a pass on every server
            self._due = True
            self.loop.call_soon(self.flush)
        self.conns.append(conn)

    def due(self) -> None:
        """Have flush() run at the end of this pass (the counting's tally rides on it)."""
        if not self._due:
            self._due = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._due = False
        conns, self.conns = self.conns, []
        for conn in conns:
            conn._send_out()
        counts = COUNTS
        if counts is not None and counts.began:  # this pass's answers are out: their time is known
            counts.tally()



def _error(req: Request, e: HTTPError) -> bytes:
    """The answer an HTTPError becomes: without its reason as a body after a HEAD, whose answer
    has none (the client would read the reason as the start of the next answer)."""
    return error(e.status, "" if req.method == b"HEAD" else e.reason, e.headers)

class Connection(asyncio.Protocol):
    """One client connection. `app.handle(request)` returns bytes or a coroutine."""

    connections: set[Connection] = set()  # for the per-process timeout sweep

    def __init__(self, app, limits: Limits | None = None, loop=None, max_connections: int = 0,
                 batch: Batch | None = None):
        self.app = app
        self.max_connections = max_connections
        self.limits = limits or Limits()
        self.loop = loop or asyncio.get_event_loop()
        self._batch = batch or Batch(self.loop)
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.last = self.loop.time()
        self._lingering = 0.0  # when the lingering close ends (0: not lingering; see _linger)
        self._queue: collections.deque[Request] = collections.deque()
        self._current: Request | None = None  # being handled
        self._reading: Request | None = None  # whose body the parser is on
        self._task: asyncio.Task | None = None
        self._paused: set[str] = set()
        self._write_paused = False
        self._write_paused_at = 0.0
        self._draining = False  # _next's loop runs: a request answered inside it leaves the next to it
        self._drain_waiter: asyncio.Future | None = None
        self._url = b""
        self._headers: list = []
        self._header_bytes = 0
        self._started: float | None = None  # when the request being parsed began
        self._idle = True  # between two requests
        self._writes = 0  # response writes so far; compared with _answer_mark
        self._answer_mark = 0  # _writes when the current request started
        self._out: list[bytes] = []  # whole answers waiting for the end of the loop's pass
        self._out_size = 0
        self._messages = 0  # requests begun on this connection
        self._head_fed = 0  # bytes of reads that held only the current request's headers
        self._rebalance = False
        self._held = b""  # the start of a REBALANCE method cut by the end of a read
        self._failed: bytes | None = None  # a later message's error, sent once those before it are answered
        # bytes of the request body still to come, when its Content-Length said (else <= 0):
        # a read of body bytes only is not searched for REBALANCE (9% of a big PUT's CPU)
        self._body_left = 0
        # the body's average rate is measured from _body_since, when _body_left was _body_mark
        self._body_since = 0.0
        self._body_mark = 0
        # longer reads are never one plain request within the limits: the parser judges them
        self._simple_max = min(self.limits.max_url, self.limits.max_header_bytes)

    # -- asyncio.Protocol --
    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.max_connections and len(Connection.connections) >= self.max_connections:
            self.closed = True
            transport.write(add_close(error(503, f"more than {self.max_connections} connections: try again")))
            transport.close()
            return
        Connection.connections.add(self)

    def connection_lost(self, exc) -> None:
        self.closed = True
        Connection.connections.discard(self)
        gone = ClientGone("client closed the connection")
        for req in (self._reading, self._current, *self._queue):
            if req is not None:
                req.body.fail(gone)
        self._wake_drain()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        IO[0] += len(data)
        self.last = self.loop.time()
        if self._lingering:  # the rest of a refused body: dropped
            return
        if self._idle and self._current is None and len(data) <= self._simple_max and not self._held:
            req = self._simple(data)
            if req is not None:
                self._start(req)
                return
        if self._held:
            data, self._held = self._held + data, b""
        head = self._messages if self._started is not None else -1  # inside a request's headers
        try:
            if self._body_left >= len(data):  # body bytes only: no request can start in them
                self.parser.feed_data(data)
            elif data.find(b"REBALANCE ") >= 0:
                self._feed_rebalance(data)
            elif data[-1:] in _REBALANCE_LETTERS and (cut := _rebalance_prefix(data)):
                # the read may end inside a REBALANCE method: keep it for the next read
                if len(data) > cut:  # llhttp hands an empty piece inside a body on as an empty chunk
                    self.parser.feed_data(data[:-cut])
                if self._idle:
                    self._held = data[-cut:]
                else:
                    self.parser.feed_data(data[-cut:])
            else:
                self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, HTTPError):
                self._fail(cause.status, cause.reason, parsing=True)
            else:
                self._internal_error(cause or e)
        except httptools.HttpParserUpgrade:
            # the request that asked for it has its one answer (it closes the connection): what
            # follows it is in a protocol we do not speak, so read no more and parse none of it
            self._pause("upgrade")
            self.parser = _DISCARD
        except httptools.HttpParserError as e:
            self._fail(400, f"malformed HTTP request: {_reason(e)}", parsing=True)
        if head == self._messages and self._started is not None and not self.closed:
            # the whole read was header bytes of one request: on_header checks the limit only
            # once a line has ended, and until then llhttp grows the line (a copy per read)
            self._head_fed += len(data)
            if self._head_fed > self.limits.max_url + self.limits.max_header_bytes + HEAD_SLACK:
                self._fail(431, f"request headers larger than {self.limits.max_header_bytes} bytes", parsing=True)

    def _simple(self, data: bytes) -> Request | None:
        """The request, when `data` is exactly one plain GET/HEAD; None sends it to the parser."""
        m = _SIMPLE.fullmatch(data)
        if m is None:
            return None
        get, url, block = m.groups()
        headers = []
        keep_alive = True
        if block:
            for line in block[:-2].split(b"\r\n"):
                name, _, value = line.partition(b":")
                name = name.lower()
                value = value.lstrip(b" \t")  # llhttp keeps trailing whitespace: so do we
                if name in _NOT_SIMPLE:
                    return None
                if name == b"connection":
                    token = value.lower()
                    if token == b"close":
                        keep_alive = False
                    elif token != b"keep-alive":
                        return None
                headers.append((name, value))
            if len(headers) > self.limits.max_headers:
                return None
        return Request(GET if get else HEAD, url, headers, keep_alive, NO_BODY, self, False)

    def _feed_rebalance(self, data: bytes) -> None:
        """minikeyvalue's REBALANCE is a method llhttp does not know: between requests it is
        fed to the parser as REBIND (which we do not serve otherwise) and named back after."""
        pos = 0
        while (i := data.find(b"REBALANCE ", pos)) >= 0:
            if i > pos:  # never an empty piece: inside a body llhttp passes it on as an empty chunk
                self.parser.feed_data(data[pos:i])
            if self._idle:
                self._rebalance = True
                self.parser.feed_data(b"REBIND ")
            else:
                self.parser.feed_data(b"REBALANCE ")
            pos = i + 10
        if pos < len(data):
            self.parser.feed_data(data[pos:])

    def pause_writing(self) -> None:
        self._write_paused = True
        self._write_paused_at = self.loop.time()
        self._pause("write")  # no new requests while the client does not take its answers

    def resume_writing(self) -> None:
        self._write_paused = False
        self.last = self.loop.time()  # the client took answers: it is not idle
        self._resume("write")
        self._wake_drain()
        if self._current is None and self._queue and not self.closed:
            self._next()

    def eof_received(self):
        if self._reading is not None:  # the client stopped sending mid-body: it is gone
            self._reading.body.fail(ClientGone("client closed the connection mid-body"))
            return None
        # A half-closed client may still read our answer; keep the socket until we are done.
        return True if (self._current or self._queue) else None

    # -- parser callbacks --
    def on_message_begin(self) -> None:
        self._idle = False
        self._messages += 1
        self._head_fed = 0
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._started = self.last

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_url:
            raise HTTPError(414, f"URL longer than {self.limits.max_url} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > self.limits.max_header_bytes or len(self._headers) >= self.limits.max_headers:
            raise HTTPError(431, f"request headers larger than {self.limits.max_header_bytes} bytes "
                                 f"or more than {self.limits.max_headers} of them")
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self.closed:
            return
        p = self.parser
        headers = self._headers
        body = NO_BODY
        length = 0  # of the body; -1: chunked, its end known only from its chunks
        codings = False
        for name, value in headers:
            if name == b"content-length":
                if value.strip() not in (b"0", b""):
                    body = None
                    length = int(value)  # llhttp has checked that it is a number
            elif name == b"transfer-encoding":
                body = None
                length = -1
                codings = True
        version = p.get_http_version()
        if version[0] != "1":  # llhttp reads HTTP/0.9 and 2.0 request lines too: refused as Go's net/http does
            raise HTTPError(400 if version[0] == "0" else 505, f"HTTP/{version} is not supported: send HTTP/1.1")
        if codings:
            _check_codings(headers, version)
        if body is None:  # an Expect other than 100-continue is ignored, as S3 and nginx do
            body = Body(self, any(n == b"expect" and v.lower() == b"100-continue" for n, v in headers))
            self._body_left = self._body_mark = length
            self._body_since = self.last
        method = p.get_method()
        if self._rebalance:
            self._rebalance = False
            method = b"REBALANCE"
        keep_alive = p.should_keep_alive()
        if p.should_upgrade():  # `Connection: upgrade` or CONNECT: answered in HTTP/1.1, then closed
            if body is not NO_BODY:  # llhttp would take the body for the new protocol's bytes
                raise HTTPError(400, "protocol upgrades are not supported: send this request without "
                                     "`Connection: upgrade`")
            keep_alive = False
        req = Request(method, self._url, headers, keep_alive, body, self, body is not NO_BODY)
        self._started = None
        self._reading = req
        if self._current is None and not self._write_paused:
            self._start(req)
        else:
            self._queue.append(req)
            self._pause("pipeline")

    def on_body(self, data: bytes) -> None:
        self._body_left -= len(data)
        if self._reading is not None:  # None once closed: the parser may still be mid-chunk
            self._reading.body.feed(data)

    def on_message_complete(self) -> None:
        self._idle = True
        self._body_left = 0
        req = self._reading
        if req is not None:
            self._reading = None
            req.body.finish()
            if req.body.discard:  # the rest of an answered request's body is gone: next one
                self._next()

    # -- request cycle --
    def _start(self, req: Request) -> None:
        self._current = req
        self._answer_mark = self._writes
        counts = COUNTS
        if counts is not None and not counts.began:  # the first request of this pass of the loop:
            counts.began = _clock()
            self._batch.due()  # whose flush at the end of the pass has the counts tally it
        try:
            result = self.app.handle(req)
        except HTTPError as e:
            result = _error(req, e)
        except Exception as e:  # a bug must cost one request, not the process
            if counts is not None:
                counts.done(req.method, b"500", _clock() - counts.began)
            self._internal_error(e)
            return
        if isinstance(result, bytes):
            if counts is not None:  # one more of this kind in this pass (see Counters.rows)
                try:
                    row = counts.rows[req.method]
                    if result is not row[0]:  # else the same answer as the last (a 404 made once a second)
                        row[1] = row[2][result[9]][result[10]][result[11]]
                        row[0] = result
                    row[1][0] += 1
                except (KeyError, IndexError, TypeError):  # a kind not in the tables yet
                    counts.kind(req.method, result)
            if req.body is NO_BODY and req.keep_alive and not self._queue and not self.closed:
                # the common answer (a read): write it and be ready for the next request
                self.write_soon(result)
                self._current = None
                if self._paused:
                    self._resume("pipeline")
                return
            self._respond(req, result)
        else:
            if counts is not None:
                result = counts.track(req, result, counts.began)
            elif isinstance(result, asyncio.Future):  # an answer a callback will make: no task for it
                result.add_done_callback(lambda done: self._settled(req, done))
                return
            self._task = self.loop.create_task(self._run(req, result))

    async def _run(self, req: Request, coro) -> None:
        try:
            result = await coro
        except HTTPError as e:
            result = _error(req, e)
        except ClientGone:
            self.close()
            return
        except Exception as e:
            self._internal_error(e)
            return
        finally:
            self._task = None
        self._respond(req, result)

    def _settled(self, req: Request, done: asyncio.Future) -> None:
        """As _run, for an answer given as a future (api/app_pg.py's reads)."""
        try:
            result = done.result()
        except HTTPError as e:
            result = _error(req, e)
        except (ClientGone, asyncio.CancelledError):  # the worker is stopping: no answer will come
            self.close()
            return
        except Exception as e:
            self._internal_error(e)
            return
        self._respond(req, result)

    def _respond(self, req: Request, data: bytes | None) -> None:
        """Send what the handler returned (None: it wrote the response itself) and move on.

        An answer given before the request body was read (a refused PUT) keeps the connection
        only if the client is sending that body anyway (no unanswered `Expect: 100-continue`)
        and it is small: the parser must read past it to find the next request."""
        body = req.body
        close = not req.keep_alive
        if body._chunks:  # answered without reading it all: what waits is not needed any more
            body._chunks.clear()
            body._buffered = 0
            self._resume("body")
        if not body.done:
            length = req.header(b"content-length")
            remaining = int(length) - body._buffered if length is not None and length.isdigit() else -1
            if body._wants_continue or not 0 < remaining <= DISCARD_MAX:
                close = True
        if data:
            self.write_soon(add_close(data) if close else data)
        if close:
            if body.done:
                self.close()
            else:
                self._linger()
            return
        if not body.done:
            body.discard = remaining + 1  # on_message_complete moves on
            self._resume("body")
            return
        self._next()

    def _next(self) -> None:
        """The current request is done: start the queued ones, in a loop, not by recursion (a
        request answered at once calls _next again: a thousand pipelined ones would overflow
        the stack)."""
        self._current = None
        if self._draining:
            return  # the loop below, further up the stack, goes on
        self._draining = True
        try:
            while self._queue and self._current is None and not self.closed:
                if self._write_paused:
                    return  # resume_writing goes on with the queue
                nxt = self._queue.popleft()
                if not self._queue:
                    self._resume("pipeline")
                self._start(nxt)
        finally:
            self._draining = False
        if not self._queue:
            self._resume("pipeline")
            if self._failed is not None and self._current is None:
                self.write_soon(self._failed)
                self.close()

    def _fail(self, status: int, reason: str, parsing: bool = False) -> None:
        """A protocol error: answer it (unless another answer is under way) and close.

        `parsing`: the error is the parser's, about the message it is reading. When requests
        before that one are still to be answered, it waits its turn: sent now, the client would
        take it for the answer of the first of them."""
        if parsing and not self.closed:
            reading = self._reading
            if reading is not None and reading is not self._current:  # a queued request's body
                self._queue.remove(reading)
                self._reading = None
                reading.body.fail(ClientGone(reason))
            if (self._current is not None and self._current is not reading) or self._queue:
                self._failed = add_close(error(status, reason))
                self._started = None
                self._idle = False  # no request is read past it, not even a simple GET
                self._pause("failed")
                self.parser = _DISCARD  # nothing after the bad message is read
                return
        if not self.closed and (self._current is None or self._writes == self._answer_mark):
            self.write(add_close(error(status, reason)))
        self.close()

    def _internal_error(self, exc: BaseException) -> None:
        print(f"minikv: internal error: {exc!r}", file=sys.stderr)
        self._fail(500, f"internal error: {exc}")

    # -- writing --
    def write(self, data: bytes) -> None:
        """Send now (part of a streamed answer: its writer drains between chunks)."""
        if not self.closed:
            self._writes += 1
            self.send_interim(data)

    def write_soon(self, data: bytes) -> None:
        """Send a whole answer at the end of this pass of the event loop, in order with the rest."""
        if not self.closed:
            IO[1] += len(data)
            self._writes += 1
            if not self._out:
                self._batch.add(self)
            self._out.append(data)
            self._out_size += len(data)
            if self._out_size > OUT_HIGH:  # the transport says when the client is not reading
                self._send_out()

    def send_interim(self, data: bytes) -> None:
        """Send now, after what is waiting, and not counted as an answer (a `100 Continue`)."""
        if not self.closed:
            if self._out:
                self._send_out()
            IO[1] += len(data)
            self.transport.write(data)

    def _send_out(self) -> None:
        out = self._out
        self._out_size = 0
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()  # before the write, which may call back into this connection (pause_writing)
        if data and not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the client has taken what was written; ClientGone if it left."""
        while self._write_paused and not self.closed:
            self._drain_waiter = self.loop.create_future()
            await self._drain_waiter
        if self.closed:
            raise ClientGone("client closed the connection")

    def _wake_drain(self) -> None:
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)
        self._drain_waiter = None

    def close(self) -> None:
        if not self.closed:
            self._send_out()  # the answers made before the close go out before it
            self.closed = True
            Connection.connections.discard(self)
            self.transport.close()
            gone = ClientGone("connection closed")
            for req in (self._reading, *self._queue):
                if req is not None:
                    req.body.fail(gone)

    def _linger(self) -> None:
        """Close after answering a request whose body is still coming: the answer goes out with
        our end of the connection shut, and what the client still sends is read and dropped for
        up to LINGER_TOTAL seconds. Closed at once, the unread bytes make the kernel answer with
        a reset, which can destroy the answer before the client reads it (a client that sends
        its whole body before reading, as Python's http.client does, then sees only the reset)."""
        if self.closed or self._lingering:
            return
        self._send_out()
        try:
            self.transport.write_eof()
        except (AttributeError, NotImplementedError, RuntimeError, OSError):
            self.close()
            return
        self.last = self.loop.time()  # reading may have been paused for a while: silence counts from now
        self._lingering = self.last + LINGER_TOTAL
        gone = ClientGone("the request was answered before its body came")
        for req in (self._reading, *self._queue):
            if req is not None:
                req.body.fail(gone)
        if self._paused:
            self._paused.clear()
            self.transport.resume_reading()

    def _abort(self) -> None:
        """Drop the connection and what waits to be sent on it."""
        if not self.closed:
            self._out.clear()
            self.close()
            self.transport.abort()
            self._wake_drain()

    # -- flow control --
    def _pause(self, why: str) -> None:
        if not self._paused and not self.closed:
            self.transport.pause_reading()
        self._paused.add(why)

    def _resume(self, why: str) -> None:
        if why in self._paused:
            self._paused.discard(why)
            if not self._paused and not self.closed:
                self.transport.resume_reading()

    # -- timers --
    def check_timeouts(self, now: float) -> None:
        lim = self.limits
        if self._lingering:
            if now >= self._lingering or now - self.last > LINGER_IDLE:
                if self.transport.get_write_buffer_size():
                    self._abort()  # an answer the client has not taken would hold the connection without end
                else:
                    self.close()
        elif self._write_paused and now - self._write_paused_at > lim.idle_timeout:
            # the client has taken none of its answers for that long (as nginx's send_timeout):
            # dropped, without waiting to send what it will not read
            self._abort()
        elif self._started is not None and now - self._started > lim.header_timeout:
            self._fail(408, f"request headers not received within {lim.header_timeout:g}s", parsing=True)
        elif self._reading is not None and not self._paused and now - self.last > lim.body_timeout:
            self._reading.body.fail(ClientGone(f"no request body bytes for {lim.body_timeout:g}s"))
            self._fail(408, f"request body stalled for {lim.body_timeout:g}s")
        elif self._reading is not None and lim.body_min_rate and self._reading.body is not NO_BODY:
            if self._paused:  # we hold the client back: its rate counts from when we stop
                self._body_since, self._body_mark = now, self._body_left
            elif now - self._body_since > lim.body_timeout + (self._body_mark - self._body_left) / lim.body_min_rate:
                self._reading.body.fail(ClientGone(f"request body slower than {lim.body_min_rate} bytes/s"))
                self._fail(408, f"request body slower than {lim.body_min_rate} bytes/s on average "
                                f"(-body-min-rate) after its first {lim.body_timeout:g}s")
        elif self._current is None and not self._queue and self._started is None and now - self.last > (
                lim.idle_timeout if self._writes else lim.header_timeout):
            # never answered: it has sent nothing since it connected (or only the start of a
            # method), so its first request's headers are late; it is closed as nginx does it
            self.close()


class _Discard:
    """The parser of a connection past an upgrade request: what comes is not ours to read."""

    @staticmethod
    def feed_data(data: bytes) -> None:
        pass


_DISCARD = _Discard()

_REBALANCE = b"REBALANCE "
_REBALANCE_LETTERS = {bytes([c]) for c in _REBALANCE[:-1]}


def _rebalance_prefix(data: bytes) -> int:
    """The length of the longest end of `data` that begins the word REBALANCE, 0 if none."""
    for n in range(min(len(_REBALANCE) - 1, len(data)), 0, -1):
        if data.endswith(_REBALANCE[:n]):
            return n
    return 0


def _check_codings(headers: list, version: str) -> None:
    """Refuse a body framed by anything but plain `chunked`: llhttp decodes the chunks only, so
    a `gzip, chunked` body would be stored still gzipped, as if that were the value."""
    codings = [c.strip().lower() for n, v in headers if n == b"transfer-encoding" for c in v.split(b",")]
    codings = [c for c in codings if c]
    if codings == [b"chunked"]:
        if version != "1.1":  # RFC 9112 6.1: an HTTP/1.0 message's framing is then unknown
            raise HTTPError(400, "Transfer-Encoding needs HTTP/1.1: send the body with Content-Length")
        return
    if codings[-1:] != [b"chunked"] or codings.count(b"chunked") > 1:
        raise HTTPError(400, "malformed Transfer-Encoding: `chunked` must be its last and only once")
    others = b", ".join(c for c in codings if c != b"chunked").decode("latin-1")
    raise HTTPError(501, f"transfer-coding {others} is not supported: send the body as it is to be "
                         "stored, with Content-Length or `Transfer-Encoding: chunked` alone")


def _reason(e: Exception) -> str:
    text = str(e)
    return text.split(":", 1)[-1].strip() if text else type(e).__name__


def start_timeout_sweep(loop, interval: float = 1.0) -> None:
    """Check every connection's timers once per `interval`: cheaper than a timer per request."""

    def sweep():
        now = loop.time()
        for conn in list(Connection.connections):
            conn.check_timeouts(now)
        loop.call_later(interval, sweep)

    loop.call_later(interval, sweep)
