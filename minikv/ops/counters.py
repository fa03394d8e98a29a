"""What one worker counts about the requests it serves, on the request path.

The counting must cost next to nothing (the index serves ~80k req/s on 2 cores), so it is plain
Python: dicts and lists updated in place, no lock (one thread per worker), no syscall.
`publish.py` copies them out a few times a second; whoever answers a scrape sums every worker's
copy.

`instrument(app, counters)` has the HTTP layer count every request (minikv/http/server.py
`_start`, inline: a wrapper around `app.handle` was one more Python frame per request, 9% of a
read). The answer's status is read from its bytes (`HTTP/1.1 302 ...`), three digits looked up
in tables of lists (`rows`), no bytes object made and none hashed; and not even that for the
same answer object as the last one of its method (a 404 is made once a second). The duration
of an answer made at once (a read) is that of the pass of the event loop it was made in, from
the start of the pass's first request to the end of the pass, when the answers made in it have
gone out together (http/server.py's Batch, whose flush at the end of the pass also tallies
them): how long it waited in this process, measured with two clock reads a pass instead of two
an answer. An idle server's reads fall in the first bucket (100 µs); under load a pass of 50
reads takes a few hundred, and so did each of them. An answer that awaits (a write) runs from
the start of its pass to the coroutine's end. With an access log (-v) the counting and the log
are a wrapper around `app.handle` instead, timed per request, which costs that frame: logging
costs more anyway.
"""

from __future__ import annotations

import bisect
import json
import sys
import time
from urllib.parse import unquote_to_bytes

from minikv.http import server as http_server
from minikv.http.response import ClientGone, HTTPError
from minikv.private import redact_target

# upper bounds of the latency buckets, seconds: reads take tens of microseconds, writes of big
# values seconds
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
           2.5, 5.0, 10.0, 30.0)
FIRST = BUCKETS[0]
IN_FLIGHT = (b"PUT", b"DELETE")  # the writes a person wants to see pile up
STREAMED = b"200"  # the status counted for an answer the handler wrote itself (an S3 download)
GONE = b"499"  # the client left before its answer (nginx's number for it)
HISTORY_STEP = 10  # seconds per point of the request-rate history on the status page
HISTORY_POINTS = 30  # 5 minutes of steps
DIGITS = 58  # a table of status digits is indexed by the byte: b"0" is 48, b"9" is 57


class Counters:
    """Per (method, status): answers per latency bucket, then the seconds they took in all. The
    count of answers is the sum of the buckets, worked out when someone asks, not per request."""

    __slots__ = ("answers", "rows", "cells", "began", "first", "in_flight", "history", "_mark")

    def __init__(self):
        self.answers: dict[tuple[bytes, bytes], list] = {}
        # for the HTTP layer, which counts each answer it gets at once as one more of its kind
        # in this pass of the event loop, in that kind's cell: [answers this pass, their entry].
        # rows[method] is [the last answer counted, its cell, digits], where digits[51][48][50]
        # is the cell of a 302 (the bytes of b"302"; None where no kind was seen yet): indexing
        # with the answer's bytes makes no object, where a b"GET 302" key cost a slice, a join
        # and a hash per answer.
        # When the pass ends they were all made and written: tally() puts them in the bucket of
        # the pass's duration, so that an answer costs no clock read and no bucket search.
        self.rows: dict[bytes, list] = {}
        self.cells: dict[tuple[bytes, bytes], list] = {}  # every cell by (method, status)
        self.began = 0.0  # when the pass under way began to be answered; 0: none is
        self.first = FIRST
        self.in_flight = dict.fromkeys(IN_FLIGHT, 0)
        self.history: list[list[int]] = []  # [step start, answers, 4xx, 5xx] in that step, oldest first
        self._mark: list[int] = []  # [start of the step under way, totals at its start]

    def _entry(self, method: bytes, status: bytes) -> list:
        entry = self.answers.get((method, status))
        if entry is None:
            entry = self.answers[(method, status)] = [0] * (len(BUCKETS) + 1) + [0.0]
        return entry

    def done(self, method: bytes, status: bytes, seconds: float) -> None:
        entry = self._entry(method, status)
        entry[0 if seconds <= self.first else bisect.bisect_left(BUCKETS, seconds)] += 1
        entry[-1] += seconds

    def kind(self, method: bytes, answer: bytes) -> None:
        """Count an answer made at once that the HTTP layer's tables do not know yet: the first
        of its method, of its status, or one too short to hold a status."""
        status = answer[9:12]
        cell = self.cells.get((method, status))
        if cell is None:
            cell = self.cells[(method, status)] = [0, self._entry(method, status)]
        if len(status) == 3 and status.isdigit():
            row = self.rows.get(method)
            if row is None:
                row = self.rows[method] = [None, None, [None] * DIGITS]
            table = row[2]
            for digit in status[:2]:
                if table[digit] is None:
                    table[digit] = [None] * DIGITS
                table = table[digit]
            table[status[2]] = cell
            row[0], row[1] = answer, cell
        cell[0] += 1

    def tally(self) -> None:
        """Called by the HTTP layer's Batch once the answers of the pass that began at `began`
        (its first request, which set it) are written."""
        seconds = time.perf_counter() - self.began
        self.began = 0.0
        at = 0 if seconds <= self.first else bisect.bisect_left(BUCKETS, seconds)
        for cell in self.cells.values():  # a few kinds (the methods and statuses seen)
            n = cell[0]
            if n:
                cell[0] = 0
                entry = cell[1]
                entry[at] += n
                entry[-1] += seconds * n

    def totals(self) -> tuple[int, int, int]:
        """(answers, 4xx, 5xx) so far."""
        total = client = server = 0
        for (_, status), entry in self.answers.items():
            n = sum(entry[:-1])
            total += n
            if status[:1] == b"4":
                client += n
            elif status[:1] == b"5":
                server += n
        return total, client, server

    def sample(self, now: float) -> None:
        """Close the step under way once a new one began (called a few times a second): the
        steps are whole multiples of HISTORY_STEP on the clock, so workers' steps add up. And
        let go of the last answer of each method, which the HTTP layer keeps to know it again:
        a page of keys may be megabytes."""
        for row in self.rows.values():
            row[0] = None
        step = int(now // HISTORY_STEP * HISTORY_STEP)
        mark = self._mark
        if mark and mark[0] == step:
            return
        totals = self.totals()
        if mark:
            self.history.append([mark[0], *(t - m for t, m in zip(totals, mark[1:]))])
            del self.history[:-HISTORY_POINTS]
        self._mark = [step, *totals]

    async def track(self, req, coro, start: float, access_log=None):
        """Await an answer that is not ready at once (a write, an S3 request), counting it when
        it ends, and in flight until then for PUT and DELETE."""
        method = req.method
        flying = method in self.in_flight
        if flying:
            self.in_flight[method] += 1
        status, result = b"500", None
        try:
            result = await coro
            status = result[9:12] if result else STREAMED
            return result
        except HTTPError as e:
            status = str(e.status).encode()
            raise
        except ClientGone:
            status = GONE
            raise
        finally:
            if flying:
                self.in_flight[method] -= 1
            seconds = time.perf_counter() - start
            self.done(method, status, seconds)
            if access_log is not None:
                access_log(req, status, len(result) if result else None, seconds)

    def snapshot(self) -> dict:
        return {
            "answers": [[m.decode("latin-1"), s.decode("latin-1"), e] for (m, s), e in self.answers.items()],
            "in_flight": {m.decode(): n for m, n in self.in_flight.items()},
            "history": self.history,
        }


def instrument(app, counters: Counters, access_log=None) -> None:
    """Count every request `app` answers (and log it, given `access_log(req, status, size, seconds)`)."""
    if access_log is None:
        http_server.COUNTS = counters  # counted by the HTTP layer, with no frame of ours in between
        return
    handle = app.handle
    perf = time.perf_counter
    done = counters.done

    def counted(req):
        start = perf()
        try:
            result = handle(req)
        except HTTPError as e:
            _finish(req, str(e.status).encode(), None, perf() - start)
            raise
        except Exception:
            _finish(req, b"500", None, perf() - start)
            raise
        if result.__class__ is bytes:
            _finish(req, result[9:12], result, perf() - start)
            return result
        return counters.track(req, result, start, access_log)

    def _finish(req, status: bytes, result, seconds: float) -> None:
        done(req.method, status, seconds)
        access_log(req, status, len(result) if result else None, seconds)

    app.handle = counted


def _client(req) -> str:
    try:
        peer = req.conn.transport.get_extra_info("peername")
        return str(peer[0])
    except (AttributeError, TypeError, IndexError):
        return "-"


def _printable(text: str) -> str:
    """A URL as it may stand in a log line: no quote, backslash or control character raw."""
    return "".join(ch if " " < ch < "\x7f" and ch not in '"\\' else f"\\x{ord(ch):02x}" for ch in text)


def access_logger(json_lines: bool, out=None):
    """`access_log(req, status, size, seconds)` writing one line per request to stderr: the
    common log format with the duration after it, or a JSON object per line."""
    out = out or sys.stderr

    def text_line(req, status: bytes, size: int | None, seconds: float) -> None:
        when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime())
        url = _printable(redact_target(req.url))
        out.write(f'{_client(req)} - - [{when}] "{req.method.decode("latin-1")} {url} HTTP/1.1" '
                  f'{status.decode("latin-1")} {"-" if size is None else size} {seconds:.6f}\n')
        out.flush()

    def json_line(req, status: bytes, size: int | None, seconds: float) -> None:
        path = req.url.partition(b"?")[0]
        out.write(json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "client": _client(req),
            "method": req.method.decode("latin-1"),
            "key": unquote_to_bytes(path).decode("utf-8", "replace"),
            "url": redact_target(req.url),
            "status": int(status) if status.isdigit() else 0,
            "bytes": size,
            "duration": round(seconds, 6),
        }) + "\n")
        out.flush()

    return json_line if json_lines else text_line
