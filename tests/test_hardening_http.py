"""Hardening of the HTTP engine room (issue 11, items 5, 8, 9, 17 and 19's transfer-codings):
the protocol fed with bytes (whole, byte by byte, with trailing data), then real sockets against
real index servers and nginx volumes."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import resource
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import requests
from cluster import HOST, wait_closed
from test_faults import wait_until
from test_protocol import EchoApp, FakeTransport, flush, responses

from minikv.http.response import response
from minikv.http.server import Connection, Limits

NEXT = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"  # trailing data: a request that must not be served
HOW = ["whole", "bytewise", "trailing"]


def make(limits=None, app=None):
    loop = asyncio.new_event_loop()
    conn = Connection(app or EchoApp(), limits or Limits(), loop)
    t = FakeTransport()
    conn.connection_made(t)
    return loop, conn, t


def feed(conn, data: bytes, how: str) -> None:
    if how == "trailing":
        data += NEXT
    if how == "bytewise":
        for i in range(len(data)):
            conn.data_received(data[i:i + 1])
    else:
        conn.data_received(data)
    for _ in range(3):  # a handler's task, then the pass that writes its answer
        flush(conn)


def fresh() -> str:
    return "/h/" + uuid.uuid4().hex


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send `data` on a new connection and read until the server closes it."""
    with socket.create_connection((HOST, port)) as s:
        s.settimeout(timeout)
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


# -- item 19: a body framed by anything but plain `chunked` is refused, never stored encoded --

CHUNKS = b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("framing, status", [
    (b"Transfer-Encoding: gzip, chunked", 501),
    (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked", 501),  # the same in two headers
    (b"Transfer-Encoding: deflate,chunked", 501),
    (b"Transfer-Encoding: chunked, gzip", 400),  # chunked not last: the end of the body is unknown
    (b"Transfer-Encoding: chunked, chunked", 400),
    (b"Transfer-Encoding: gzip", 400),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 5", 400),
    (b"Content-Length: 5\r\nContent-Length: 6", 400),
    (b"Content-Length: 5\r\nContent-Length: 5", 400),
])
def test_transfer_codings_other_than_chunked_are_refused(framing, status, how):
    loop, conn, t = make()
    feed(conn, b"PUT /k HTTP/1.1\r\nHost: x\r\n" + framing + CHUNKS, how)
    assert bytes(t.out).startswith(b"HTTP/1.1 %d " % status), bytes(t.out)
    assert len(responses(bytes(t.out))) == 1
    assert t.closed
    assert conn.app.seen == []  # the handler never saw it: nothing can be stored


@pytest.mark.parametrize("how", HOW)
def test_chunked_over_http10_is_refused(how):
    loop, conn, t = make()
    feed(conn, b"PUT /k HTTP/1.0\r\nTransfer-Encoding: chunked" + CHUNKS, how)
    assert bytes(t.out).startswith(b"HTTP/1.1 400 ")
    assert b"HTTP/1.1" in bytes(t.out).split(b"\r\n\r\n", 1)[1]
    assert conn.app.seen == []


@pytest.mark.parametrize("how", ["whole", "bytewise"])
@pytest.mark.parametrize("coding", [b"chunked", b"Chunked", b" chunked ", b",chunked"])
def test_plain_chunked_is_still_taken(coding, how):
    loop, conn, t = make()
    feed(conn, b"PUT /k HTTP/1.1\r\nTransfer-Encoding: " + coding + CHUNKS + NEXT, how)
    out = responses(bytes(t.out))
    assert out[0].startswith(b"HTTP/1.1 201 ") and hashlib.md5(b"hello").hexdigest().encode() in out[0]
    assert out[1].startswith(b"HTTP/1.1 200 ")  # and the connection goes on
    assert not t.closed


def test_a_gzip_chunked_put_is_refused_and_nothing_is_stored(cluster):
    key = fresh()
    body = gzip.compress(b"hello")
    out = exchange(cluster.port, f"PUT {key} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                   .encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    assert out.startswith(b"HTTP/1.1 501 ") and b"gzip" in out, out
    assert cluster.get(key, allow_redirects=False).status_code == 404
    # plain chunked still stores the value
    assert cluster.put(key, iter([b"hel", b"lo"])).status_code == 201
    assert cluster.get(key).content == b"hello"


# -- item 9: one answer per request, Upgrade and CONNECT included --

class AsyncGetApp(EchoApp):
    """GET answers from a coroutine (as -verify-get does), after a pass of the loop."""

    def handle(self, req):
        self.seen.append((req.method, req.url))
        return self._get(req)

    async def _get(self, req):
        await asyncio.sleep(0)
        return response(200, [("X-Method", req.method.decode())], req.url)


UPGRADE = b"GET /k HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("app", [EchoApp, AsyncGetApp])
def test_an_upgrade_request_gets_one_answer_and_the_connection_closes(app, how):
    loop, conn, t = make(app=app())
    feed(conn, UPGRADE + b"\x81\x85garbage-in-the-new-protocol", how)
    out = responses(bytes(t.out))
    assert len(out) == 1, out
    assert out[0].startswith(b"HTTP/1.1 200 ") and b"Connection: close\r\n" in out[0]
    assert t.closed
    assert conn.app.seen == [(b"GET", b"/k")]


class RefuseApp(EchoApp):
    """Answers every request at once with a 405 (as the index answers a CONNECT)."""

    def handle(self, req):
        self.seen.append((req.method, req.url))
        return response(405, [], b"no")


@pytest.mark.parametrize("how", HOW)
def test_connect_gets_one_answer(how):
    loop, conn, t = make(app=RefuseApp())
    feed(conn, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", how)
    assert len(responses(bytes(t.out))) == 1
    assert t.closed


@pytest.mark.parametrize("how", HOW)
def test_pipelined_then_upgrade_each_get_one_answer_in_order(how):
    loop, conn, t = make(app=AsyncGetApp())
    feed(conn, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n" + UPGRADE, how)
    out = responses(bytes(t.out))
    assert [r.split(b"\r\n\r\n")[1] for r in out] == [b"/a", b"/k"]
    assert t.closed


class HeldGetApp(EchoApp):
    """GET /held answers only once `go` is set: a request in flight while the next ones are read."""

    def __init__(self):
        super().__init__()
        self.go = None

    def handle(self, req):
        if req.url == b"/held":
            return self._held()
        return super().handle(req)

    async def _held(self):
        self.go = asyncio.get_running_loop().create_future()
        await self.go
        return response(200, [], b"held")


# A protocol error in a pipelined request behind one in flight is that later request's answer:
# sent at once, the client would take it for the answer of the first (and the 201 of a PUT
# that was stored would be lost on it).
@pytest.mark.parametrize("how", ["whole", "bytewise"])
@pytest.mark.parametrize("bad, statuses", [
    (b"GET /big HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", (431,)),
    # a header line that never ends: 431 once reads of it alone pass the limit, else the 408 of
    # the header timeout
    (b"GET /big HTTP/1.1\r\nX: " + b"a" * 100000, (431, 408)),
    (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", (400,)),
    (b"PUT /k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n", (400,)),  # a queued body
    (NEXT + b"GET /x HTTP/2.0\r\n\r\n" + NEXT, (505,)),
])
def test_an_error_in_a_later_pipelined_request_waits_for_the_answers_before_it(bad, statuses, how):
    loop, conn, t = make(app=HeldGetApp())
    feed(conn, b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n" + bad, how)
    assert bytes(t.out) == b"" and not t.closed  # nothing goes out before the held answer
    conn.check_timeouts(loop.time() + 1000)  # nor the timeout of a head that will never end
    assert bytes(t.out) == b"" and not t.closed
    conn.app.go.set_result(None)
    for _ in range(3):
        flush(conn)
    out = responses(bytes(t.out))
    assert out[0].endswith(b"held")
    assert out[0].startswith(b"HTTP/1.1 200 ")
    assert [r.split(b" ")[1] for r in out[1:-1]] == [b"200"] * (bad.count(NEXT) > 0)
    assert int(out[-1].split(b" ")[1]) in statuses
    assert t.closed
    assert (b"PUT", b"/k") not in conn.app.seen  # a request with a bad body is never handled


def test_a_put_pipelined_before_a_request_too_large_gets_its_201_first(cluster):
    key = fresh()
    out = exchange(cluster.port, f"PUT {key} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                   .encode() + b"GET /big HTTP/1.1\r\nX: " + b"a" * 100000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 201 "), out[:200]
    assert b"HTTP/1.1 431 " in out
    assert cluster.get(key).content == b"hello"


@pytest.mark.parametrize("how", HOW)
def test_an_upgrade_request_with_a_body_gets_one_400(how):
    loop, conn, t = make()
    feed(conn, b"PUT /k HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: h2c\r\nContent-Length: 5\r\n\r\nhello", how)
    out = responses(bytes(t.out))
    assert len(out) == 1 and out[0].startswith(b"HTTP/1.1 400 ") and b"upgrade" in out[0]
    assert t.closed
    assert conn.app.seen == []


def test_an_upgrade_or_connect_gets_one_answer_on_a_real_socket(cluster):
    key = fresh()
    assert cluster.put(key, b"v").status_code == 201
    for first in (f"GET {key} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
                  "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"):
        out = exchange(cluster.port, first.encode() + b"GET /missing HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out.count(b"HTTP/1.1 ") == 1, out
        assert b"Connection: close\r\n" in out


# -- item 17: a connection that sends nothing has the header timeout, not the idle one --

def test_a_silent_connection_is_closed_after_the_header_timeout():
    loop, conn, t = make(Limits(header_timeout=5, idle_timeout=75))
    conn.check_timeouts(loop.time() + 4)
    assert not t.closed
    conn.check_timeouts(loop.time() + 6)
    assert t.closed
    assert bytes(t.out) == b""  # nothing asked, nothing answered: closed as nginx does


def test_a_connection_that_was_answered_keeps_the_idle_timeout():
    loop, conn, t = make(Limits(header_timeout=5, idle_timeout=75))
    feed(conn, b"GET /k HTTP/1.1\r\n\r\n", "whole")
    conn.check_timeouts(loop.time() + 30)
    assert not t.closed
    conn.check_timeouts(loop.time() + 76)
    assert t.closed


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(make_cluster):
    c = make_cluster(volumes=1, replicas=1, workers=1, flags=["-header-timeout", "1s"])
    with socket.create_connection((HOST, c.port)) as s:
        s.settimeout(10)
        start = time.monotonic()
        assert s.recv(100) == b""
        assert time.monotonic() - start < 3.5  # 1 s, and the once-a-second sweep


# -- item 5: a body has a total deadline (an average rate), not only a longest pause --

def test_a_trickled_body_is_cut_by_its_average_rate():
    loop, conn, t = make(Limits(body_timeout=5, body_min_rate=100))
    start = loop.time()
    conn.data_received(b"PUT /slow HTTP/1.1\r\nContent-Length: 100000\r\n\r\nx")
    flush(conn)
    for second in range(4, 40, 4):  # a byte every 4 s: never a 5 s pause
        conn.data_received(b"x")
        conn.last = start + second  # the byte came then
        conn.check_timeouts(start + second)
        if t.closed:
            break
    assert bytes(t.out).startswith(b"HTTP/1.1 408 ") and b"bytes/s" in bytes(t.out)
    assert second <= 8  # 5 s, and a hundredth of a second per byte received


def test_a_body_at_the_rate_is_not_cut():
    loop, conn, t = make(Limits(body_timeout=5, body_min_rate=100))
    start = loop.time()
    conn.data_received(b"PUT /steady HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
    flush(conn)
    for second in range(1, 200):
        conn.data_received(b"x" * 110)  # a little over the rate
        conn.last = start + second
        conn.check_timeouts(start + second)
        assert not t.closed, bytes(t.out)


class StalledApp(EchoApp):
    """PUT waits for `go` before reading its body: the server holds the client back."""

    def __init__(self):
        super().__init__()
        self.go = None

    async def _put(self, req):
        self.go = asyncio.get_running_loop().create_future()
        await self.go
        return await super()._put(req)


def test_time_we_hold_the_client_back_does_not_count_against_its_rate():
    loop, conn, t = make(Limits(body_timeout=5, body_min_rate=100), app=StalledApp())
    start = loop.time()
    conn.data_received(b"PUT /held HTTP/1.1\r\nContent-Length: 3000000\r\n\r\n" + b"x" * (2 << 20))
    flush(conn)
    assert t.paused  # more than BODY_HIGH waits for the handler
    conn.check_timeouts(start + 1000)
    assert not t.closed


# -body-min-rate reaches the workers: a body trickled below it is cut with a 408 well before
# -body-timeout would ever fire (it never pauses that long), and nothing is stored.
def test_a_body_below_the_minimum_rate_is_cut_on_a_real_socket(make_cluster):
    c = make_cluster(volumes=1, replicas=1, workers=2, flags=["-body-timeout", "1s", "-body-min-rate", "1000"])
    key = fresh()
    with socket.create_connection((HOST, c.port)) as s:
        s.sendall(f"PUT {key} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n".encode())
        s.settimeout(0.3)
        start, out = time.monotonic(), b""
        while time.monotonic() - start < 10 and not out:
            try:
                s.sendall(b"x")  # a byte every 0.3 s: never a 1 s pause
                out = s.recv(1000)
            except TimeoutError:
                continue
            except OSError:
                break
    assert out.startswith(b"HTTP/1.1 408 ") and b"bytes/s" in out, out
    assert time.monotonic() - start < 4
    wait_until(lambda: c.get(key, allow_redirects=False).status_code == 404 and c.put(key, b"v").status_code == 201,
               what="the key free again")


# The index's own shortage of files is not the volume's fault: a LocalError that says so, and
# the health checker marks nothing down (run in a child: it lowers its own open-file limit).
LOCAL_SHORTAGE = """
import asyncio, resource, socket, sys
import uvloop
from minikv.health import Health
from minikv.http.client import Pool, VolumeError

host = sys.argv[1]

async def main():
    pool = Pool(1.0)
    health = Health(pool, [host])
    await health.probe(host)
    print("up before:", not health.down)
    pool.forget(host)
    await asyncio.sleep(0.1)  # the loop closes their sockets
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    hog = []
    try:
        while True:
            hog.append(socket.socket())
    except OSError:
        pass
    try:
        await pool.request(host, "GET", "/x")
    except VolumeError as e:
        print("error:", e)
        health.mark_down(host, str(e))  # what a PUT that met it does
    await health.probe(host)
    print("down:", sorted(health.down))

uvloop.run(main())
"""


def test_running_out_of_files_is_our_error_and_marks_no_volume_down(cluster):
    out = subprocess.run([sys.executable, "-c", LOCAL_SHORTAGE, cluster.names[0]], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "up before: True" in out.stdout
    assert f"error: the index is out of open files (Too many open files, connecting to volume " \
           f"{cluster.names[0]})" in out.stdout
    assert "down: []" in out.stdout


def _nofile(soft: int, hard: int):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# 100 uploads trickling their bodies into a worker with 256 open files would need 400 (a socket
# for the client, one per replica): those past the budget get a 503 that blames the index, the
# others go on, reads of stored keys keep working and no volume is marked down.
def test_trickling_uploads_past_the_open_file_budget_get_503_and_reads_go_on(make_cluster):
    c = make_cluster(volumes=3, replicas=3, workers=1)
    stored = fresh()
    assert c.put(stored, b"kept").status_code == 201
    c.index.stop()
    wait_closed(c.port)
    c.index.start(preexec=_nofile(256, 256))
    socks = []
    try:
        for _ in range(100):
            s = socket.create_connection((HOST, c.port))
            s.sendall(f"PUT {fresh()} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nx".encode())
            socks.append(s)
        time.sleep(1)
        answers = []
        for s in socks:
            s.settimeout(0.05)
            try:
                answers.append(s.recv(1000))
            except TimeoutError:
                answers.append(None)  # still uploading
        refused = [a for a in answers if a is not None]
        assert refused and len(refused) < len(socks)
        for a in refused:
            assert a.startswith(b"HTTP/1.1 503 ") and b"the index is out of open files" in a, a
        # reads on new connections go on, to volumes still up
        reader = requests.Session()
        for _ in range(5):
            r = reader.get(c.url(stored))
            assert r.status_code == 200 and r.content == b"kept", (r.status_code, r.text, answers[:3])
        assert "is down" not in c.index.log.read_text()
    finally:
        for s in socks:
            s.close()
    key = fresh()
    wait_until(lambda: c.put(key, b"after").status_code == 201, what="PUTs taken again")


# -- item 8: a volume's death is noticed when its kept-alive connections close --

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_reads_right_after_a_volume_stops_succeed(make_cluster, sig):
    c = make_cluster(volumes=3, replicas=2, workers=2)
    keys = [fresh() for _ in range(90)]
    for k in keys:
        assert c.put(k, k.encode()).status_code == 201
    reader = requests.Session()
    for k in keys:  # kept-alive connections to the index's workers and to every volume
        assert reader.get(c.url(k)).status_code == 200
    time.sleep(0.6)  # a probe round since: every worker holds an idle connection to every volume
    c.volumes[0].stop(sig)
    failed = []
    for k in keys:
        try:
            r = reader.get(c.url(k), timeout=5)
            if r.status_code != 200 or r.content != k.encode():
                failed.append((keys.index(k), r.status_code))
        except requests.ConnectionError as e:
            failed.append((keys.index(k), type(e).__name__))
    # SIGTERM: nginx closes its connections before it exits, and the index knows before the
    # first read. SIGKILL: the volume's sockets close as the kernel tears it down, which may come
    # after the first reads were answered; measured: 4 runs in 24 had failed reads, one or two,
    # the 1st or 2nd (before the fix: a third of the reads made in the first half second).
    allowed = 0 if sig == signal.SIGTERM else 2
    assert len(failed) <= allowed and all(i < 3 for i, _ in failed), \
        f"{len(failed)} of {len(keys)} reads failed: {failed[:5]}"


# -- a HEAD's error answer has no body: the next answer on the connection must be read as one --

def test_an_error_answer_to_a_head_has_no_body(cluster):
    out = exchange(cluster.port, b"HEAD * HTTP/1.1\r\nHost: x\r\n\r\n"
                                 b"GET /missing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    first, _, rest = out.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 400 "), out
    assert rest.startswith(b"HTTP/1.1 404 "), out  # not the 400's reason first


# The probe's timers run on the index's own loop: a request that held it for over a second (a
# body of 1-byte chunks, a header growing for seconds) made the probes of that second time out,
# and every volume was marked down and refused reads and writes (503) though nginx was fine.
def test_a_stalled_loop_does_not_mark_a_volume_down(cluster):
    import uvloop

    from minikv.health import Health
    from minikv.http.client import Pool

    host = cluster.names[0]

    async def stalled_probe() -> set[str]:
        pool = Pool(1.0)
        health = Health(pool, [host])
        probing = asyncio.get_running_loop().create_task(health.probe(host))
        await asyncio.sleep(0)  # the probe is connecting
        time.sleep(1.5)  # what a request holding the loop does
        await probing
        pool.close()
        return health.down

    for _ in range(3):
        assert uvloop.run(stalled_probe()) == set()


# nginx's workers stop one by one: one may answer a probe and exit right after, closing the
# connection with its answer (here said with `Connection: close`). That probe left no kept connection whose close would tell of the
# stop, and the stopped volume was taken for up until the next round: 18 and 28 of 90 reads of
# test_reads_right_after_a_volume_stops_succeed[SIGTERM] failed in CI runs.
def test_a_volume_answering_its_last_probe_is_down_at_once():
    import uvloop

    from minikv.health import Health
    from minikv.http.client import Pool

    answer = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"

    async def scenario() -> tuple[bool, float]:
        kept, stopping = [], []

        async def serve(reader, writer):
            kept.append(writer)
            try:
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    if stopping:  # its last answer, then the worker and the volume are gone
                        writer.write(answer.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
                        writer.close()
                        server.close()
                        return
                    writer.write(answer)
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server = await asyncio.start_server(serve, HOST, 0)
        host = f"{HOST}:{server.sockets[0].getsockname()[1]}"
        pool = Pool(1.0)
        health = Health(pool, [host], interval=30.0)  # no round comes in this test's time
        await health.probe_all()
        assert not health.down
        stopping.append(True)
        for writer in kept:  # the worker that held the kept connection exits
            writer.close()
        started = time.monotonic()
        while host not in health.down and time.monotonic() - started < 3:
            await asyncio.sleep(0.005)
        pool.close()
        return host in health.down, time.monotonic() - started

    down, after = uvloop.run(scenario())
    assert down and after < 1.0, f"down={down} after {after:.3f}s"


# A PUT refused before its body was read (a key that exists: 403) closed the connection with the
# body unread: the kernel answered the rest with a reset, and a client that sends its whole body
# before reading (Python's http.client) saw only the reset, 20 times in 20 (a red team). The rest
# of the body is read and dropped for a while (a lingering close), and the answer is read whole.
def test_a_client_sending_a_refused_body_whole_before_reading_gets_the_answer(cluster):
    import http.client

    key = fresh()
    assert cluster.put(key, b"v").status_code == 201
    for _ in range(3):
        conn = http.client.HTTPConnection(HOST, cluster.port, timeout=10)
        conn.request("PUT", key, body=b"x" * (8 << 20))  # no Expect: the whole body goes first
        r = conn.getresponse()
        assert r.status == 403 and b"key exists" in r.read()
        conn.close()


def test_a_lingering_connection_does_not_hold_up_a_stop(make_cluster):
    # a lingering connection's request is answered: a stopping worker does not wait for it
    import threading

    c = make_cluster(volumes=1, replicas=1, subvolumes=1, workers=1)
    key = fresh()
    assert c.put(key, b"v").status_code == 201
    s = socket.create_connection((HOST, c.port))
    s.sendall(f"PUT {key} HTTP/1.1\r\nHost: x\r\nContent-Length: {100 << 20}\r\n\r\n".encode())
    assert s.recv(4096).startswith(b"HTTP/1.1 403")
    done = threading.Event()

    def trickle():  # a byte every 0.5 s: never idle long enough to be closed for it
        while not done.is_set():
            try:
                s.sendall(b"x")
            except OSError:
                return
            time.sleep(0.5)

    threading.Thread(target=trickle, daemon=True).start()
    try:
        time.sleep(1)
        started = time.monotonic()
        c.index.stop()
        assert time.monotonic() - started < 5
    finally:
        done.set()
        s.close()
