"""The volume client (http/client.py) against real nginx volumes: whole small writes made in one
pass of the event loop share one connection (pipelined) and each gets its own answer; a write
queued behind an answer that closed the connection is sent again; a silent volume fails every
queued write with the reason, within the timeout; reads go alone."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time

import requests

from minikv.http.client import PIPE_MAX, Pool, Upload, VolumeError, WholeUpload


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def pipes(pool: Pool, host: str) -> int:
    return len(pool._pipes.get(host, ()))


async def put_small(pool: Pool, host: str, path: str, value: bytes) -> int:
    upload = await pool.upload(host, path, len(value))
    assert isinstance(upload, WholeUpload)
    upload.write(value)
    upload.end()
    return await upload.finish()


def test_one_pass_of_requests_to_a_volume_goes_on_one_connection(cluster):
    host = cluster.names[0]
    values = {f"/pipe/{i}": os.urandom(100 + 997 * i) for i in range(6)}

    async def main():
        pool = Pool(timeout=2.0)
        assert (await pool.request(host, "DELETE", "/pipe/none")).status == 404
        assert pipes(pool, host) == 1  # a kept connection, then:
        # six PUTs made in one pass: on that connection, six answers in order
        statuses = await asyncio.gather(*(put_small(pool, host, p, v) for p, v in values.items()))
        assert statuses == [201] * 6
        assert pipes(pool, host) == 1
        assert pool._pipes[host][0].served == 7  # the DELETE, then the six PUTs
        got = await pool.request_many([(host, "GET", p) for p in values])
        assert [r.body for r in got] == list(values.values())
        # DELETEs with answers of two sizes (204 empty, 404 with a page): each its own request's
        targets = [(host, "DELETE", p) for p in values]
        targets[3:3] = [(host, "DELETE", "/pipe/none")]
        gone = await pool.request_many(targets)
        assert [r.status for r in gone] == [204] * 3 + [404] + [204] * 3
        assert gone[3].body and not gone[0].body
        assert pipes(pool, host) == 1
        pool.close()

    run(main())
    for p in values:
        assert requests.get(f"http://{host}{p}").status_code == 404


def test_reads_go_alone_beside_pipelined_writes(cluster):
    """httptools cannot be told an answer is to HEAD: a HEAD in a pipeline would make it read the
    next answer as the body the HEAD announced. And a GET may be slow to answer (a listing)."""
    host = cluster.names[1]
    assert requests.put(f"http://{host}/pipe/head", data=b"x" * 5000).status_code in (201, 204)

    async def main():
        pool = Pool(timeout=2.0)
        got = await pool.request_many([(host, "HEAD", "/pipe/head"), (host, "GET", "/pipe/head"),
                                       (host, "DELETE", "/pipe/none"), (host, "HEAD", "/pipe/head"),
                                       (host, "DELETE", "/pipe/none2"), (host, "GET", "/pipe/none")])
        assert [(r.status, len(r.body)) for r in got[:2]] == [(200, 0), (200, 5000)]
        assert [r.status for r in got[2:]] == [404, 200, 404, 404]
        assert got[0].headers[b"content-length"] == b"5000"
        assert sum(p.served for p in pool._pipes[host]) == 2  # the two DELETEs, nothing else
        pool.close()

    run(main())


def test_a_request_behind_an_answer_that_closed_the_connection_is_sent_again(cluster):
    host = cluster.names[2]
    assert requests.put(f"http://{host}/pipe/a", data=b"a").status_code in (201, 204)

    async def main():
        pool = Pool(timeout=2.0)
        assert (await pool.request(host, "DELETE", "/pipe/none")).status == 404  # a kept pipe
        first = pool.request(host, "DELETE", "/pipe/a", headers=[("Connection", "close")])
        second = put_small(pool, host, "/pipe/b", b"bb")
        third = pool.request(host, "DELETE", "/pipe/none")
        answers = await asyncio.gather(first, second, third)
        assert answers[0].status == 204
        assert answers[1] == 201
        assert answers[2].status == 404
        # the two behind the close were answered on a new connection, sent again
        assert sum(p.served for p in pool._pipes[host]) == 2
        pool.close()

    run(main())
    assert requests.get(f"http://{host}/pipe/a").status_code == 404
    assert requests.get(f"http://{host}/pipe/b").content == b"bb"


def test_large_or_unknown_size_uploads_stream_on_their_own_connection(cluster):
    host = cluster.names[0]
    value = os.urandom(PIPE_MAX + 1)

    async def main():
        pool = Pool(timeout=2.0)
        for length in (len(value), None):
            upload = await pool.upload(host, "/pipe/big", length)
            assert isinstance(upload, Upload)
            upload.write(value)
            assert await upload.finish() in (201, 204)
        pool.close()

    run(main())
    got = requests.get(f"http://{host}/pipe/big").content
    assert hashlib.md5(got).digest() == hashlib.md5(value).digest()


def test_a_silent_volume_fails_every_queued_request_with_the_reason(make_cluster):
    c = make_cluster(volumes=1, replicas=1)
    host = c.names[0]

    async def main():
        pool = Pool(timeout=0.5)
        assert (await pool.request(host, "DELETE", "/pipe/warm")).status == 404  # a kept pipe
        c.volumes[0].send(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            got = await asyncio.gather(pool.request_many([(host, "DELETE", "/pipe/x")]),
                                       put_small(pool, host, "/pipe/y", b"y"), return_exceptions=True)
            got = [got[0][0], got[1]]
            took = time.monotonic() - t0
        finally:
            c.volumes[0].send(signal.SIGCONT)
        assert [str(e) for e in got] == [f"volume {host} did not answer DELETE within 0.5s",
                                         f"volume {host} did not answer a PUT within 5s"], got
        assert all(isinstance(e, VolumeError) for e in got)
        assert took < 2.0  # the queue fails together, once the oldest request's time is up
        # and the volume is usable again once it answers
        assert (await pool.request(host, "DELETE", "/pipe/warm")).status == 404
        pool.close()

    run(main())


# A download whose last bytes came in the read that filled its buffer past BODY_HIGH ends with
# the socket paused (flow control waits for the consumer). If the consumer then gives up (its
# client went away), the connection is whole and goes back to the pool: the next request on
# it must still be read, not wait for the timeout with its answer unread in the socket.
def test_a_download_left_unread_does_not_stall_the_next_request_on_its_connection(cluster):
    from minikv.http.server import BODY_HIGH

    host = cluster.names[0]
    value = os.urandom(BODY_HIGH + 1)
    assert requests.put(f"http://{host}/unread", data=value).status_code in (201, 204)

    async def main():
        pool = Pool(timeout=1.0)
        conn, body = await pool.download(host, "/unread")
        deadline = time.monotonic() + 5
        while not conn.done.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # nothing read: the whole answer lands in the buffer
        assert conn.done.done()
        assert await body.read()  # a first chunk, then the consumer is gone
        pool.finish_download(conn)
        t0 = time.monotonic()
        answer = await pool.request(host, "GET", "/unread")
        took = time.monotonic() - t0
        pool.close()
        return answer, took

    answer, took = run(main())
    assert answer.status == 200 and answer.body == value
    assert took < 0.5, f"the next request waited {took:.1f}s"
