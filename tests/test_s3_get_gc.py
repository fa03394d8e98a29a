"""Big S3 GETs forwarded socket to socket (http/splice.py), on real clusters."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import time

import requests
from cluster import HOST

from minikv.http.splice import SPLICE_MIN

S3 = {"x-amz-date": "20250101T000000Z"}  # an S3 request, unsigned (no credentials configured)
MB = 1 << 20


def _fds(c) -> int:
    """Open descriptors of the index's processes (the server and its workers)."""
    pids = [c.index.proc.pid]
    with open(f"/proc/{pids[0]}/task/{pids[0]}/children") as f:
        pids += [int(p) for p in f.read().split()]
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


def _get_head(port: int, target: str) -> tuple[socket.socket, int, bytes]:
    """An S3 GET on a raw socket: (the socket, Content-Length, the body bytes read with the head)."""
    sock = socket.create_connection((HOST, port), timeout=30)
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nx-amz-date: 20250101T000000Z\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    return sock, length, rest


def test_big_s3_gets_are_whole_in_full_in_ranges_and_on_one_kept_connection(cluster):
    value = os.urandom(3 * MB + 12345)
    assert cluster.put("/big/whole", value).status_code == 201
    with requests.Session() as s:  # one keep-alive connection for all of them
        url = cluster.url("/big/whole")
        for _ in range(2):
            r = s.get(url, headers=S3)
            assert r.status_code == 200 and hashlib.md5(r.content).digest() == hashlib.md5(value).digest()
        first, last = 1000, 1000 + SPLICE_MIN + 54321
        r = s.get(url, headers={**S3, "Range": f"bytes={first}-{last}"})
        assert r.status_code == 206 and r.content == value[first:last + 1]
        r = s.get(url, headers={**S3, "Range": "bytes=10-20"})  # a short one is copied, on the same connection
        assert r.status_code == 206 and r.content == value[10:21]
        assert s.get(url, allow_redirects=False).status_code == 302  # and the plain API after it


def test_clients_that_leave_mid_answer_leave_no_descriptor_behind(cluster):
    value = os.urandom(16 * MB)
    assert cluster.put("/big/left", value).status_code == 201
    requests.get(cluster.url("/big/left"), headers=S3)  # warm: each worker's pools and files
    requests.get(cluster.url("/big/left"), headers=S3)
    before = _fds(cluster)
    for _ in range(10):
        sock, length, _ = _get_head(cluster.port, "/big/left")
        sock.recv(256 << 10)
        sock.close()  # mid-answer
    time.sleep(1)
    r = requests.get(cluster.url("/big/left"), headers=S3)
    assert r.status_code == 200 and r.content == value
    assert _fds(cluster) <= before + 4, (before, _fds(cluster))


def test_volumes_that_stop_mid_answer_cut_the_answer_short_and_the_index_serves_on(make_cluster):
    c = make_cluster(volumes=2, replicas=2, workers=1)
    value = os.urandom(64 * MB)
    assert c.put("/big/cut", value).status_code == 201
    sock, length, got = _get_head(c.port, "/big/cut")
    got = len(got)
    try:
        while got < 2 * MB:
            got += len(sock.recv(1 << 20))
        for v in c.volumes:
            v.send(signal.SIGSTOP)
        t0 = time.monotonic()
        while more := sock.recv(1 << 20):  # the index gives up on the volume and closes
            got += len(more)
        took = time.monotonic() - t0
    finally:
        sock.close()
        for v in c.volumes:
            v.send(signal.SIGCONT)
    assert got < length and took < 15, (got, length, took)
    r = requests.get(c.url("/big/cut"), headers=S3)
    assert r.status_code == 200 and r.content == value
