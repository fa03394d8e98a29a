"""Counting with -metrics-port on, what the request path pays for it, call by call: an answer
made at once is counted with no call at all (Python or C: its status is read byte by byte into
tables of lists, where a b"GET 302" key cost a slice, a join and a dict.get per answer), and a
pass of the loop pays two Python calls and two clock reads, the end of the pass riding on the
Batch's flush that writes the answers anyway (it was one more loop.call_soon per pass). The
counts stay exact whatever the answers: the same object again, a new one each time, two
statuses that share their first digits, GET and HEAD given the very same answer, a status that
is not three digits, an answer too short to hold one (tests/test_ops_cost.py and test_ops.py
check them through a real index's /metrics)."""

from __future__ import annotations

import asyncio
import collections
import itertools
import sys
import time

import pytest
import uvloop
from test_ops_cost import profiled_passes
from test_protocol import FakeTransport

from minikv.http import server
from minikv.http.server import Batch, Connection, Limits
from minikv.ops.counters import Counters, instrument

NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"  # one object, as not_found()'s
FORBIDDEN = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"
ODD = b"HTTP/1.1 2x0 Odd\r\nContent-Length: 0\r\n\r\n"
SHORT = b"HTTP/1"
_serial = itertools.count()


class Answers:
    """Answers at once with the answer its target names; /302 a new object each time, as a
    redirect is made."""

    def handle(self, req):
        url = req.url
        if url == b"/302":
            return b"HTTP/1.1 302 Found\r\nLocation: http://v/%d\r\nContent-Length: 0\r\n\r\n" % next(_serial)
        return {b"/404": NOT_FOUND, b"/403": FORBIDDEN, b"/odd": ODD, b"/short": SHORT}[url]


@pytest.fixture
def loop():
    loop = uvloop.new_event_loop()  # the server's loop: its call_soon is a C call
    try:
        yield loop
    finally:
        server.COUNTS = None  # the next test's connections count nothing
        loop.close()


class SeenLoop:
    """The loop, its call_soon a Python function (uvloop's is not seen by a profiler)."""

    def __init__(self, loop):
        self._loop = loop

    def call_soon(self, *args):
        return self._loop.call_soon(*args)

    def __getattr__(self, name):
        return getattr(self._loop, name)


def connections(app, loop, n: int) -> list:
    loop = SeenLoop(loop)
    batch = Batch(loop)  # one per loop, as the server makes it
    conns = [Connection(app, Limits(), loop, batch=batch) for _ in range(n)]
    for conn in conns:
        conn.connection_made(FakeTransport())
    return conns


def calls(conns: list, request: bytes, passes: int) -> collections.Counter:
    """{function: calls}, Python and C, in `passes` passes of the loop in which each of `conns`
    takes `request` and its answer is made, written, and counted."""
    seen: collections.Counter = collections.Counter()

    def profile(frame, event, arg):
        if event == "call":
            seen[frame.f_code.co_qualname] += 1
        elif event == "c_call":
            seen[getattr(arg, "__qualname__", repr(arg))] += 1

    profiled_passes(conns, request, passes, profile, whole=True)  # made, written and counted
    for conn in conns:
        assert bytes(conn.transport.out).count(b"HTTP/1.1 ") == passes, conn.transport.out[:200]
        conn.transport.out.clear()
    return seen


@pytest.mark.parametrize("target", [b"/404", b"/302"])
def test_an_answer_made_at_once_is_counted_with_no_call_and_a_pass_with_one_and_two_clock_reads(loop, target):
    request = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target
    plain = connections(Answers(), loop, 10)
    calls(plain, request, 1)  # as on the other side
    without = calls(plain, request, 4)
    app, counters = Answers(), Counters()
    counters.first = 60.0  # a pass slowed by the profiler still in the first bucket: no bucket search
    instrument(app, counters)
    counted = connections(app, loop, 10)
    calls(counted, request, 1)  # the first answer of a kind makes its cell
    with_counting = calls(counted, request, 4)
    # a pass: its first request notes the time and has the Batch flush at the end of the pass
    # (no call_soon of its own), which tallies it; an answer: nothing
    assert with_counting - without == collections.Counter(
        {"Batch.due": 4, "Counters.tally": 4, "perf_counter": 8, "dict.values": 4})
    assert without - with_counting == collections.Counter()
    entry = counters.answers[(b"GET", target[1:])]
    assert sum(entry[:-1]) == 50
    assert 0 < entry[-1] < 50


def test_counts_stay_exact_whatever_the_answers(loop):
    app, counters = Answers(), Counters()
    instrument(app, counters)
    conns = connections(app, loop, 3)
    expected: collections.Counter = collections.Counter()
    rounds = [
        # (connection, method, target) in one pass each
        [(0, "GET", "/404"), (1, "HEAD", "/404"), (2, "GET", "/404")],  # one object, two methods
        [(0, "GET", "/302"), (1, "GET", "/302"), (2, "HEAD", "/302")],  # a new object each time
        [(0, "GET", "/403"), (1, "GET", "/404"), (2, "GET", "/403")],  # 40x: two first digits shared
        [(0, "GET", "/odd"), (1, "GET", "/short"), (2, "GET", "/odd")],  # no three digits to read
        [(0, "GET", "/404"), (1, "GET", "/odd"), (2, "HEAD", "/short")],
    ]
    status = {"/404": "404", "/302": "302", "/403": "403", "/odd": "2x0", "/short": ""}
    for _ in range(3):
        for one_pass in rounds:
            for i, method, target in one_pass:
                conns[i].data_received(f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                expected[(method, status[target])] += 1
            loop.run_until_complete(asyncio.sleep(0))
            assert not counters.began  # tallied at the end of the pass
    # and pipelined, through the parser, whose methods are new objects each time
    conns[0].data_received(b"GET /404 HTTP/1.1\r\nHost: x\r\n\r\nHEAD /302 HTTP/1.1\r\nHost: x\r\n\r\n"
                           b"GET /odd HTTP/1.1\r\nHost: x\r\n\r\nHEAD /404 HTTP/1.1\r\nHost: x\r\n\r\n")
    for method, target in (("GET", "/404"), ("HEAD", "/302"), ("GET", "/odd"), ("HEAD", "/404")):
        expected[(method, status[target])] += 1
    loop.run_until_complete(asyncio.sleep(0))
    got = {(m.decode(), s.decode()): sum(e[:-1]) for (m, s), e in counters.answers.items()}
    assert got == dict(expected)
    assert sum(sum(e[:-1]) for e in counters.answers.values()) == 49


def test_the_fast_path_gives_one_method_object_for_all_its_requests(loop):
    conn = connections(Answers(), loop, 1)[0]
    assert conn._simple(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n").method is server.GET
    assert conn._simple(b"HEAD /b HTTP/1.1\r\n\r\n").method is server.HEAD
    assert conn._simple(b"GETX /a HTTP/1.1\r\n\r\n") is None


def test_the_last_answer_kept_to_know_it_again_is_let_go_at_the_next_sample(loop):
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 4000000\r\n\r\n" + b"k" * 4_000_000  # a page of keys

    class App:
        def handle(self, req):
            return big

    app, counters = App(), Counters()
    instrument(app, counters)
    conn = connections(app, loop, 1)[0]
    alone = sys.getrefcount(big)
    for _ in range(2):
        conn.data_received(b"GET /?list HTTP/1.1\r\nHost: x\r\n\r\n")
        loop.run_until_complete(asyncio.sleep(0))
    conn.transport.out.clear()
    assert sum(counters.answers[(b"GET", b"200")][:-1]) == 2
    counters.sample(time.time())  # the publisher's, a few times a second
    assert sys.getrefcount(big) == alone
