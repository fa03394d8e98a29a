"""A second look at S3 writes that take their key's lock only once their body is complete
(s3/values.py): what waiting writers may hold meanwhile, shown on real clusters."""

from __future__ import annotations

import resource
import socket
import time

from cluster import HOST, wait_closed

MB = 1 << 20


def _nofile(soft: int, hard: int):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _started_put(port: int, target: str, length: int) -> socket.socket:
    """An S3 PUT whose head is sent and whose body is not: the index opens its uploads to the
    replicas at once, and they stay open while the client takes its time."""
    sock = socket.create_connection((HOST, port))
    sock.settimeout(10)
    sock.sendall(f"PUT {target} HTTP/1.1\r\nHost: x\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode() + b"x" * 1000)
    return sock


def _answer(sock: socket.socket) -> bytes:
    answer = b""
    try:
        while b"\r\n\r\n" not in answer:
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    except OSError as e:
        return answer + f" ({e})".encode()
    return answer


def _s3_get(port: int, target: str) -> bytes:
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\n"
                     "Connection: close\r\n\r\n".encode())
        out = b""
        try:
            while more := sock.recv(1 << 20):
                out += more
        except OSError as e:
            out += f" ({e})".encode()
        return out


def test_s3_writes_mid_body_count_against_the_upload_file_budget(make_cluster):
    """S3 writes hold a volume connection per replica from the start of their body (and, since
    the lock is taken at its end, while they queue for their key too), but they did not count
    in the budget of files kept for uploads that plain PUTs keep to: clients that start many S3
    writes and send their bodies slowly used up the index's open files, and reads that need a
    volume connection (an S3 GET) failed. Now an S3 write past the budget gets 503 SlowDown at
    once, and the files kept for reads stay free."""
    c = make_cluster(volumes=3, replicas=3, workers=1)
    c.index.stop()
    wait_closed(c.port)
    c.index.start(preexec=_nofile(256, 256))  # 64 files kept back, 32 of them for uploads
    value = b"r" * (200 << 10)  # streamed from a volume: a GET needs a connection of its own
    with socket.create_connection((HOST, c.port), timeout=10) as sock:
        sock.sendall(b"PUT /fb/read-me HTTP/1.1\r\nHost: x\r\nx-amz-content-sha256: UNSIGNED-PAYLOAD\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(value) + value)
        assert _answer(sock).startswith(b"HTTP/1.1 200 "), "the object to read could not be written"
    socks = []
    try:
        for i in range(70):  # 70 clients (of the 192 allowed), each with 3 volume connections
            socks.append(_started_put(c.port, f"/fb/slow{i % 5}", MB))
        time.sleep(1)
        got = _s3_get(c.port, "/fb/read-me")
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(value), got[:600]
        refused = []
        for s in socks:
            s.settimeout(0.2)
            refused.append(_answer(s))
        slowed = [a for a in refused if a.startswith(b"HTTP/1.1 503 ") and b"SlowDown" in a]
        assert 50 <= len(slowed) <= 70 - 9, refused[:3]
    finally:
        for s in socks:
            s.close()
