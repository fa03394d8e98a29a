"""The volume client (http/client.py) against real nginx volumes: whole small requests made in
one pass of the event loop share one connection (pipelined) and each gets its own answer; a
request queued behind an answer that closed the connection is sent again; a silent volume fails
every queued request with the reason, within the timeout."""

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
        assert (await pool.request(host, "GET", "/pipe/none")).status == 404
        assert pipes(pool, host) == 1  # a kept connection, then:
        # six PUTs made in one pass: on that connection, six answers in order
        statuses = await asyncio.gather(*(put_small(pool, host, p, v) for p, v in values.items()))
        assert statuses == [201] * 6
        assert pipes(pool, host) == 1
        # GETs of values of different sizes, then DELETEs: each answer is its own request's
        got = await pool.request_many([(host, "GET", p) for p in values])
        assert [r.body for r in got] == list(values.values())
        gone = await pool.request_many([(host, "DELETE", p) for p in values] + [(host, "DELETE", "/pipe/none")])
        assert [r.status for r in gone] == [204] * 6 + [404]
        assert pipes(pool, host) == 1
        pool.close()

    run(main())
    for p in values:
        assert requests.get(f"http://{host}{p}").status_code == 404


def test_head_goes_alone_beside_pipelined_requests(cluster):
    """httptools cannot be told an answer is to HEAD: a HEAD in a pipeline would make it read the
    next answer as the body the HEAD announced."""
    host = cluster.names[1]
    assert requests.put(f"http://{host}/pipe/head", data=b"x" * 5000).status_code in (201, 204)

    async def main():
        pool = Pool(timeout=2.0)
        got = await pool.request_many([(host, "HEAD", "/pipe/head"), (host, "GET", "/pipe/head"),
                                       (host, "HEAD", "/pipe/head"), (host, "GET", "/pipe/none")])
        assert [(r.status, len(r.body)) for r in got[:3]] == [(200, 0), (200, 5000), (200, 0)]
        assert got[3].status == 404
        assert got[0].headers[b"content-length"] == b"5000"
        pool.close()

    run(main())


def test_a_request_behind_an_answer_that_closed_the_connection_is_sent_again(cluster):
    host = cluster.names[2]
    assert requests.put(f"http://{host}/pipe/a", data=b"a").status_code in (201, 204)

    async def main():
        pool = Pool(timeout=2.0)
        first = pool.request(host, "GET", "/pipe/a", headers=[("Connection", "close")])
        second = put_small(pool, host, "/pipe/b", b"bb")
        third = pool.request(host, "GET", "/pipe/a")
        answers = await asyncio.gather(first, second, third)
        assert answers[0].status == 200 and answers[0].body == b"a"
        assert answers[1] == 201
        assert answers[2].status == 200 and answers[2].body == b"a"
        pool.close()

    run(main())
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
        assert (await pool.request(host, "GET", "/pipe/warm")).status == 404  # a kept pipe
        c.volumes[0].send(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            got = await pool.request_many([(host, "DELETE", "/pipe/x"), (host, "GET", "/pipe/y")])
            took = time.monotonic() - t0
        finally:
            c.volumes[0].send(signal.SIGCONT)
        assert [str(e) for e in got] == [f"volume {host} did not answer DELETE within 0.5s",
                                         f"volume {host} did not answer GET within 0.5s"], got
        assert all(isinstance(e, VolumeError) for e in got)
        assert took < 2.0  # the queue fails together, not one timeout after another
        # and the volume is usable again once it answers
        assert (await pool.request(host, "GET", "/pipe/warm")).status == 404
        pool.close()

    run(main())
